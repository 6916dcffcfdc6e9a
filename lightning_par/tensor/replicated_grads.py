"""The gradients of replicated parameters inside sequence-parallel regions, summed over the tensor group at once.

[Note: one coalesced sum of the replicated gradients]
Under sequence parallelism a norm (or a row-parallel bias) acts on this rank's sequence shard, so it gets the
gradient of this rank's tokens only: the full gradient is the sum over the tensor group (Megatron:
``allreduce_layernorm_grads``). Rather than one blocking all-reduce per parameter in every backward (about six per
block, each latency-bound and serialised into backward), :meth:`ReplicatedGradSum.reduce` runs once after a backward
that synchronises gradients (the strategy's ``post_backward``, next to the data-parallel buckets' ``finish``): ONE
all-reduce of all these gradients, flattened.

It reduces the accumulated ``.grad``, which must count every backward's contribution once, also when several
synchronising backward calls feed one optimizer step (manual optimization: backward, backward, step): after the
first, ``.grad`` holds an already reduced part R, the same on every rank, and a sum would count it t times. An
average would not: mean(R + x) = R + mean(x) (why the data-parallel average is right in every case). So a local
gradient hook (no communication) scales each backward's contribution c by t before autograd accumulates it, and
``reduce`` averages: mean(R + t c) = R + sum(c). This holds whatever happened to ``.grad`` in between (zeroed, set to
None, accumulation steps that skip the reduce), with nothing to remember about optimizer steps. Between reduces
(what ``on_after_backward`` sees on an accumulation step) ``.grad`` holds t times this rank's contribution, as it
holds this rank's own, not yet averaged, contribution under data parallelism; clipping and the optimizer read it
after the reduce. The scale and the mean are exact in floating point when t is a power of two. Both the sum and the
data-parallel mean are linear, so their order does not matter.

Every rank of the group must issue the same collective: a parameter without a gradient on this rank contributes
zeros, and one flag per parameter (1: has a gradient) travels with the values, so a parameter gets the sum when any
rank had a gradient and keeps ``None`` when none had. The flags are read back (the only host synchronisation) only
when this rank lacks some gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lightning_par.comm.collectives import mean_op
from lightning_par.tensor.layers_1d import TensorGroup


class ReplicatedGradSum:
    """Sums the gradients of ``params`` over the tensor group ``tg`` in one all-reduce per dtype and device; see
    [Note: one coalesced sum of the replicated gradients]. Call :meth:`reduce` on every rank of the group after each
    backward whose gradients the optimizer (or clipping) will read; ``handles`` are the hooks to remove."""

    def __init__(self, params: list[nn.Parameter], tg: TensorGroup) -> None:
        self.params = params
        self.tg = tg  # rebinding the plan to new process groups updates it in place
        size = tg.size
        self.handles = [p.register_hook(lambda grad: grad * size) for p in params]  # not in place: autograd owns it

    @torch.no_grad()
    def reduce(self) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), params in groups.items():  # the same order on every rank: the parameters' order
            self._reduce(params, dtype, device)

    def _reduce(self, params: list[nn.Parameter], dtype: torch.dtype, device: torch.device) -> None:
        has = [p.grad is not None for p in params]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flags = (torch.ones(len(params), dtype=dtype, device=device) if all(has)
                 else torch.tensor(has, dtype=dtype, device=device))
        flat = _flatten_dense_tensors([*grads, flags])
        _all_reduce_mean(flat, self.tg)
        *values, flags = _unflatten_dense_tensors(flat, [*grads, flags])
        anyone = flags.gt(0).tolist() if not all(has) else has  # read back only when this rank lacks a gradient
        for p, value, here, there in zip(params, values, has, anyone):
            if here:
                p.grad.copy_(value)
            elif there:
                p.grad = value


def _all_reduce_mean(flat: Tensor, tg: TensorGroup) -> None:
    op, divide_first = mean_op(tg.group)
    if divide_first:
        flat.div_(tg.size)
    dist.all_reduce(flat, op=op, group=tg.group)


@torch.no_grad()
def mean_over_group(grads: list[Tensor], tg: TensorGroup, device: torch.device) -> None:
    """Average ``grads`` in place over the tensor group, in one all-reduce per dtype, on ``device``.

    For gradients that left ``.grad`` before :meth:`ReplicatedGradSum.reduce` could see them (ZeRO's shard
    gradients of the replicated parameters): their hook scaled each contribution by the group size, so the mean is
    the sum of the note above. Every rank of the group passes the same pieces (ZeRO lays out every tensor rank's
    module alike)."""
    if tg.size == 1:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype in sorted(by_dtype, key=str):
        members = by_dtype[dtype]
        flat = _flatten_dense_tensors([g.to(device) for g in members])
        _all_reduce_mean(flat, tg)
        for g, value in zip(members, _unflatten_dense_tensors(flat, members)):
            g.copy_(value)
