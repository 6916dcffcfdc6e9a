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
- ``Embedding2D``: the table's hidden dim cut in q^2 pieces, piece ``j*q + i`` on rank (i, j); the q pieces of
  column j are all-gathered for the lookup (their gradient reduce-scattered back).

Each layer is built from its standard counterpart (``from_module``), copying this rank's blocks of the whole
weights, and exposes ``full_shapes`` for checkpoints.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.comm.collectives import all_gather_along_dim, copy_to_group, reduce_scatter_along_dim
from lightning_par.comm.summa import Grid2D, sum_over_group, summa_linear
from lightning_par.tensor.loss import VocabParallelLogits


def _block(t: Tensor, parts: int, index: int, dim: int) -> Tensor:
    size = t.shape[dim]
    if size % parts:
        raise ValueError(f"2D tensor parallelism cuts dim {dim} of a {tuple(t.shape)} tensor into {parts} equal "
                         f"blocks; {size} is not divisible by {parts}.")
    return t.narrow(dim, index * (size // parts), size // parts)


def activation_block(x: Tensor, grid: Grid2D, token_dim: int = 0, hidden_dim: int = -1) -> Tensor:
    """This rank's block of a whole activation: tokens (``token_dim``, the batch) over rows, hidden over columns."""
    return _block(_block(x, grid.q, grid.row, token_dim), grid.q, grid.col, hidden_dim)


def _segment_sizes(segments: Union[int, tuple[int, ...], None], size: int) -> Optional[tuple[int, ...]]:
    if segments is None:
        return None
    sizes = (size // segments,) * segments if isinstance(segments, int) else tuple(segments)
    if sum(sizes) != size:
        raise ValueError(f"segments {segments} do not add up to the output size {size}.")
    return sizes


def _out_block(t: Tensor, parts: int, index: int, segments: Optional[tuple[int, ...]]) -> Tensor:
    """Block ``index`` of dim 0 (an output dim), taking its share of each fused segment when there are any."""
    if segments is None:
        return _block(t, parts, index, 0)
    return torch.cat([_block(piece, parts, index, 0) for piece in t.split(list(segments), 0)])


def weight_block(weight: Tensor, grid: Grid2D) -> Tensor:
    """This rank's block of a whole [out, in] weight (or [vocab, hidden] table): block (row, col)."""
    return _block(_block(weight, grid.q, grid.row, 0), grid.q, grid.col, 1)


class Linear2D(nn.Module):
    """``nn.Linear`` on a q x q grid: input block [..., in/q], output block [..., out/q]."""

    def __init__(self, in_features: int, out_features: int, grid: Grid2D, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        q = grid.q
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if size % q:
                raise ValueError(f"Linear2D on a {q} x {q} grid: {name}={size} is not divisible by q={q}.")
        self.in_features, self.out_features, self.grid = in_features, out_features, grid
        # torch's layout, [out, in], blocked as it stands: block (row, col) of the whole weight.
        self.weight = nn.Parameter(torch.empty(out_features // q, in_features // q, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features // q, device=device, dtype=dtype)) if bias else None
        self.segments: Optional[tuple[int, ...]] = None  # a fused output's pieces (see `from_module`)

    @classmethod
    def from_module(cls, linear: nn.Linear, grid: Grid2D,
                    segments: Union[int, tuple[int, ...], None] = None) -> "Linear2D":
        """``segments``: a fused output (q/k/v), as sizes or a count of equal pieces: each block of the output dim
        then takes its share of every piece, so the output block j holds q_j, k_j and v_j."""
        layer = cls(linear.in_features, linear.out_features, grid, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.segments = _segment_sizes(segments, linear.out_features)
        with torch.no_grad():
            rows = _out_block(linear.weight, grid.q, grid.row, layer.segments)
            layer.weight.copy_(_block(rows, grid.q, grid.col, 1))
            if linear.bias is not None:
                layer.bias.copy_(_out_block(linear.bias, grid.q, grid.col, layer.segments))
        return layer

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = summa_linear(x.reshape(-1, x.shape[-1]), self.weight, self.grid).reshape(*lead, -1)
        if self.bias is not None:
            y = y + copy_to_group(self.bias, self.grid.col_group)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"grid={self.grid.q}x{self.grid.q}")


class Output2D(Linear2D):
    """The output layer (``nn.Linear`` to the vocabulary): a ``Linear2D`` whose logits, this rank's [samples of row
    i, vocabulary block j], present the whole [batch, ..., vocab] shape to the user's loss
    (:class:`~lightning_par.tensor.loss.VocabParallelLogits`: the cross-entropy never gathers them)."""

    def forward(self, x: Tensor) -> Tensor:
        local = super().forward(x)
        start = self.grid.col * (self.out_features // self.grid.q)
        return VocabParallelLogits.wrap(local, self.grid.row_group, self.out_features, start,
                                        token_group=self.grid.col_group)


class _Norm2D(nn.Module):
    def __init__(self, normalized_shape: int, grid: Grid2D, eps: float, affine: bool, bias: bool,
                 device: Optional[torch.device], dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        if normalized_shape % grid.q:
            raise ValueError(f"{type(self).__name__} on a {grid.q} x {grid.q} grid: the normalized size "
                             f"{normalized_shape} is not divisible by q={grid.q}.")
        self.normalized_shape, self.grid, self.eps = normalized_shape, grid, eps
        local = normalized_shape // grid.q
        self.weight = nn.Parameter(torch.ones(local, device=device, dtype=dtype)) if affine else None
        self.bias = nn.Parameter(torch.zeros(local, device=device, dtype=dtype)) if affine and bias else None

    def _copy_affine(self, norm: nn.Module) -> None:
        with torch.no_grad():
            for name in ("weight", "bias"):
                mine, whole = getattr(self, name), getattr(norm, name, None)
                if mine is not None:
                    mine.copy_(_block(whole, self.grid.q, self.grid.col, 0))

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * copy_to_group(self.weight, self.grid.col_group)
        if self.bias is not None:
            y = y + copy_to_group(self.bias, self.grid.col_group)
        return y

    def _mean_over_hidden(self, x: Tensor) -> Tensor:
        return sum_over_group(x.sum(-1, keepdim=True), self.grid.row_group) / self.normalized_shape


class LayerNorm2D(_Norm2D):
    """``nn.LayerNorm`` over a hidden dim split across the grid's row (its last dim only)."""

    def __init__(self, normalized_shape: int, grid: Grid2D, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(normalized_shape, grid, eps, elementwise_affine, bias, device, dtype)

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, grid: Grid2D) -> "LayerNorm2D":
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"LayerNorm2D normalises the last dim only; got normalized_shape={norm.normalized_shape}.")
        layer = cls(norm.normalized_shape[0], grid, norm.eps, norm.elementwise_affine, norm.bias is not None,
                    device=norm.weight.device if norm.weight is not None else None)
        layer._copy_affine(norm)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        centred = x - self._mean_over_hidden(x)
        variance = self._mean_over_hidden(centred * centred)
        return self._affine((centred * torch.rsqrt(variance + self.eps)).to(dtype))


class RMSNorm2D(_Norm2D):
    """``nn.RMSNorm`` (and Llama-style RMS norms) over a hidden dim split across the grid's row."""

    def __init__(self, normalized_shape: int, grid: Grid2D, eps: float = 1e-6, elementwise_affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(normalized_shape, grid, eps, elementwise_affine, False, device, dtype)

    @classmethod
    def from_module(cls, norm: nn.Module, grid: Grid2D) -> "RMSNorm2D":
        shape = getattr(norm, "normalized_shape", None) or (norm.weight.shape[-1],)
        eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
        layer = cls(shape[-1], grid, eps, norm.weight is not None, device=norm.weight.device)
        layer._copy_affine(norm)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        return self._affine((x * torch.rsqrt(self._mean_over_hidden(x * x) + self.eps)).to(dtype))


class Embedding2D(nn.Module):
    """``nn.Embedding`` whose output is this rank's [tokens of row i, hidden block j] block: the ids given are the
    row's tokens; the table's hidden dim is held in q^2 pieces (see the module docstring)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid2D, padding_idx: Optional[int] = None,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        pieces = grid.q * grid.q
        if embedding_dim % pieces:
            raise ValueError(f"Embedding2D on a {grid.q} x {grid.q} grid: embedding_dim={embedding_dim} is not "
                             f"divisible by q*q={pieces}.")
        self.num_embeddings, self.embedding_dim, self.grid, self.padding_idx = (num_embeddings, embedding_dim, grid,
                                                                                padding_idx)
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim // pieces, device=device, dtype=dtype))

    @property
    def piece(self) -> int:
        return self.grid.col * self.grid.q + self.grid.row

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid2D) -> "Embedding2D":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, embedding.padding_idx,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(_block(embedding.weight, grid.q * grid.q, layer.piece, 1))
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        table = all_gather_along_dim(self.weight, 1, self.grid.col_group)  # hidden block j: pieces j*q .. j*q+q-1
        return F.embedding(ids, table, self.padding_idx)


class VocabParallelEmbedding2D(nn.Module):
    """A token embedding whose table is cut like a ``Linear2D`` weight: rank (i, j) holds vocabulary block i of hidden
    block j. It takes the whole batch's ids (every rank of the tensor group has them) and returns row i's samples,
    hidden block j."""

    def __init__(self, num_embeddings: int, embedding_dim: int, grid: Grid2D,
                 weight: Optional[nn.Parameter] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        for name, size in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if size % grid.q:
                raise ValueError(f"VocabParallelEmbedding2D on a {grid.q} x {grid.q} grid: {name}={size} is not "
                                 f"divisible by q={grid.q}.")
        self.num_embeddings, self.embedding_dim, self.grid = num_embeddings, embedding_dim, grid
        self.start = grid.row * (num_embeddings // grid.q)  # the first vocabulary id of this rank's rows
        # `weight`: an output layer's Linear2D weight, shared (tied embeddings).
        self.weight = weight if weight is not None else nn.Parameter(
            torch.empty(num_embeddings // grid.q, embedding_dim // grid.q, device=device, dtype=dtype))

    @classmethod
    def from_module(cls, embedding: nn.Embedding, grid: Grid2D,
                    weight: Optional[nn.Parameter] = None) -> "VocabParallelEmbedding2D":
        if embedding.padding_idx is not None:
            raise ValueError("VocabParallelEmbedding2D does not keep a padding_idx row at zero; give the embedding "
                             "no padding_idx (its row is still trained like any other).")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, grid, weight,
                    device=embedding.weight.device, dtype=embedding.weight.dtype)
        if weight is None:
            with torch.no_grad():
                layer.weight.copy_(weight_block(embedding.weight, grid))
        return layer

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[0] % self.grid.q:
            raise ValueError(f"2D tensor parallelism splits the batch over the grid's {self.grid.q} rows; a batch of "
                             f"{ids.shape[0]} samples does not divide into {self.grid.q}.")
        rows = self.weight.shape[0]
        mine = (ids >= self.start) & (ids < self.start + rows)
        partial = F.embedding((ids - self.start).clamp(0, rows - 1), self.weight) * mine.unsqueeze(-1)
        return reduce_scatter_along_dim(partial, 0, self.grid.col_group)  # sum the vocab blocks; row i's samples
