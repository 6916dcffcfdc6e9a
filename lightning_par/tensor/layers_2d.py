"""2D tensor-parallel layers (SUMMA / Optimus) on a q x q grid of ranks (see [Note: the 2D grid] in comm/summa.py).

Activations between layers are [tokens, hidden] blocks: the tokens (whole samples: the batch dim) split over the
grid's rows, the hidden dim over its columns, so each rank holds 1/q^2 of every activation. Weights are 1/q^2 per
rank as well:

- ``Linear2D``: the weight in torch's [out, in] layout cut in q x q blocks, block (i, j) on rank (i, j); the
  product is SUMMA (``comm.summa.summa_linear``). The output's hidden block j holds outputs block j, so the bias's
  block j is held by every rank of column j (a vector is small); its gradient is summed over the column, whose rows
  saw different tokens.
- ``VocabParallelEmbedding2D``: the [vocab, hidden] table in the same blocks as ``Linear2D`` (so an output layer can
  share it); each rank looks up the whole batch in its vocabulary rows and the column reduce-scatters the partial
  lookups over the batch, giving row i its samples.
- ``LayerNorm2D`` / ``RMSNorm2D``: the statistics over the hidden dim are summed over the row (one all-reduce each
  forward and backward); the affine vectors as the bias above.
- ``Embedding2D`` (positions): the table's hidden dim cut in q^2 pieces, piece ``j*q + i`` on rank (i, j); the q
  pieces of column j are all-gathered for the lookup (their gradient reduce-scattered back).

Each parameter carries a ``GridCut`` (``tensor/grid_cut.py``), the one description of how it is cut, which everything
else reads: the layer's ``from_module`` slices the whole weights with it, checkpoints turn it into boxes, the gradient
norm into its groups, and ``unshard`` gathers the whole tensor back.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.comm.collectives import all_gather_along_dim, copy_to_group, reduce_scatter_along_dim
from lightning_par.comm.summa import Grid2D, summa_linear
from lightning_par.tensor.grid_cut import GridCut, cut_parameter, load_piece, padded
from lightning_par.tensor.grid_norms import GridLayerNorm, GridRMSNorm
from lightning_par.tensor.layers_1d import ShardSpec, linear_dims
from lightning_par.tensor.loss import VocabParallelLogits

def _depth_shared(weight: Tensor, grid: Grid2D) -> Tensor:
    """A weight every layer of a 2.5D stack holds: used as it is, its gradient summed over the depth."""
    return copy_to_group(weight, grid.depth_group) if grid.d > 1 else weight


def _vector(vector: Tensor, grid: Grid2D) -> Tensor:
    """A vector block j, held by every rank of column j (in every layer): its gradient summed over them."""
    return copy_to_group(vector, grid.samples_group)


def _divisible(owner: str, grid: Grid2D, **sizes: int) -> None:
    for name, size in sizes.items():
        if size % grid.q:
            raise ValueError(f"{owner} on a {grid.q} x {grid.q} grid: {name}={size} is not divisible by q={grid.q}.")


def _vector_cut(size: int, q: int, segments: Optional[tuple[int, ...]] = None, pad: bool = False) -> GridCut:
    return GridCut(((ShardSpec(0, segments or (size,), q, pad), "col"),), "shared")


def _matrix_cut(rows: int, columns: int, q: int, segments: Optional[tuple[int, ...]] = None,
                pad: bool = False, transposed: bool = False) -> GridCut:
    """Rows (``pad``: zero-padded up to a multiple of q, for vocabularies) by the grid's row, columns by its
    column; ``transposed``: the tensor is stored [columns, rows] (a Hugging Face ``Conv1D`` weight), cut alike."""
    row_dim, column_dim = (1, 0) if transposed else (0, 1)
    return GridCut(((ShardSpec(column_dim, (columns,), q), "col"), (ShardSpec(row_dim, segments or (rows,), q, pad),
                                                                   "row")), "grid")


def activation_block(x: Tensor, grid: Grid2D, token_dim: int = 0, hidden_dim: int = -1) -> Tensor:
    """This rank's block of a whole activation: tokens (``token_dim``, the batch) over the layers and rows (2.5D:
    layer-major), hidden over columns."""
    x = x.chunk(grid.d * grid.q, token_dim)[grid.depth * grid.q + grid.row]
    return x.chunk(grid.q, hidden_dim)[grid.col]


def _segment_sizes(segments: Union[int, tuple[int, ...], None], size: int) -> Optional[tuple[int, ...]]:
    if segments is None:
        return None
    sizes = (size // segments,) * segments if isinstance(segments, int) else tuple(segments)
    if sum(sizes) != size:
        raise ValueError(f"segments {segments} do not add up to the output size {size}.")
    return sizes


class Linear2D(nn.Module):
    """``nn.Linear`` on a q x q grid: input block [..., in/q], output block [..., out/q]. ``segments``: a fused
    output (q/k/v), as sizes or a count of equal pieces: each output block then takes its share of every piece, so
    the output block j holds q_j, k_j and v_j."""

    pad_outputs = False  # the output layer pads its vocabulary up to a multiple of q

    def __init__(self, in_features: int, out_features: int, grid: Grid2D, bias: bool = True,
                 segments: Union[int, tuple[int, ...], None] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, transposed: bool = False) -> None:
        super().__init__()
        q = grid.q
        _divisible(type(self).__name__, grid, in_features=in_features)
        if not self.pad_outputs:
            _divisible(type(self).__name__, grid, out_features=out_features)
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        self.segments = _segment_sizes(segments, out_features)
        local = padded(out_features, q) // q
        # torch's layout, [out, in], blocked as it stands: block (row, col) of the whole weight. `transposed`: stored
        # [in, out] as Hugging Face's Conv1D stores it (its checkpoints keep that layout), multiplied transposed.
        self.transposed = transposed
        shape = (in_features // q, local) if transposed else (local, in_features // q)
        self.weight = cut_parameter(shape, _matrix_cut(out_features, in_features, q, self.segments, self.pad_outputs,
                                                    transposed), device, dtype)
        self.bias = cut_parameter((local,), _vector_cut(out_features, q, self.segments, self.pad_outputs), device,
                               dtype) if bias else None

    @classmethod
    def from_module(cls, linear: nn.Module, grid: Grid2D, segments: Union[int, tuple[int, ...], None] = None,
                    rowwise: bool = False) -> "Linear2D":
        """From an ``nn.Linear`` or a Hugging Face ``Conv1D`` (``rowwise``: the 1D plan's direction, which 2D's
        layout does not depend on)."""
        in_features, out_features, transposed = linear_dims(linear)
        layer = cls(in_features, out_features, grid, linear.bias is not None, segments,
                    device=linear.weight.device, dtype=linear.weight.dtype, transposed=transposed)
        load_piece(layer.weight, linear.weight, grid)
        if linear.bias is not None:
            load_piece(layer.bias, linear.bias, grid)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        weight = _depth_shared(self.weight, self.grid)
        weight = weight.t() if self.transposed else weight
        y = summa_linear(x.reshape(-1, x.shape[-1]), weight, self.grid).reshape(*lead, -1)
        if self.bias is not None:
            y = y + _vector(self.bias, self.grid)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"grid={self.grid.q}x{self.grid.q}")


class Output2D(Linear2D):
    """The output layer (``nn.Linear`` to the vocabulary): a ``Linear2D`` whose logits, this rank's [samples of row
    i, vocabulary block j], present the whole [batch, ..., vocab] shape to the user's loss
    (:class:`~lightning_par.tensor.loss.VocabParallelLogits`: the cross-entropy never gathers them)."""

    pad_outputs = True  # a vocabulary q does not divide (the demo's 65 characters): zero rows, never a logit

    def forward(self, x: Tensor) -> Tensor:
        local = super().forward(x)
        start = self.grid.col * local.shape[-1]
        return VocabParallelLogits.wrap(local, self.grid.row_group, self.out_features, start,
                                        token_group=self.grid.samples_group)


class LayerNorm2D(GridLayerNorm):
    """``nn.LayerNorm`` over a hidden dim split across the grid's row (its last dim only)."""

    axis = "col"


