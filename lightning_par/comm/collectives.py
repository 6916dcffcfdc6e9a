"""Autograd-aware collectives: each op's backward is the mirror collective of its forward.

Every op takes its process group explicitly and is a pass-through (the input object itself, no autograd node, no
communication) when the group has a single rank. As with any collective, every rank of the group must call the op
in the same order, and every rank must backpropagate through its output (backward runs a collective too): give the
inputs the same ``requires_grad`` on all ranks of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = [
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
]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup | None) -> int:
    # None without an initialised default group means "this process alone": lets single-process code call layers.
    if group is None and not _dist_ready():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if group is None and not _dist_ready():
        return 0
    return dist.get_rank(group)


def _global_rank(group: ProcessGroup | None, rank: int) -> int:
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


# torch 2.13 renamed the fused collectives to *_single and deprecated the *_tensor names (FutureWarning per call);
# 2.11 only has the *_tensor names. Looked up per call so tests can intercept them. gloo implements both since
# torch 2.2 (reduce-scatter internally as all-reduce + own chunk), so no gloo-specific fallback is needed.
def _all_gather_fused():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_fused():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _contiguous_copy(x: torch.Tensor) -> torch.Tensor:
    # In-place collectives must never write into the caller's tensor (or a user-provided upstream gradient).
    return x.clone(memory_format=torch.contiguous_format)


def _normalize_dim(x: torch.Tensor, dim: int, op: str) -> int:
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _check_divisible(x: torch.Tensor, dim: int, size: int, op: str) -> None:
    if x.size(dim) % size:
        raise ValueError(
            f"{op}: dim {dim} has size {x.size(dim)}, which group size {size} does not divide "
            f"(tensor shape {tuple(x.shape)})"
        )


def _check_root(root: int, size: int, op: str, name: str) -> None:
    if not 0 <= root < size:
        raise ValueError(f"{op}: {name}={root} is not a rank of a group of size {size}")


# ---- raw (non-autograd) building blocks ------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    out = _contiguous_copy(x)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _own_chunk(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    length = x.size(dim) // size
    # A copy, not a view: a view of a custom Function's input would forbid in-place ops on the output.
    return _contiguous_copy(x.narrow(dim, group_rank(group) * length, length))


def _all_gather(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    # The fused collective concatenates along dim 0: move `dim` there and back.
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((size * xt.size(0),) + tuple(xt.shape[1:]))
    _all_gather_fused()(out, xt, group=group)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((xt.size(0) // size,) + tuple(xt.shape[1:]))
    _reduce_scatter_fused()(out, xt, op=dist.ReduceOp.SUM, group=group)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


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
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _own_chunk(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is replicated: every rank holds the full gradient already, keep our slice.
        return _own_chunk(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _AllGatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        # The consumer is sequence-parallel: each rank holds a partial gradient of the whole, so sum then keep ours.
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


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


def split_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's contiguous chunk of ``dim``; backward all-gathers the gradient along ``dim``."""
    size = group_size(group)
    dim = _normalize_dim(x, dim, "split_along_dim")
    _check_divisible(x, dim, size, "split_along_dim")
    if size == 1:
        return x
    return _SplitAlongDim.apply(x, dim, group)


def gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather along ``dim`` for a replicated consumer; backward keeps this rank's chunk of the gradient."""
    dim = _normalize_dim(x, dim, "gather_along_dim")
    if group_size(group) == 1:
        return x
    return _GatherAlongDim.apply(x, dim, group)


def reduce_scatter_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Reduce-scatter (sum) along ``dim``; backward all-gathers the gradient along ``dim``."""
    size = group_size(group)
    dim = _normalize_dim(x, dim, "reduce_scatter_along_dim")
    _check_divisible(x, dim, size, "reduce_scatter_along_dim")
    if size == 1:
        return x
    return _ReduceScatterAlongDim.apply(x, dim, group)


def all_gather_along_dim(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """All-gather along ``dim`` for a sequence-parallel consumer; backward reduce-scatters (sums) the gradient."""
    dim = _normalize_dim(x, dim, "all_gather_along_dim")
    if group_size(group) == 1:
        return x
    return _AllGatherAlongDim.apply(x, dim, group)


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
