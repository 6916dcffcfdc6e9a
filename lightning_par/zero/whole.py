"""Whole optimizer state out of a ZeRO engine's pieces, on every rank: at the end of ``fit`` under ``hybrid``, the
optimizer becomes an ordinary optimizer of the whole module again (:func:`unshard_optimizer`). Costs one model's
worth of optimizer state on every rank of the data group, once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_par.comm.flat import all_reduce_, gather_objects

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine


@torch.no_grad()
def whole_optimizer_state(engine: "ZeroEngine", optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer``'s state as one process numbers it (parameters in the order the user built the groups), each
    tensor whole and shaped like its parameter, on the host: the pieces of every rank summed over the group (they
    are disjoint, the rest is zero)."""
    names = engine.optimizer_param_names[optimizer]
    shapes = {n: p.shape for n, p in engine.params_by_name.items()}
    mine: dict[str, dict[str, Any]] = {}  # name -> state key -> (dtype, scalar value or None)
    for name, piece, q in engine.optimizer_pieces(optimizer):
        for key, value in engine.piece_state(optimizer, piece, q).items():
            if isinstance(value, Tensor):
                mine.setdefault(name, {})[key] = (value.dtype, value.clone().cpu() if value.dim() == 0 else None)
    described = [mine]
    if engine.world_size > 1:
        described = gather_objects(mine, engine.group)
    keys: dict[str, dict[str, Any]] = {}
    for part in described:
        for name, entries in part.items():
            keys.setdefault(name, {}).update(entries)
    ordered = [n for group in names for n in group]
    # The same order on every rank (the user's parameter order, then the key): one buffer per dtype, summed by one
    # all-reduce, each state tensor a view of it.
    wanted = [(name, key, dtype) for name in ordered if name in keys
              for key, (dtype, scalar) in sorted(keys[name].items()) if scalar is None]
    flat: dict[tuple[str, str], Tensor] = {}
    for dtype in dict.fromkeys(d for _, _, d in wanted):
        members = [(name, key) for name, key, d in wanted if d == dtype]
        buffer = torch.zeros(sum(shapes[name].numel() for name, _ in members), dtype=dtype, device=engine.device)
        flat.update(zip(members, buffer.split([shapes[name].numel() for name, _ in members])))
        for name, piece, q in engine.optimizer_pieces(optimizer):
            for key, value in engine.piece_state(optimizer, piece, q).items():
                if (name, key) in flat and flat[(name, key)].dtype == dtype:
                    flat[(name, key)][piece.start : piece.stop].copy_(value.reshape(-1))
        if engine.world_size > 1:
            all_reduce_(buffer, engine.group)
    state = {}
    for i, name in enumerate(ordered):
        if name in keys:
            state[i] = {key: scalar if scalar is not None else flat[(name, key)].reshape(shapes[name]).cpu()
                        for key, (_, scalar) in keys[name].items()}
    groups, start = [], 0
    for group, members in zip(optimizer.param_groups, names):
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(members)))})
        start += len(members)
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def unshard_optimizer(engine: "ZeroEngine", optimizer: torch.optim.Optimizer) -> None:
    """Point ``optimizer`` back at the module's parameters, with their whole state (a collective over the engine's
    group): after fit it is an ordinary optimizer of an ordinary module again. Call after ``engine.unshard()``."""
    state = whole_optimizer_state(engine, optimizer)
    for group, names in zip(optimizer.param_groups, engine.optimizer_param_names[optimizer]):
        group["params"] = [engine.params_by_name[n] for n in names]
    optimizer.state.clear()
    optimizer.load_state_dict(state)