class RMSNorm2D(GridRMSNorm):
    """``nn.RMSNorm`` (and Llama-style RMS norms) over a hidden dim split across the grid's row."""

    axis = "col"


class Embedding2D(nn.Module):
    """``nn.Embedding`` (positions: its ids are not samples) whose output is hidden block j of whatever ids it is
    given; the table's hidden dim is held in q^2 pieces (see the module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid2D, padding_idx: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        q = grid.q
        if embedding_dim % (q * q):
            raise ValueError(f"Embedding2D on a {q} x {q} grid: embedding_dim={embedding_dim} is not divisible by "
                             f"q*q={q * q}.")
        self.num_embeddings, self.embedding_dim, self.grid, self.padding_idx = (num_embeddings, embedding_dim, grid,
                                                                                padding_idx)
        # Hidden block j (the column's) cut again in q pieces by row: piece j*q + i on rank (i, j).
        cut = GridCut(((ShardSpec(1, (embedding_dim // q,), q), "row"), (ShardSpec(1, (embedding_dim,), q), "col")),
                    "grid")
        self.weight = cut_parameter((num_embeddings, embedding_dim // (q * q)), cut, device, dtype)

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid2D) -> "Embedding2D":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, embedding.padding_idx,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        load_piece(layer.weight, embedding.weight, grid)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        # hidden block j: pieces j*q .. j*q+q-1
        table = all_gather_along_dim(_depth_shared(self.weight, self.grid), 1, self.grid.col_group)
        return F.embedding(ids, table, self.padding_idx)


class VocabParallelEmbedding2D(nn.Module):
    """A token embedding whose table is cut like a ``Linear2D`` weight: rank (i, j) holds vocabulary block i of hidden
    block j. It takes the whole batch's ids (every rank of the tensor group has them) and returns row i's samples,
    hidden block j. ``weight``: an output layer's ``Linear2D`` weight, shared (tied embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid2D,
                 weight: Optional[nn.Parameter] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        _divisible(type(self).__name__, grid, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim, self.grid = num_embeddings, embedding_dim, grid
        rows = padded(num_embeddings, grid.q) // grid.q  # the vocabulary padded up to a multiple of q, as Output2D
        self.start = grid.row * rows  # the first vocabulary id of this rank's rows
        self.weight = weight if weight is not None else cut_parameter(
            (rows, embedding_dim // grid.q), _matrix_cut(num_embeddings, embedding_dim, grid.q, pad=True), device,
            dtype)

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid2D,
                    weight: Optional[nn.Parameter] = None) -> "VocabParallelEmbedding2D":
        if embedding.padding_idx is not None:
            raise ValueError("VocabParallelEmbedding2D does not keep a padding_idx row at zero; give the embedding "
                             "no padding_idx (its row is still trained like any other).")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, weight,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        if weight is None:
            load_piece(layer.weight, embedding.weight, grid)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        grid = self.grid
        if ids.shape[0] % (grid.d * grid.q):
            where = f"{grid.d} layers x {grid.q} rows of the grids" if grid.d > 1 else f"{grid.q} rows of the grid"
            raise ValueError(f"{'2.5D' if grid.d > 1 else '2D'} tensor parallelism splits the batch over {where}; a "
                             f"batch of {ids.shape[0]} samples does not divide into {grid.d * grid.q}.")
        if grid.d > 1:
            ids = ids.chunk(grid.d)[grid.depth]  # each layer of the stack works on its own samples
        rows = self.weight.shape[0]
        mine = (ids >= self.start) & (ids < self.start + rows)
        weight = _depth_shared(self.weight, grid)
        partial = F.embedding((ids - self.start).clamp(0, rows - 1), weight) * mine.unsqueeze(-1)
        return reduce_scatter_along_dim(partial, 0, self.grid.col_group)  # sum the vocab blocks; row i's samples
