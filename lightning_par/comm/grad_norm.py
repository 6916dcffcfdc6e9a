"""One gradient norm over every parallel axis, and clipping by it.

[Note: the global norm from parts]
Clipping by norm needs the norm of the whole model's gradient, but a rank holds only part of it, cut differently by
each parallelism: tensor parallelism splits a weight across the tensor group, ZeRO splits flat ranges across the
data group, a pipeline stage holds some layers, and data-parallel replicas hold the same (averaged) gradient. Each
parallelism therefore describes its gradients as ``NormPart``s: the local pieces, and the groups across which the
pieces are disjoint parts of the same tensors (their p-th powers are summed over those groups). A piece that other
ranks hold identically (a replica) names no group for that axis: it is counted once, not once per replica. A copy
whose value is already counted elsewhere (the second holder of a tied weight) has ``counted=False``: clipping
scales it, the norm leaves it out. Composed parallelisms list every axis a piece is split on: a ZeRO range of a
tensor-parallel shard sums over both groups.

``clip_by_global_norm_`` is the one clipping path of every strategy; the p-th powers of parts that sum over the
same groups travel in one all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class NormPart:
    """Some of this rank's gradients, and how they add up to the global norm (see the note above)."""

    grads: Sequence[Tensor]
    sum_over: tuple[Optional[dist.ProcessGroup], ...] = ()
    counted: bool = True


def _local_power(grads: Sequence[Tensor], norm_type: float, device: torch.device) -> Tensor:
    """sum |g|^p over ``grads`` (max |g| for the inf-norm), as a float32 scalar on ``device``."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = torch.nn.utils.get_total_norm(grads, norm_type).to(device=device, dtype=torch.float32)
    return norm if norm_type == float("inf") else norm.pow(norm_type)


def global_norm(parts: Sequence[NormPart], norm_type: float = 2.0,
                device: Optional[torch.device] = None) -> Tensor:
    """The p-norm of the whole model's gradient from every rank's ``parts`` (a collective over their groups: every
    rank calls it with parts naming the same groups in the same order). Reduced on ``device`` (NCCL needs the GPU
    for host-held gradients); the result is a float32 scalar there."""
    norm_type = float(norm_type)
    if norm_type <= 0:
        raise ValueError(f"`norm_type` must be a positive number or 'inf'; got {norm_type}")
    inf = norm_type == float("inf")
    counted = [part for part in parts if part.counted]
    if device is None:
        device = next((g.device for part in counted for g in part.grads), torch.device("cpu"))
    by_groups: dict[tuple, list[Tensor]] = {}
    for part in counted:
        groups = tuple(g for g in part.sum_over if g is not None and dist.get_world_size(g) > 1)
        by_groups.setdefault(groups, []).extend(part.grads)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for groups, grads in by_groups.items():
        power = _local_power(grads, norm_type, device)
        for group in groups:
            dist.all_reduce(power, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
        total = torch.maximum(total, power) if inf else total + power
    return total if inf else total.pow(1.0 / norm_type)


@torch.no_grad()
def clip_by_global_norm_(parts: Sequence[NormPart], max_norm: float, norm_type: float = 2.0,
                         device: Optional[torch.device] = None) -> Tensor:
    """Scale every gradient of ``parts`` (counted or not) in place so that the global norm is at most
    ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` does in one process; return the norm before clipping.
    No host sync: the scale stays a tensor."""
    norm = global_norm(parts, norm_type, device)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    by_device: dict[torch.device, list[Tensor]] = {}
    for part in parts:
        for g in part.grads:
            by_device.setdefault(g.device, []).append(g)
    for where, grads in by_device.items():
        torch._foreach_mul_(grads, scale.to(where))
    return norm
