"""Autograd-aware collectives: each op's backward is the mirror collective of its forward.

Every op takes its process group explicitly and is a pass-through (the input object itself, no autograd node, no
communication) when the group has a single rank. As with any collective, every rank of the group must call the op
in the same order, and every rank must backpropagate through its output (backward runs a collective too): give the
inputs the same ``requires_grad`` on all ranks of the group.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

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


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_op(group: ProcessGroup | None) -> tuple[dist.ReduceOp, bool]:
    """How to average over ``group``: the reduce op, and whether the input must first be divided by the group size.
    NCCL averages inside the reduction (``AVG``: no extra pass over the data); gloo has no ``AVG``, so the input is
    divided first and then summed (the same mean)."""
    if dist.get_backend(group) == "nccl":
        return dist.ReduceOp.AVG, False
    return dist.ReduceOp.SUM, True


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
def all_gather_fused():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def reduce_scatter_fused():
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

# [Note: token-sharded sequence parallelism]
# Sequence parallelism splits the activations between blocks over the tensor group. Split along the sequence dim of
# a batch-first ``[B, T, C]`` tensor, each rank's piece is strided (B runs of T/t tokens), so every all-gather needs
# a copy to put the rank blocks in place and every reduce-scatter a copy to take them out: a whole activation moved
# twice per collective, four collectives per block. In the token layout (``chunks`` >= 1) the ranks hold blocks of
# the ``N = B*T`` tokens in memory order instead (the flattened dims ``0..dim``), viewed in the shape the user's code
# expects (``[B, T/t, C]``): the N tokens are cut into ``k`` chunks of ``t`` blocks each, and rank r holds block r of
# every chunk (``k = 1``: tokens ``[r*N/t, (r+1)*N/t)``). That is how the fused collectives cut memory, so a chunk
# is one all-gather or reduce-scatter and nothing is copied. Chunks let a layer overlap the collective of one chunk
# with the matmul of the next (see ``RowParallelLinear``). Every op between the split and the gather (norms,
# dropout, residual adds, the MLP) works token by token and does not care which tokens a rank holds; the ops that
# mix tokens (attention) run on the gathered, whole sequence. Megatron gets ``k = 1`` for free from its
# sequence-first ``[T, B, C]`` layout. ``k`` is ``chunks`` when the tokens divide into ``chunks * t`` blocks, else 1:
# every site computes it from the same N, so all agree.


def token_chunks(tokens: int, size: int, chunks: int) -> int:
    """How many chunks a token layout asking for ``chunks`` uses for ``tokens`` tokens over ``size`` ranks."""
    return chunks if chunks > 1 and tokens % (chunks * size) == 0 else 1


class _Works:
    """Several async collectives waited as one."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    out = _contiguous_copy(x)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _leading(x: torch.Tensor, dim: int) -> int:
    return math.prod(x.shape[:dim])


def _resized(x: torch.Tensor, dim: int, *, times: int = 1, over: int = 1) -> list[int]:
    """``x``'s shape with ``dim`` multiplied by ``times`` and divided by ``over`` (integers: no float rounding)."""
    shape = list(x.shape)
    shape[dim] = shape[dim] * times // over
    return shape


def _own_chunk(x: torch.Tensor, dim: int, group: ProcessGroup | None, chunks: int = 0) -> torch.Tensor:
    size, rank = group_size(group), group_rank(group)
    length = x.size(dim) // size
    if chunks:  # block ``rank`` of every chunk of the tokens, in ``x``'s shape with ``dim`` cut down
        k = token_chunks(_leading(x, dim + 1), size, chunks)
        blocks = x.reshape(k, size, -1)[:, rank]
        return _contiguous_copy(blocks).view(_resized(x, dim, over=size))
    # A copy, not a view: a view of a custom Function's input would forbid in-place ops on the output.
    return _contiguous_copy(x.narrow(dim, rank * length, length))


def _all_gather(x: torch.Tensor, dim: int, group: ProcessGroup | None, async_op: bool = False, chunks: int = 0):
    """All-gather along ``dim`` into one preallocated buffer. The fused collective concatenates along dim 0, which
    is ``dim`` itself when every dim before it has size 1 (no copy at all); otherwise one copy puts the rank blocks
    in place (``[B, t, T/t, C] -> [B, T, C]``), unless ``chunks`` (the token layout: one collective per chunk, never
    a copy; see [Note: token-sharded sequence parallelism]). With ``async_op`` returns ``(finish, work)``:
    ``finish()`` gives the result once ``work`` is done."""
    size = group_size(group)
    xc = x.contiguous()
    kwargs = {"async_op": True} if async_op else {}
    shape = _resized(xc, dim, times=size)
    if chunks:
        k = token_chunks(_leading(xc, dim + 1) * size, size, chunks)
        pieces = xc.view(k, -1)
        buf = xc.new_empty((k, size * pieces.size(1)))
        work = _Works([all_gather_fused()(buf[c], pieces[c], group=group, **kwargs) for c in range(k)])
        return ((lambda: buf.view(shape)), work) if async_op else buf.view(shape)
    buf = xc.new_empty((size * xc.size(0),) + tuple(xc.shape[1:])) if xc.dim() else xc.new_empty((size,))
    work = all_gather_fused()(buf, xc, group=group, **kwargs)

    def finish() -> torch.Tensor:
        if dim == 0 or _leading(xc, dim) == 1:
            return buf.view(shape)
        return buf.view((size,) + tuple(xc.shape)).movedim(0, dim).reshape(shape)

    return (finish, work) if async_op else finish()


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None, async_op: bool = False,
                    chunks: int = 0):
    """Reduce-scatter (sum) along ``dim``: no copy in the token layout (``chunks``: one collective per chunk), when
    every dim before ``dim`` has size 1 (or ``dim`` is 0) and ``x`` is contiguous, else one copy of the input into
    rank-major order. With ``async_op`` returns ``(out, work)``: ``out`` holds the result once ``work`` is done."""
    size = group_size(group)
    xc = x.contiguous()
    kwargs = {"async_op": True} if async_op else {}
    out_shape = _resized(xc, dim, over=size)
    if chunks:
        k = token_chunks(_leading(xc, dim + 1), size, chunks)
        pieces = xc.view(k, -1)
        out = xc.new_empty((k, pieces.size(1) // size))
        work = _Works([reduce_scatter_fused()(out[c], pieces[c], op=dist.ReduceOp.SUM, group=group, **kwargs)
                       for c in range(k)])
        return (out.view(out_shape), work) if async_op else out.view(out_shape)
    if dim == 0 or _leading(xc, dim) == 1:
        inp = xc
    else:
        split = list(xc.shape[:dim]) + [size, out_shape[dim]] + list(xc.shape[dim + 1:])
        inp = xc.view(split).movedim(dim, 0).contiguous()
    out = xc.new_empty(out_shape)
    inp = inp.reshape((size * out.size(0),) + tuple(out.shape[1:]))
    work = reduce_scatter_fused()(out, inp, op=dist.ReduceOp.SUM, group=group, **kwargs)
    return (out, work) if async_op else out


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
