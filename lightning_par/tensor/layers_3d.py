"""3D tensor-parallel layers on a q x q x q cube of ranks (see [Note: the 3D cube] in comm/cube.py).

The hidden stream is in layout "y" (samples in block x*q + z, hidden block y); column-parallel linears write layout
"z" (attention heads and MLP units cut along z) and row-parallel ones bring it back to "y". Every weight matrix is
1/q^3 per rank, every activation between layers 1/q^3:

- ``Linear3D``: block (out-block, in-block) of torch's [out, in] weight, cut once more along ``in`` by x; the product
  is ``comm.cube.cube_linear``. The bias's block (the output's hidden block) is held by the q^2 ranks of that
  block's plane, its gradient summed over them.
- ``Output3D``: a column-parallel ``Linear3D`` whose logits (samples of layout "z", vocabulary block z) present the
  whole [batch, ..., vocab] shape to the loss (``VocabParallelLogits``: never gathered).
- ``VocabParallelEmbedding3D``: the [vocab, hidden] table cut like the output layer's weight (so they can be one
  Parameter); the x group all-gathers its block, each rank looks up the samples of block x in its vocabulary rows,
  and the z group reduce-scatters the partial lookups, giving layout "y".
- ``LayerNorm3D`` / ``RMSNorm3D``: statistics over the hidden dim summed over the y group; affine vectors as the
  bias above.
- ``Embedding3D`` (positions): the table's hidden dim cut in q^3 pieces (by y, then z, then x), all-gathered over x
  and z for the lookup.

Parameters carry a ``tensor.grid_cut.GridCut``, as the 2D layers' do.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.comm.collectives import all_gather_along_dim, copy_to_group, reduce_scatter_along_dim
from lightning_par.comm.cube import Grid3D, cube_linear
from lightning_par.tensor.grid_cut import GridCut, cut_parameter, load_piece, padded
from lightning_par.tensor.grid_norms import GridLayerNorm, GridRMSNorm
from lightning_par.tensor.layers_1d import ShardSpec, linear_dims
from lightning_par.tensor.layers_2d import _segment_sizes
from lightning_par.tensor.loss import VocabParallelLogits

STREAM = "y"  # the hidden stream's layout: embeddings, norms, residuals


def _divisible(owner: str, q: int, by: int, **sizes: int) -> None:
    for name, size in sizes.items():
        if size % by:
            what = "q" if by == q else ("q*q" if by == q * q else "q*q*q")
            raise ValueError(f"{owner} on a {q} x {q} x {q} cube: {name}={size} is not divisible by {what}={by}.")


def _vector(vector: Tensor, grid: Grid3D, axis: str) -> Tensor:
    """A vector's block on ``axis``, held by that block's plane: its gradient summed over the plane."""
    return copy_to_group(vector, grid.plane(axis))


def _vector_cut(size: int, q: int, axis: str, segments: Optional[tuple[int, ...]] = None,
                pad: bool = False) -> GridCut:
    return GridCut(((ShardSpec(0, segments or (size,), q, pad), axis),), "shared")


def _weight_cut(rows: int, columns: int, q: int, in_axis: str, out_axis: str,
                segments: Optional[tuple[int, ...]] = None, pad: bool = False, transposed: bool = False) -> GridCut:
    """Rows (outputs; ``pad``: zero-padded to a multiple of q) by ``out_axis``, columns (inputs) by ``in_axis`` and
    then by x; ``transposed``: stored [columns, rows] (a Hugging Face ``Conv1D`` weight), cut alike."""
    row_dim, column_dim = (1, 0) if transposed else (0, 1)
    return GridCut(((ShardSpec(column_dim, (columns // q,), q), "x"), (ShardSpec(column_dim, (columns,), q), in_axis),
                    (ShardSpec(row_dim, segments or (rows,), q, pad), out_axis)), "grid")


def activation_block_3d(x: Tensor, grid: Grid3D, layout: str = STREAM, token_dim: int = 0,
                        hidden_dim: int = -1) -> Tensor:
    """This rank's block of a whole activation in ``layout`` ("y" or "z")."""
    q = grid.q
    x = x.chunk(q * q, token_dim)[grid.samples_block(layout)]
    return x.chunk(q, hidden_dim)[grid.index(layout)]


