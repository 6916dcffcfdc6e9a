"""What a rank of the module-cutting strategies (pipelines, ``tp1d``, ``hybrid``) holds, for the one checkpoint
path (see [Note: format] in checkpoint.py): each axis contributes what it knows. The pipeline gives every local
parameter its single-process name (stages keep the module's names; a tied copy maps to its first name) and each
optimizer group's names over all stages; the tensor axis gives each shard's ``ShardSpec``; ZeRO, when on, holds
flat ranges of those (tensor-local) parameters instead of the parameters themselves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from lightning_par.checkpoint import HeldOptimizer, HeldState, HeldTensor, Holdings, scalar_device
from lightning_par.pieces import Holding
from lightning_par.zero.pieces import Placement, engine_optimizer, engine_params

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine


def module_holdings(module: nn.Module, canonical: dict[str, str], placement: Placement,
                    optimizers: list[torch.optim.Optimizer],
                    group_names: Callable[[torch.optim.Optimizer, list[list[str]]], list[list[str]]],
                    engine: Optional["ZeroEngine"] = None, buffers: bool = True,
                    keep: Callable[[str], bool] = lambda name: True) -> Holdings:
    """``canonical``: every local parameter name (aliases too) -> its single-process name; ``group_names``: an
    optimizer's local names per group -> the names of those groups over the whole model; ``buffers``: whether this
    rank reports its buffers; ``keep``: which global names this rank reports (a save leaves out copies that
    another rank writes)."""
    ids = {id(p): canonical[n] for n, p in module.named_parameters(remove_duplicate=False)}
    aliases = {n: c for n, c in canonical.items() if n != c}
    model_names = list(dict.fromkeys(canonical.values()))
    local_buffers = dict(module.named_buffers()) if buffers else {}
    if engine is not None:
        name = lambda n: canonical.get(n, n)  # noqa: E731
        keep_engine = lambda n: keep(name(n))  # noqa: E731
        held = [engine_optimizer(engine, o, group_names(o, [[name(n) for n in g] for g in
                                                            engine.optimizer_param_names[o]]), name, placement,
                                 keep_engine) for o in optimizers]
        return Holdings(engine_params(engine, name, placement, keep_engine), model_names, local_buffers, aliases, held)
    params, seen = [], set()
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen and keep(ids[id(p)]):
            seen.add(id(p))
            params.append(HeldTensor(_holding(ids[id(p)], p, placement), p.data))
    held = []
    for o in optimizers:
        states = [HeldState(_holding(ids[id(p)], p, placement), lambda p=p, o=o: o.state.get(p, {}),
                            lambda state, p=p, o=o: o.state.__setitem__(p, state), p.device, scalar_device(g, p))
                  for g in o.param_groups for p in g["params"] if keep(ids[id(p)])]
        held.append(HeldOptimizer(o, group_names(o, [[ids[id(p)] for p in g["params"]] for g in o.param_groups]),
                                  states))
    return Holdings(params, model_names, local_buffers, aliases, held)


def _holding(name: str, p: nn.Parameter, placement: Placement) -> Holding:
    spec, rank = placement(p) or (None, 0)
    return Holding(name, tuple(p.shape), spec, rank)
