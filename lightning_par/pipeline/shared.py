"""Parameters that several ranks of one pipeline hold, and the sum of their gradients after backward.

A parameter is held by more than one pipeline rank when it is tied across parts (an embedding shared with the
output layer: part 0 and the last part), when a schedule keeps replicas of a part (Chimera), or when it lives
outside the blocks and their neighbours (kept on every rank). Every holder starts from the same value; after
backward each holder gets the sum of all holders' gradients, added in the same order on every holder, so the
copies receive bit-identical gradients and stay identical through any optimizer step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lightning_par.comm.collectives import group_size
from lightning_par.comm.p2p import post_batch
from lightning_par.pipeline.partition import Partition
from lightning_par.pipeline.schedules import Schedule

__all__ = ["canonical_names", "parameter_holders", "SharedGradients", "optimizer_group_names"]


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Every parameter name of ``module`` (aliases of tied parameters included) -> the name ``named_parameters()``
    reports for that parameter (its first registration)."""
    first: dict[int, str] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def parameter_holders(canonical: dict[str, str], partition: Partition, schedule: Schedule) -> dict[str, tuple[int, ...]]:
    """Canonical parameter name -> the pipeline ranks that hold it (from the full model's names; pure)."""
    parts: dict[str, set[int]] = {}
    for alias, name in canonical.items():
        parts.setdefault(name, set()).update(partition.parts_holding(alias))
    rank_parts = [set(schedule.parts_of(r)) for r in range(schedule.ranks)]
    return {name: tuple(r for r in range(schedule.ranks) if rank_parts[r] & held) for name, held in parts.items()}


class SharedGradients:
    """Sums gradients of the parameters this rank shares with other ranks of ``group`` (pipeline group ranks)."""

    def __init__(self, module: nn.Module, canonical: dict[str, str], holders: dict[str, tuple[int, ...]], rank: int,
                 group: Optional[ProcessGroup]) -> None:
        self.rank = rank
        self.group = group
        local: dict[str, nn.Parameter] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                local.setdefault(canonical[name], p)
        order = list(dict.fromkeys(canonical.values()))  # full-model order, the same on every rank
        self.params = {name: local[name] for name in order if name in local and len(holders[name]) > 1}
        self.holders = {name: holders[name] for name in self.params}
        self.peers = sorted({r for hs in self.holders.values() for r in hs if r != rank})

    def __bool__(self) -> bool:
        return bool(self.params)

    @torch.no_grad()
    def sum_(self) -> None:
        """Give every shared parameter the sum of its holders' gradients (``None`` only if no holder had one).

        All of this rank's sends and receives go in one ``batch_isend_irecv``: NCCL runs them as one group, so two
        holders exchanging with each other (and with others) cannot block each other as separate operations can
        (see [Note: NCCL's in-order rule] in ``lightning_par/pipeline/simulate.py``). Every holder sends the same
        parameters in the same order, so a receive's size is known: no metadata, no host read."""
        if not self.params:
            return
        own = {name: self._flat(p) for name, p in self.params.items()}
        ops, received = [], {}
        for peer in self.peers:
            names = [n for n in self.params if peer in self.holders[n]]
            flat = torch.cat([own[n] for n in names])
            received[peer] = (names, torch.empty_like(flat))
            ops += [(True, flat, peer, 0), (False, received[peer][1], peer, 0)]
        for work in post_batch(ops, self.group):
            work.wait()  # on NCCL a stream wait; on gloo the host waits
        theirs: dict[tuple[str, int], torch.Tensor] = {}
        for peer, (names, flat) in received.items():
            offset = 0
            for n in names:
                size = own[n].numel()
                theirs[(n, peer)] = flat[offset: offset + size]
                offset += size
        for name, p in self.params.items():
            total = None
            for holder in self.holders[name]:  # fixed order: identical sums on every holder
                part = own[name] if holder == self.rank else theirs[(name, holder)]
                total = part.clone() if total is None else total.add_(part)
            assert total is not None
            grad = total[:-1].view_as(p)
            # A local gradient decides without reading the device; only a holder without one reads the flag.
            if p.grad is None and not bool(total[-1] > 0):
                continue
            if p.grad is None:
                p.grad = grad.to(p.dtype)
            else:
                p.grad.copy_(grad)

    @staticmethod
    def _flat(p: nn.Parameter) -> torch.Tensor:
        # One trailing flag: does this holder have a gradient (so "no gradient anywhere" stays None).
        grad = p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        flag = torch.ones(1, dtype=grad.dtype, device=grad.device) * (p.grad is not None)
        return torch.cat([grad, flag])


def optimizer_group_names(local: list[list[str]], order: dict[str, int], group: Optional[ProcessGroup]
                          ) -> list[list[str]]:
    """Each optimizer group's canonical parameter names over the whole pipeline, in module order, as one process
    numbers them (a collective over ``group``; ``local``: this stage's names per group). It assumes what
    ``configure_optimizers`` usually does: the same groups on every stage, built from the stage's parameters."""
    everyone = [local]
    if group_size(group) > 1:
        everyone = [None] * group_size(group)
        dist.all_gather_object(everyone, local, group=group)
    if len({len(groups) for groups in everyone}) != 1:
        raise ValueError("The stages built optimizers with different numbers of parameter groups; checkpoints of a "
                         "pipeline need the same groups on every stage.")
    return [sorted({n for groups in everyone for n in groups[g]}, key=order.__getitem__) for g in range(len(local))]
