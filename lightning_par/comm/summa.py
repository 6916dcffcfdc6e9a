"""SUMMA on a q x q grid of ranks: the matrix products of 2D tensor parallelism (Optimus, "An Efficient 2D Method for
Training Super-Large Deep Learning Models"), and the small collectives its layers need.

[Note: the 2D grid]
Rank (i, j) sits in row i and column j of a q x q grid. A matrix ``A`` of shape [M, K] is cut into q x q blocks;
rank (i, j) holds block ``A_ij`` (rows block i, columns block j). Its *row group* is the q ranks (i, 0..q-1) and its
*column group* the q ranks (0..q-1, j); a rank's index in its row group is its column j, in its column group its
row i (``Grid2D``). Activations are [tokens, hidden] matrices: tokens split over rows, hidden over columns.

``C = A @ B`` (``summa_ab``) runs q steps; at step k, rank (i, k) broadcasts ``A_ik`` along row i and rank (k, j)
broadcasts ``B_kj`` along column j; every rank adds ``A_ik @ B_kj`` to its ``C_ij``. ``A @ B^T`` (``summa_abt``)
broadcasts ``B_kj`` down column j, multiplies, and reduces the partial ``C_ik`` along row i to column k; ``A^T @ B``
(``summa_atb``) broadcasts ``A_ik`` along row i, multiplies, and reduces the partial along column j to row k. A
linear layer ``Y = X W^T`` (``summa_linear``) is ``summa_abt`` forward, ``summa_ab`` and ``summa_atb`` backward:
per layer 4q broadcasts and 2q reduces, each carrying one block; one block of each operand is held at a time,
never the gathered row or column (the paper's memory bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_par.comm.raw_collectives import _global_rank, group_rank, group_size


@dataclass(frozen=True)
class Grid2D:
    """This rank's place on a q x q grid: the groups of its row and of its column (see [Note: the 2D grid]).

    2.5D (Tesseract) stacks ``d`` such grids (``depth_group``: the ranks at my (row, column) in every layer, ordered
    by layer): each layer holds every weight block again and works on its own 1/d of the samples, so a weight's
    gradient is summed over the depth. ``layer_group`` is my layer's q x q ranks and ``stack_group`` my column
    across every layer and row (ordered by layer, then row: the order of the samples' blocks). With ``d = 1``
    (2D) they are the whole grid and the column."""

    row_group: Optional[ProcessGroup]  # the ranks of my row: (i, 0..q-1), ordered by column
    col_group: Optional[ProcessGroup]  # the ranks of my column: (0..q-1, j), ordered by row
    depth_group: Optional[ProcessGroup] = None
    layer_group: Optional[ProcessGroup] = None
    stack_group: Optional[ProcessGroup] = None

    @property
    def q(self) -> int:
        return group_size(self.row_group)

    @property
    def row(self) -> int:
        return group_rank(self.col_group)

    @property
    def col(self) -> int:
        return group_rank(self.row_group)

    @property
    def d(self) -> int:
        return group_size(self.depth_group) if self.depth_group is not None else 1

    @property
    def depth(self) -> int:
        return group_rank(self.depth_group) if self.depth_group is not None else 0

    @property
    def samples_group(self) -> Optional[ProcessGroup]:
        """The ranks that hold the other blocks of the samples next to mine: my column (2D), across layers (2.5D)."""
        return self.stack_group if self.d > 1 else self.col_group

    axes = ("row", "col")

    @property
    def ranks(self) -> int:
        """Ranks in the tensor group: d stacked q x q grids."""
        return self.d * self.q * self.q

    def index(self, axis: str) -> int:
        """This rank's coordinate on ``axis`` ("row" or "col"), for ``tensor.grid_cut.GridCut``."""
        return {"row": self.row, "col": self.col}[axis]

    def group(self, axis: str) -> Optional[ProcessGroup]:
        """The ranks that differ from this one only on ``axis``: a column's ranks differ in their row."""
        return {"row": self.col_group, "col": self.row_group}[axis]

    def vector_group(self, axis: str) -> Optional[ProcessGroup]:
        """The ranks holding a vector's block cut along ``axis`` ("col"): every row of my column, in every layer."""
        return self.samples_group

    @property
    def label(self) -> str:
        q = self.q
        return f"tp2d plan on a {q} x {q} grid" if self.d == 1 else f"tp2.5d plan on {self.d} layers of a {q} x {q} grid"

    def __deepcopy__(self, memo: dict) -> "Grid2D":
        return self  # a copied layer (a pipeline's meta copy, EMA) lives on the same grid

    def __post_init__(self) -> None:
        if group_size(self.row_group) != group_size(self.col_group):
            raise ValueError(f"A 2D grid is square: the row group has {group_size(self.row_group)} ranks, the column "
                             f"group {group_size(self.col_group)}.")


def _broadcast(x: Tensor, src: int, group: Optional[ProcessGroup], mine: bool) -> tuple[Tensor, Any]:
    """Launch the broadcast of ``x`` from group rank ``src`` (``mine``: this rank is ``src``); returns the output
    and its work, to be waited for (``_wait``) before the output is read."""
    out = x.contiguous() if mine else torch.empty_like(x, memory_format=torch.contiguous_format)
    if group_size(group) == 1:
        return out, None
    return out, dist.broadcast(out, src=_global_rank(group, src), group=group, async_op=True)


def _reduce(x: Tensor, dst: int, group: Optional[ProcessGroup]) -> tuple[Tensor, Any]:
    """Launch the sum of ``x`` over ``group`` into group rank ``dst``'s ``x``; returns it and its work."""
    x = x.contiguous()
    if group_size(group) == 1:
        return x, None
    return x, dist.reduce(x, dst=_global_rank(group, dst), op=dist.ReduceOp.SUM, group=group, async_op=True)


def _wait(work: Any) -> None:
    if work is not None:
        work.wait()  # on NCCL: the current stream waits, the host does not


# [Note: SUMMA's steps overlapped]
# Each product launches step k + 1's broadcasts before step k's matmul, so the next blocks travel while this one
# multiplies (two blocks of each broadcast operand are held, not one); the reduces of the partial results are
# launched as each is computed and waited for once, at the end. Collectives of one group still run in order, and
# every rank issues them in the same order.


def summa_ab(a: Tensor, b: Tensor, grid: Grid2D) -> Tensor:
    """``C_ij = sum_k A_ik @ B_kj``: ``a`` [m, k] and ``b`` [k, n] are this rank's blocks; returns its [m, n] block."""
    def fetch(k: int):
        return _broadcast(a, k, grid.row_group, grid.col == k), _broadcast(b, k, grid.col_group, grid.row == k)

    c = a.new_zeros(a.shape[0], b.shape[1])
    ahead = fetch(0)
    for k in range(grid.q):
        (a_k, a_work), (b_k, b_work) = ahead
        if k + 1 < grid.q:
            ahead = fetch(k + 1)
        _wait(a_work)
        _wait(b_work)
        c.addmm_(a_k, b_k)
    return c


def _reduced_steps(operand: Tensor, along: Optional[ProcessGroup], my_index: int,
                   multiply: Callable[[Tensor], Tensor], reduce_group: Optional[ProcessGroup], my_target: int,
                   q: int) -> Tensor:
    """The steps of ``summa_abt`` and ``summa_atb``: in step k, ``operand`` is broadcast from group rank k of
    ``along`` (``my_index``: this rank's index there; launched one step ahead), multiplied, and the partial reduced
    to group rank k of ``reduce_group``; returns the reduced partial of step ``my_target``, this rank's block."""
    c: Optional[Tensor] = None
    reduces = []
    ahead = _broadcast(operand, 0, along, my_index == 0)
    for k in range(q):
        block, work = ahead
        if k + 1 < q:
            ahead = _broadcast(operand, k + 1, along, my_index == k + 1)
        _wait(work)
        partial, reduce_work = _reduce(multiply(block), k, reduce_group)
        reduces.append((partial, reduce_work))
        if my_target == k:
            c = partial
    for _, reduce_work in reduces:
        _wait(reduce_work)
    return c


def summa_abt(a: Tensor, b: Tensor, grid: Grid2D) -> Tensor:
    """``C_ik = sum_j A_ij @ B_kj^T``: ``a`` [m, n] and ``b`` [k, n] are this rank's blocks; returns its [m, k]
    block of ``A @ B^T`` (``B_kj`` down column j, the partials along row i to column k)."""
    return _reduced_steps(b, grid.col_group, grid.row, lambda b_k: a @ b_k.t(), grid.row_group, grid.col, grid.q)


def summa_atb(a: Tensor, b: Tensor, grid: Grid2D) -> Tensor:
    """``C_kj = sum_i A_ik^T @ B_ij``: ``a`` [m, k] and ``b`` [m, n] are this rank's blocks; returns its [k, n]
    block of ``A^T @ B`` (``A_ik`` along row i, the partials down column j to row k)."""
    return _reduced_steps(a, grid.row_group, grid.col, lambda a_k: a_k.t() @ b, grid.col_group, grid.row, grid.q)


class _SummaLinear(torch.autograd.Function):
    """``y = x @ w^T`` on blocks (``x`` [m, k], ``w`` [n, k]: torch's [out, in] layout, blocked as it stands), in
    ``dtype`` (the autocast dtype under mixed precision: the products and their broadcasts and reduces in bf16);
    saves only this rank's blocks, cast. Gradients come back in the inputs' own dtypes."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, grid: Grid2D, dtype: torch.dtype) -> Tensor:
        ctx.grid, ctx.dtypes = grid, (x.dtype, w.dtype)
        xc, wc = x.to(dtype), w.to(dtype)
        ctx.save_for_backward(xc, wc)
        with torch.autocast(x.device.type, enabled=False):
            return summa_abt(xc, wc, grid)

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc = ctx.saved_tensors
        grad = grad.to(wc.dtype).contiguous()
        dx = summa_ab(grad, wc, ctx.grid).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = summa_atb(grad, xc, ctx.grid).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def summa_linear(x: Tensor, w: Tensor, grid: Grid2D) -> Tensor:
    """This rank's block of ``X @ W^T`` (``F.linear``) for its blocks ``x`` [m, k] of ``X`` and ``w`` [n, k] of
    ``W`` (torch's [out, in] weight, blocked as it stands), differentiable in both: the forward is ``summa_abt``,
    the input gradient ``summa_ab`` and the weight gradient ``summa_atb`` (Colossal-AI's 2D classifier order), so
    a weight shared with an embedding table ([vocab, hidden], the same layout) needs no transpose."""
    dtype = x.dtype
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return _SummaLinear.apply(x, w, grid, dtype)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce forward and backward: each rank uses the sum on its own data, so the sum's gradient is the sum of
    every rank's."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_group(x: Tensor, group: Optional[ProcessGroup]) -> Tensor:
    """The sum of ``x`` over ``group`` on every rank, for statistics every rank applies to its own block (a norm's
    mean and variance over a hidden dim split across the group); its backward sums the ranks' gradients."""
    if group_size(group) == 1:
        return x
    return _SumOverGroup.apply(x, group)
