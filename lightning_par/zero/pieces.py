"""What a ZeRO engine holds, as pieces of global tensors for checkpoints (see [Note: format] in checkpoint.py):
each piece a flat range of a parameter, kept in the engine's fp32 master shard, and the same range of its optimizer
state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from lightning_par.checkpoint import HeldOptimizer, HeldState, HeldTensor, scalar_device
from lightning_par.pieces import Holding

if TYPE_CHECKING:
    from lightning_par.tensor.layers_1d import ShardSpec
    from lightning_par.zero.engine import ZeroEngine
    from lightning_par.zero.layout import Piece

# A parameter's tensor-parallel cut (its ShardSpec and the tensor rank), or None for a whole one.
Placement = Callable[[torch.nn.Parameter], Optional[tuple["ShardSpec", int]]]


def uncut(p: torch.nn.Parameter) -> None:
    """The placement where no tensor axis cuts anything."""
    return None


def _holding(engine: "ZeroEngine", piece: "Piece", global_name: Callable[[str], str], placement: Placement) -> Holding:
    p = engine.params_by_name[piece.name]
    spec, rank = placement(p) or (None, 0)
    return Holding(global_name(piece.name), tuple(p.shape), spec, rank, (piece.start, piece.stop))


def engine_params(engine: "ZeroEngine", global_name: Callable[[str], str], placement: Placement,
                  keep: Callable[[str], bool] = lambda name: True) -> list[HeldTensor]:
    """This rank's master pieces (``keep``: by the engine's parameter name, which to report)."""
    held = []
    for piece in engine.layout.pieces(engine.rank):
        if keep(piece.name):
            master = engine.chunks[piece.chunk].master
            held.append(HeldTensor(_holding(engine, piece, global_name, placement),
                                   master[piece.shard_offset : piece.shard_offset + piece.numel]))
    return held


def engine_optimizer(engine: "ZeroEngine", optimizer: torch.optim.Optimizer, names: list[list[str]],
                     global_name: Callable[[str], str], placement: Placement,
                     keep: Callable[[str], bool] = lambda name: True) -> HeldOptimizer:
    """``optimizer``'s state of this rank's pieces (``names``: its groups' global names in one process's order)."""
    group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    states = []
    for name, piece, q in engine.optimizer_pieces(optimizer):
        if keep(name):
            states.append(HeldState(
                _holding(engine, piece, global_name, placement),
                lambda piece=piece, q=q: engine.piece_state(optimizer, piece, q),
                lambda state, q=q: optimizer.state.__setitem__(q, state),
                q.device, scalar_device(group_of[id(q)], q)))
    return HeldOptimizer(optimizer, names, states)
