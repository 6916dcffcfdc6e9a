"""Whole-model state for pipeline checkpoints: gathered from the stages for saving, cut to a stage for loading.

[Note: the interim checkpoint path of the pipeline strategies]
A pipeline checkpoint is Lightning's standard single file, written by global rank 0: the full model state dict with
the original names (each stage's part gathered over the pipeline group) and each optimizer's state numbered as a
single process would number it (parameter groups in order, parameters in module order). It therefore loads in one
process or under ``dp``, and a ``dp`` or single-process checkpoint loads under any pipeline schedule and size: each
stage keeps the entries of its parameters. The optimizer mapping assumes what ``configure_optimizers`` usually
does: the same parameter groups on every stage, each listing its parameters in module order (as filtering
``self.parameters()`` does). The number of groups is checked, and the group sizes when a checkpoint is loaded. Replicated parameters
(tied across stages, Chimera's replicas) are stored once. Only the pipeline group of global rank 0 gathers: the
other data-parallel replicas hold the same values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from lightning_par.comm.collectives import group_rank, group_size

__all__ = ["gather_state_dict", "local_state_dict", "OptimizerLayout"]


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _gather_union(mine: dict, group: Optional[ProcessGroup]) -> Optional[dict]:
    """The union of every rank's dict on group rank 0 (the first rank's entry wins; None on other ranks).
    Shared entries are equal on all their holders, so which one wins does not matter."""
    parts: Optional[list[Any]] = [mine]
    if group_size(group) > 1:
        parts = [None] * group_size(group) if group_rank(group) == 0 else None
        dist.gather_object(mine, parts, dst=dist.get_global_rank(group, 0), group=group)
    if parts is None:
        return None
    union: dict = {}
    for part in parts:
        for key, value in part.items():
            union.setdefault(key, value)
    return union


def gather_state_dict(module: nn.Module, group: Optional[ProcessGroup], takes_part: bool,
                      state: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The full state dict on pipeline rank 0 of the participating group; ``{}`` on other ranks.

    ``takes_part``: whether this rank's pipeline group gathers (only global rank 0's group does); ``state``: this
    stage's entries, by default ``module.state_dict()`` (another component may have made them whole first)."""
    if not takes_part:
        return {}
    state = module.state_dict() if state is None else state
    full = _gather_union({k: _to_cpu(v) for k, v in state.items()}, group)
    return full if full is not None else {}


def local_state_dict(module: nn.Module, full: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a full state dict that this stage holds; raises naming any the checkpoint lacks."""
    own = module.state_dict().keys()
    missing = [k for k in own if k not in full]
    if missing:
        raise KeyError(f"The checkpoint lacks {len(missing)} entries this pipeline stage holds, e.g. {missing[:3]}.")
    return {k: full[k] for k in own}


class OptimizerLayout:
    """Where each local optimizer entry sits in the single-process numbering (see the note above)."""

    def __init__(self, optimizer: torch.optim.Optimizer, names: Mapping[int, str], order: Mapping[str, int],
                 group: Optional[ProcessGroup], params: Optional[list[list[nn.Parameter]]] = None) -> None:
        """``names``: id(parameter) -> canonical name; ``order``: canonical name -> position in the full model;
        ``params``: the parameters of each of the optimizer's groups, when it holds something else (ZeRO's pieces)."""
        # Local entries are found by name, in any order (a tied parameter may come last on the last stage).
        groups = params if params is not None else [pg["params"] for pg in optimizer.param_groups]
        self.local: list[list[str]] = [[names[id(p)] for p in members] for members in groups]
        everyone = [self.local] if group_size(group) == 1 else [None] * group_size(group)
        if group_size(group) > 1:
            dist.all_gather_object(everyone, self.local, group=group)
        if len({len(groups) for groups in everyone}) != 1:
            raise ValueError("The stages built optimizers with different numbers of parameter groups; the pipeline "
                             "checkpoint needs the same groups on every stage.")
        self.full: list[list[str]] = []
        for g in range(len(self.local)):
            members = {n for groups in everyone for n in groups[g]}
            self.full.append(sorted(members, key=order.__getitem__))
        offsets, start = [], 0
        for members in self.full:
            offsets.append(start)
            start += len(members)
        self.index = {(g, n): offsets[g] + i for g, members in enumerate(self.full) for i, n in enumerate(members)}

    def gather(self, optimizer: torch.optim.Optimizer, group: Optional[ProcessGroup], takes_part: bool,
               state: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The single-process optimizer state dict on pipeline rank 0 of the participating group; ``{}`` elsewhere
        (``state``: this stage's, by default ``optimizer.state_dict()``)."""
        if not takes_part:
            return {}
        state = optimizer.state_dict() if state is None else state
        mine, position = {}, 0
        for g, names in enumerate(self.local):
            for name in names:
                if position in state["state"]:
                    mine[self.index[(g, name)]] = {k: _to_cpu(v) for k, v in state["state"][position].items()}
                position += 1
        merged = _gather_union(mine, group)
        if merged is None:
            return {}
        param_groups = [{**{k: v for k, v in pg.items() if k != "params"},
                         "params": [self.index[(g, n)] for n in self.full[g]]}
                        for g, pg in enumerate(state["param_groups"])]
        return {"state": dict(sorted(merged.items())), "param_groups": param_groups}

    def cut(self, full: Mapping[str, Any]) -> dict[str, Any]:
        """This stage's optimizer state dict out of a single-process one (from a pipeline, ``dp`` or one process)."""
        groups = full["param_groups"]
        if len(groups) != len(self.full) or any(len(pg["params"]) != len(m) for pg, m in zip(groups, self.full)):
            raise ValueError(
                f"The checkpoint's optimizer has groups of {[len(pg['params']) for pg in groups]} parameters; this "
                f"model's optimizer has {[len(m) for m in self.full]}. Was it saved with the same configure_optimizers?"
            )
        state, param_groups, position = {}, [], 0
        for g, names in enumerate(self.local):
            saved_ids = groups[g]["params"]
            local_ids = []
            for name in names:
                saved = saved_ids[self.full[g].index(name)]
                if saved in full["state"]:
                    state[position] = full["state"][saved]
                local_ids.append(position)
                position += 1
            param_groups.append({**{k: v for k, v in groups[g].items() if k != "params"}, "params": local_ids})
        return {"state": state, "param_groups": param_groups}
