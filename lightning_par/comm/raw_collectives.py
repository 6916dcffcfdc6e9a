"""The collectives without autograd that ``collectives.py`` builds on: group helpers, the fused all-gather and
reduce-scatter along any dim (one preallocated buffer, no copy where the layout allows), and the token layout of
sequence parallelism."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


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