class Linear3D(nn.Module):
    """``nn.Linear`` on a q x q x q cube: column-parallel (``rowwise=False``) reads the hidden stream's layout "y"
    and writes "z"; row-parallel the reverse. ``segments``: a fused output (q/k/v), kept whole per block as in
    ``Linear2D``."""

    pad_outputs = False  # the output layer pads its vocabulary up to a multiple of q

    def __init__(self, in_features: int, out_features: int, grid: Grid3D, bias: bool = True,
                 segments: Union[int, tuple[int, ...], None] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, transposed: bool = False, rowwise: bool = False) -> None:
        super().__init__()
        q = grid.q
        _divisible(type(self).__name__, q, q * q, in_features=in_features)
        if not self.pad_outputs:
            _divisible(type(self).__name__, q, q, out_features=out_features)
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        self.in_axis, self.out_axis = ("z", "y") if rowwise else ("y", "z")
        self.segments = _segment_sizes(segments, out_features)
        local = padded(out_features, q) // q
        self.transposed = transposed
        shape = (in_features // (q * q), local) if transposed else (local, in_features // (q * q))
        self.weight = cut_parameter(shape, _weight_cut(out_features, in_features, q, self.in_axis, self.out_axis,
                                                       self.segments, self.pad_outputs, transposed), device, dtype)
        self.bias = cut_parameter((local,), _vector_cut(out_features, q, self.out_axis, self.segments,
                                                        self.pad_outputs), device, dtype) if bias else None

    @classmethod
    def from_module(cls, linear: nn.Module, grid: Grid3D, segments: Union[int, tuple[int, ...], None] = None,
                    rowwise: bool = False) -> "Linear3D":
        """From an ``nn.Linear`` or a Hugging Face ``Conv1D``."""
        in_features, out_features, transposed = linear_dims(linear)
        layer = cls(in_features, out_features, grid, linear.bias is not None, segments,
                    device=linear.weight.device, dtype=linear.weight.dtype, transposed=transposed, rowwise=rowwise)
        load_piece(layer.weight, linear.weight, grid)
        if linear.bias is not None:
            load_piece(layer.bias, linear.bias, grid)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        weight = self.weight.t() if self.transposed else self.weight
        y = cube_linear(x.reshape(-1, x.shape[-1]), weight, self.grid, self.in_axis, self.out_axis)
        # As many samples, but other ones: layout "y" holds block x*q + z of them, layout "z" block x*q + y.
        y = y.reshape(*lead, -1)
        if self.bias is not None:
            y = y + _vector(self.bias, self.grid, self.out_axis)
        return y

    def extra_repr(self) -> str:
        q = self.grid.q
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.in_axis}->{self.out_axis}, cube={q}x{q}x{q}")


class Output3D(Linear3D):
    """The output layer: a column-parallel ``Linear3D`` whose logits, this rank's [samples of layout "z",
    vocabulary block z], present the whole [batch, ..., vocab] shape to the user's loss."""

    pad_outputs = True

    def forward(self, x: Tensor) -> Tensor:
        local = super().forward(x)
        start = self.grid.index("z") * local.shape[-1]
        return VocabParallelLogits.wrap(local, self.grid.group("z"), self.out_features, start,
                                        token_group=self.grid.plane("z"))


class LayerNorm3D(GridLayerNorm):
    """``nn.LayerNorm`` over the hidden stream's dim, split across the y group (its last dim only)."""

    axis = STREAM


class RMSNorm3D(GridRMSNorm):
    """``nn.RMSNorm`` (and Llama-style RMS norms) over the hidden stream's dim, split across the y group."""

    axis = STREAM


class Embedding3D(nn.Module):
    """``nn.Embedding`` (positions: its ids are not samples) whose output is hidden block y of whatever ids it is
    given; the table's hidden dim is held in q^3 pieces (see the module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid3D, padding_idx: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        q = grid.q
        _divisible(type(self).__name__, q, q ** 3, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim, self.grid, self.padding_idx = (num_embeddings, embedding_dim, grid,
                                                                                padding_idx)
        h = embedding_dim
        cut = GridCut(((ShardSpec(1, (h // (q * q),), q), "x"), (ShardSpec(1, (h // q,), q), "z"),
                       (ShardSpec(1, (h,), q), STREAM)), "grid")
        self.weight = cut_parameter((num_embeddings, h // q ** 3), cut, device, dtype)

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid3D) -> "Embedding3D":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, embedding.padding_idx,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        load_piece(layer.weight, embedding.weight, grid)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        table = all_gather_along_dim(self.weight, 1, self.grid.group("x"))
        table = all_gather_along_dim(table, 1, self.grid.group("z"))  # hidden block y
        return F.embedding(ids, table, self.padding_idx)


class VocabParallelEmbedding3D(nn.Module):
    """A token embedding cut like the output layer's weight (vocabulary block z, hidden block y, cut again by x). It
    takes the whole batch's ids (every rank of the cube has them) and returns the hidden stream's block (layout
    "y"). ``weight``: the output layer's ``Output3D`` weight, shared (tied embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid3D,
                 weight: Optional[nn.Parameter] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        q = grid.q
        _divisible(type(self).__name__, q, q * q, embedding_dim=embedding_dim)
        self.num_embeddings, self.embedding_dim, self.grid = num_embeddings, embedding_dim, grid
        rows = padded(num_embeddings, q) // q  # the vocabulary padded up to a multiple of q, as Output3D
        self.start = grid.index("z") * rows
        self.weight = weight if weight is not None else cut_parameter(
            (rows, embedding_dim // (q * q)), _weight_cut(num_embeddings, embedding_dim, q, STREAM, "z", pad=True),
            device, dtype)

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid3D,
                    weight: Optional[nn.Parameter] = None) -> "VocabParallelEmbedding3D":
        if embedding.padding_idx is not None:
            raise ValueError("VocabParallelEmbedding3D does not keep a padding_idx row at zero; give the embedding "
                             "no padding_idx (its row is still trained like any other).")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, weight,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        if weight is None:
            load_piece(layer.weight, embedding.weight, grid)
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        grid, q = self.grid, self.grid.q
        if ids.shape[0] % (q * q):
            raise ValueError(f"3D tensor parallelism splits the batch in {q * q} blocks over the cube; a batch of "
                             f"{ids.shape[0]} samples does not divide into {q * q}.")
        ids = ids.chunk(q)[grid.index("x")]
        rows = self.weight.shape[0]
        mine = (ids >= self.start) & (ids < self.start + rows)
        table = all_gather_along_dim(self.weight, 1, grid.group("x"))  # [vocab block z, hidden block y]
        partial = F.embedding((ids - self.start).clamp(0, rows - 1), table) * mine.unsqueeze(-1)
        return reduce_scatter_along_dim(partial, 0, grid.group("z"))  # sum the vocab blocks; block x*q + z
