"""Collectives on flat buffers, with explicit groups: what ZeRO's chunks need (``zero/`` talks to
``torch.distributed`` only through here). Thin on purpose: each is one torch collective, named for what it does
to a chunk, so that counting or replacing ZeRO's communication happens in one place."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def gather_shards(out: Tensor, shard: Tensor, group: ProcessGroup, async_op: bool = False) -> Optional[Any]:
    """Every rank's ``shard``, in rank order, into ``out`` (``group size x shard`` elements)."""
    return dist.all_gather_into_tensor(out, shard, group=group, async_op=async_op)


def reduce_to_shards(shard: Tensor, full: Tensor, op: Any, group: ProcessGroup, async_op: bool = False
                     ) -> Optional[Any]:
    """``full`` reduced over the group with ``op``; this rank keeps its shard (``full``'s rank-th slice)."""
    return dist.reduce_scatter_tensor(shard, full, op=op, group=group, async_op=async_op)


def all_reduce_(tensor: Tensor, group: ProcessGroup, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """``tensor`` reduced over the group, in place."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_from_first(tensor: Tensor, group: ProcessGroup) -> Tensor:
    """Group rank 0's ``tensor`` on every rank, in place."""
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


def gather_objects(obj: Any, group: ProcessGroup) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def any_rank(flag: bool, group: ProcessGroup, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank of the group."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def every_rank(flag: bool, group: ProcessGroup, device: torch.device) -> bool:
    """Whether ``flag`` is true on every rank of the group."""
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def is_nccl(group: ProcessGroup) -> bool:
    return dist.get_backend(group) == "nccl"
