"""The automatic plan for 2D tensor parallelism: the modules the 1D automatic plan finds, cut on a q x q grid.

The 1D plan (``tensor/auto_plan.py``) already knows which modules of a standard model are the attention and MLP
linears (with the widths of a fused q/k/v), which block attributes count heads, which embedding holds the tokens and
which linear is the output layer. In 2D every one of them becomes a 2D layer, and so must everything else on the
hidden stream, because its activations are split in both dims (see ``tensor/layers_2d.py``):

- column- and row-parallel linears -> ``Linear2D`` (a fused output's pieces kept whole per block);
- the head counts and widths a block reads -> divided by q (a column holds 1/q of the heads);
- the token embedding -> ``VocabParallelEmbedding2D``, sharing the output layer's weight when the model ties them;
- the output layer -> ``Output2D`` (its logits present the whole [batch, ..., vocab] shape to the loss);
- every other ``nn.Embedding`` (positions) -> ``Embedding2D``, every ``nn.LayerNorm`` -> ``LayerNorm2D``, every RMS
  norm -> ``RMSNorm2D``.

A linear the plan does not name cannot stay whole on split activations: it is refused by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from lightning_par.comm.summa import Grid2D
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.layers_1d import linear_dims
from lightning_par.tensor.plan import move_optimizers
from lightning_par.tensor.layers_2d import (
    Embedding2D,
    LayerNorm2D,
    Linear2D,
    Output2D,
    RMSNorm2D,
    VocabParallelEmbedding2D,
    cut_2d,
)
from lightning_par.tensor.styles import ColwiseParallel, ParallelBlock, RowwiseParallel, VocabParallel, indivisible
from lightning_par.tensor.styles import divisors

_2D_LAYERS = (Linear2D, Embedding2D, VocabParallelEmbedding2D, LayerNorm2D, RMSNorm2D)


def _is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm")
                                              and isinstance(getattr(module, "weight", None), nn.Parameter))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _segments(style: Union[ColwiseParallel, RowwiseParallel]) -> Union[int, tuple[int, ...], None]:
    return getattr(style, "segments", None)  # a fused output (q/k/v): its pieces, or how many equal ones


PLAN_2D_ATTR = "_tensor_parallel_plan_2d"


@dataclass
class Applied2D:
    """What :func:`parallelize_2d` did to a module (kept on it, ``PLAN_2D_ATTR``), so that it can be undone."""

    grid: Grid2D
    entries: list[tuple[str, str]] = field(default_factory=list)
    replaced: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, the original module)
    divided: list[tuple[nn.Module, str, int]] = field(default_factory=list)  # (block, attribute, original value)
    originals: dict[int, nn.Parameter] = field(default_factory=dict)  # id(2D parameter) -> the original one

    def describe(self) -> str:
        q, d = self.grid.q, self.grid.d
        where = f"tp2d plan on a {q} x {q} grid" if d == 1 else f"tp2.5d plan on {d} layers of a {q} x {q} grid"
        lines = [f"{where}:"] + [f"  {name}: {what}" for name, what in self.entries]
        return "\n".join(lines)


def applied_plan_2d(root: nn.Module) -> Optional[Applied2D]:
    return getattr(root, PLAN_2D_ATTR, None)


def parallelize_2d(root: nn.Module, grid: Grid2D) -> list[tuple[str, str]]:
    """Cut ``root`` in place for the q x q ``grid`` by the automatic plan; return (module name, what it became).
    The original modules are kept, their parameters emptied, so that :func:`unparallelize_2d` can undo it."""
    if applied_plan_2d(root) is not None:
        raise RuntimeError("This module is already cut for 2D tensor parallelism.")
    automatic = auto_plan(root)
    q = grid.q
    automatic.check(q)  # every head count and width the plan splits divides by q, or an error naming the sizes
    applied = Applied2D(grid)
    entries = applied.entries
    plan = automatic.plan
    linears = {name: style for name, style in plan.items() if isinstance(style, (ColwiseParallel, RowwiseParallel))}
    vocab = [name for name, style in plan.items() if isinstance(style, VocabParallel)]
    outputs = [name for name in vocab if linear_dims(root.get_submodule(name)) is not None]
    tables = [name for name in vocab if isinstance(root.get_submodule(name), nn.Embedding)]

    # Refused before anything is cut: a linear layer the plan does not name.
    for name, module in root.named_modules():
        if linear_dims(module) is not None and name not in linears and name not in outputs:
            raise ValueError(f"2D tensor parallelism: the linear layer {name!r} is not part of an attention or MLP "
                             "block the automatic plan recognises, and a linear cannot stay whole on activations "
                             "split in both dims. Use tensor_mode='1d' for this model.")

    def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
        applied.replaced.append((name, root.get_submodule(name)))
        _set(root, name, new)

    for name, style in plan.items():
        if isinstance(style, ParallelBlock):
            block = root.get_submodule(name)
            for attr in style.divide:
                value = getattr(block, attr)
                if value % q:
                    raise indivisible(name, attr, value, q, divisors(automatic.divisor()))
                applied.divided.append((block, attr, value))
                setattr(block, attr, value // q)
            entries.append((name, f"block: {', '.join(style.divide) or 'no counts'} / {q}"))
    shared = {}
    for name in outputs:
        whole = root.get_submodule(name)
        layer = Output2D.from_module(whole, grid)
        shared[id(whole.weight)] = layer.weight
        _replace(root, name, layer)
        entries.append((name, "Output2D"))
    for name in tables:
        whole = root.get_submodule(name)
        _replace(root, name, VocabParallelEmbedding2D.from_module(whole, grid, weight=shared.get(id(whole.weight))))
        entries.append((name, "VocabParallelEmbedding2D" + (" (tied)" if id(whole.weight) in shared else "")))
    for name, style in linears.items():
        _replace(root, name, Linear2D.from_module(root.get_submodule(name), grid, segments=_segments(style)))
        entries.append((name, "Linear2D"))

    for name, module in list(root.named_modules()):
        if isinstance(module, _2D_LAYERS) or not name:
            continue
        if isinstance(module, nn.LayerNorm):
            _replace(root, name, LayerNorm2D.from_module(module, grid))
            entries.append((name, "LayerNorm2D"))
        elif _is_rms_norm(module):
            _replace(root, name, RMSNorm2D.from_module(module, grid))
            entries.append((name, "RMSNorm2D"))
        elif isinstance(module, nn.Embedding):
            _replace(root, name, Embedding2D.from_module(module, grid))
            entries.append((name, "Embedding2D"))
    for name, original in applied.replaced:
        new = root.get_submodule(name)
        for attr, p in original.named_parameters(recurse=False):
            mine = getattr(new, attr, None)
            if isinstance(mine, nn.Parameter) and id(mine) not in applied.originals:
                applied.originals[id(mine)] = p
    for p in {id(p): p for p in applied.originals.values()}.values():
        p.data = p.data.new_empty(0)  # the whole values now live in the 2D pieces
    setattr(root, PLAN_2D_ATTR, applied)
    return entries


@torch.no_grad()
def unparallelize_2d(root: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Undo :func:`parallelize_2d`: a collective over the grid. The original modules come back with the whole
    trained values; ``optimizers`` holding the 2D pieces are moved to the whole parameters (state gathered)."""
    applied = applied_plan_2d(root)
    if applied is None:
        return
    grid = applied.grid
    whole: dict[int, nn.Parameter] = {}
    for name, _ in applied.replaced:
        for _, piece in root.get_submodule(name).named_parameters(recurse=False):
            target = applied.originals.get(id(piece))
            if target is not None and id(piece) not in whole:
                target.data = cut_2d(piece).unshard(piece.detach(), grid).to(piece.dtype)
                target.requires_grad_(piece.requires_grad)
                whole[id(piece)] = target
    move_optimizers(optimizers, whole, lambda piece, value: cut_2d(piece).unshard(value, grid))
    for name, original in reversed(applied.replaced):
        original.train(root.get_submodule(name).training)
        _set(root, name, original)
    for block, attr, value in reversed(applied.divided):
        setattr(block, attr, value)
    delattr(root, PLAN_2D_ATTR)
