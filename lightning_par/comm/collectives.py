"""Autograd-aware collectives: each op's backward is the mirror collective of its forward.

Every op takes its process group explicitly and is a pass-through (the input object itself, no autograd node, no
communication) when the group has a single rank. As with any collective, every rank of the group must call the op
in the same order, and every rank must backpropagate through its output (backward runs a collective too): give the
inputs the same ``requires_grad`` on all ranks of the group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from lightning_par.comm.raw_collectives import (
    _all_gather,
    _all_reduce,
    _check_divisible,
    _check_root,
    _contiguous_copy,
    _global_rank,
    _normalize_dim,
    _own_chunk,
    _reduce_scatter,
    group_rank,
    group_size,
    mean_op,
)

__all__ = [
    "mean_op",
    "group_size",
    "group_rank",
    "copy_to_group",
    "reduce_from_group",
    "split_along_dim",
    "gather_along_dim",
    "reduce_scatter_along_dim",
    "all_gather_along_dim",
    "broadcast_from",
    "reduce_to",
    "reduce_from_group_",
    "gather_input",
    "InputGradReduction",
    "input_grad_reduction",
]


# ---- autograd Functions -----------------------------------------------------------------------------------------


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, chunks):
        ctx.dim, ctx.group, ctx.chunks = dim, group, chunks
        return _own_chunk(x, dim, group, chunks)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group, chunks=ctx.chunks), None, None, None


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, chunks):
        ctx.dim, ctx.group, ctx.chunks = dim, group, chunks
        return _all_gather(x, dim, group, chunks=chunks)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is replicated: every rank holds the full gradient already, keep our slice.
        return _own_chunk(grad, ctx.dim, ctx.group, ctx.chunks), None, None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, chunks):
        ctx.dim, ctx.group, ctx.chunks = dim, group, chunks
        return _reduce_scatter(x, dim, group, chunks=chunks)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group, chunks=ctx.chunks), None, None, None


class _BroadcastFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, group):
        ctx.src, ctx.group = src, group
        is_src = group_rank(group) == src
        out = _contiguous_copy(x) if is_src else torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.broadcast(out, src=_global_rank(group, src), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = _contiguous_copy(grad)
        dist.reduce(g, dst=_global_rank(ctx.group, ctx.src), op=dist.ReduceOp.SUM, group=ctx.group)
        if group_rank(ctx.group) != ctx.src:
            # Non-root inputs were only templates; NCCL leaves the non-root buffer unspecified anyway.
            g.zero_()
        return g, None, None


class _ReduceTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dst, group):
        ctx.dst, ctx.group = dst, group
        out = _contiguous_copy(x)
        dist.reduce(out, dst=_global_rank(group, dst), op=dist.ReduceOp.SUM, group=group)
        if group_rank(group) != dst:
            # Zeros (not the input) on non-roots: then no output but dst's depends on any input, and the exact
            # backward is just dst's gradient broadcast to every rank.
            out.zero_()
        return out

    @staticmethod
    def backward(ctx, grad):
        is_dst = group_rank(ctx.group) == ctx.dst
        g = _contiguous_copy(grad) if is_dst else torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.broadcast(g, src=_global_rank(ctx.group, ctx.dst), group=ctx.group)
        return g, None, None


# ---- the input collective of column-parallel layers, with a deferred, asynchronous gradient reduction ----------


_REDUCTION_ATTR = "_lp_input_grad_reduction"


class InputGradReduction:
    """The backward reduction of an input collective (all-reduce for ``copy_to_group``, reduce-scatter for an
    all-gather), which the layers reading its output may run themselves, early and asynchronously.

    [Note: the deferred input-gradient reduction]
    Megatron overlaps the all-reduce (reduce-scatter under sequence parallelism) of a column-parallel layer's input
    gradient with that layer's weight-gradient matmul. Here several column layers may read one collective's output
    (q/k/v, gate/up): their input gradients must be summed before the ONE reduction. So a layer that takes part
    ``register()``s in forward and, in backward, hands its input gradient to ``add()`` instead of to autograd;
    the last one to arrive launches the reduction of the sum (``async_op=True``) and computes its weight gradient
    while it runs. The collective's own backward node, which autograd runs after every consumer, ``finish()``es:
    waits, adds the (synchronously reduced) gradient of any consumer that did not take part, and returns the result.
    A consumer whose backward never runs only delays the launch to ``finish``. Nothing differs numerically from the
    plain path but the order of the summation. The reduction runs in the dtype of the gradients handed in (bf16
    under autocast: the layers compute in it).
    """

    def __init__(self, group: ProcessGroup | None, dim: Optional[int], chunks: int = 0) -> None:
        self.group, self.dim, self.chunks = group, dim, chunks
        self.expected = 0
        self._reset()

    def _reset(self) -> None:
        self.arrived = 0
        self.buffer: Optional[torch.Tensor] = None
        self.result: Optional[torch.Tensor] = None
        self.work = None

    def register(self) -> None:
        self.expected += 1

    def add(self, grad: torch.Tensor) -> None:
        """Take one consumer's input gradient (a tensor the caller will not use again: it may become the buffer)."""
        if self.buffer is None:
            self.buffer = grad if grad.is_contiguous() else grad.contiguous()
        else:
            self.buffer.add_(grad)
        self.arrived += 1
        if self.arrived == self.expected:
            self.launch()

    def launch(self, async_op: bool = True) -> None:
        if self.work is not None or self.result is not None or self.buffer is None:
            return
        buf, self.buffer = self.buffer, None
        if self.dim is None:
            # In place: the buffer is our own sum (or a fresh matmul output handed over by its only consumer).
            self.work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=async_op)
            self.result = buf
        else:
            self.result, self.work = _reduce_scatter(buf, self.dim, self.group, async_op=True, chunks=self.chunks)
        if not async_op:
            self._wait()

    def _wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None

    def finish(self, grad: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The input gradient of the collective: the launched reduction plus the reduction of ``grad`` (from the
        consumers that did not take part), in ``dtype``."""
        self.launch(async_op=False)
        self._wait()
        out = self.result
        self._reset()  # a second backward through a retained graph starts over
        if grad is not None:
            extra = (_all_reduce(grad, self.group) if self.dim is None
                     else _reduce_scatter(grad, self.dim, self.group, chunks=self.chunks))
            out = extra if out is None else out.to(extra.dtype) + extra
        return out.to(dtype) if out is not None else None


class _CollectInput(torch.autograd.Function):
    """Identity (``dim`` None) or all-gather along ``dim``; backward: the deferred reduction's ``finish``."""

    @staticmethod
    def forward(ctx, x, dim, group, reduction):
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.dtype = reduction, x.dtype
        return x.view_as(x) if dim is None else _all_gather(x, dim, group, chunks=reduction.chunks)

    @staticmethod
    def backward(ctx, grad):
        return ctx.reduction.finish(grad, ctx.dtype), None, None, None


def input_grad_reduction(x: torch.Tensor) -> Optional[InputGradReduction]:
    """The deferred reduction of the collective that produced ``x`` (:func:`gather_input`,
    :func:`all_gather_along_dim`), or None."""
    return getattr(x, _REDUCTION_ATTR, None)


class _ReduceFromGroupInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---- public API -------------------------------------------------------------------------------------------------


def copy_to_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums) the gradient over ``group``."""
    if group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    if group_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


def split_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None, *, chunks: int = 0) -> torch.Tensor:
    """Keep this rank's contiguous chunk of ``dim`` (``chunks`` >= 1: its blocks of the token layout, see
    [Note: token-sharded sequence parallelism]); backward all-gathers the gradient the same way."""
    size = group_size(group)
    dim = _normalize_dim(x, dim, "split_along_dim")
    _check_divisible(x, dim, size, "split_along_dim")
    if size == 1:
        return x
    return _SplitAlongDim.apply(x, dim, group, chunks)


def gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None, *, chunks: int = 0) -> torch.Tensor:
    """All-gather along ``dim`` (``chunks``: the token layout) for a replicated consumer; backward keeps this rank's
    chunk of the gradient."""
    dim = _normalize_dim(x, dim, "gather_along_dim")
    if group_size(group) == 1:
        return x
    return _GatherAlongDim.apply(x, dim, group, chunks)


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None, *,
                             chunks: int = 0) -> torch.Tensor:
    """Reduce-scatter (sum) along ``dim`` (``chunks``: the token layout); backward all-gathers the gradient."""
    size = group_size(group)
    dim = _normalize_dim(x, dim, "reduce_scatter_along_dim")
    _check_divisible(x, dim, size, "reduce_scatter_along_dim")
    if size == 1:
        return x
    return _ReduceScatterAlongDim.apply(x, dim, group, chunks)


def all_gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None, *,
                         chunks: int = 0) -> torch.Tensor:
    """All-gather along ``dim`` (``chunks``: the token layout) for a sequence-parallel consumer; backward
    reduce-scatters (sums) the gradient."""
    dim = _normalize_dim(x, dim, "all_gather_along_dim")
    if group_size(group) == 1:
        return x
    # The same collective as before; column-parallel layers reading the output may reduce their input gradients
    # themselves, early (see [Note: the deferred input-gradient reduction]); otherwise backward reduce-scatters.
    return gather_input(x, group, dim, chunks=chunks)


def broadcast_from(x: torch.Tensor, src: int, group: ProcessGroup | None) -> torch.Tensor:
    """Broadcast from group rank ``src`` into a new tensor; on other ranks ``x`` is only a shape/dtype template.

    Backward sums the gradient onto ``src``; the other ranks' inputs get zero gradients.
    """
    size = group_size(group)
    _check_root(src, size, "broadcast_from", "src")
    if size == 1:
        return x
    return _BroadcastFrom.apply(x, src, group)


def reduce_to(x: torch.Tensor, dst: int, group: ProcessGroup | None) -> torch.Tensor:
    """Sum-reduce onto group rank ``dst``: the output is the sum on ``dst`` and zeros on every other rank.

    Backward broadcasts ``dst``'s gradient, which becomes every rank's input gradient (other ranks' upstream
    gradients are ignored: their zero outputs do not depend on the inputs).
    """
    size = group_size(group)
    _check_root(dst, size, "reduce_to", "dst")
    if size == 1:
        return x
    return _ReduceTo.apply(x, dst, group)


def reduce_from_group_(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """:func:`reduce_from_group` in place: for a temporary the caller owns (a matmul's output), saves the copy.
    ``x`` must not be a leaf nor saved for backward by the op that made it (a matmul saves its inputs only)."""
    if group_size(group) == 1:
        return x
    return _ReduceFromGroupInPlace.apply(x, group)


def gather_input(x: torch.Tensor, group: ProcessGroup | None, dim: Optional[int] = None, *,
                 chunks: int = 0) -> torch.Tensor:
    """Make a column-parallel layer's input whole: identity (``dim`` None; backward all-reduces the gradient) or
    all-gather along ``dim`` (backward reduce-scatters it), the output carrying an :class:`InputGradReduction`
    (``input_grad_reduction(out)``) through which the layers reading it reduce their summed input gradients
    early and asynchronously. Without such layers it is :func:`copy_to_group` / :func:`all_gather_along_dim`."""
    if group_size(group) == 1:
        return x
    if dim is not None:
        dim = _normalize_dim(x, dim, "gather_input")
    reduction = InputGradReduction(group, dim, chunks)
    out = _CollectInput.apply(x, dim, group, reduction)
    setattr(out, _REDUCTION_ATTR, reduction)
    return out
