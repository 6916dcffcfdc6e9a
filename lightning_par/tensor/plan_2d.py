"""The automatic plan for 2D, 2.5D and 3D tensor parallelism: the modules the 1D automatic plan finds, cut on a
q x q grid (stacked for 2.5D) or a q x q x q cube.

The 1D plan (``tensor/auto_plan.py``) already knows which modules of a standard model are the attention and MLP
linears (with the widths of a fused q/k/v), which block attributes count heads, which embedding holds the tokens and
which linear is the output layer. In 2D every one of them becomes a 2D layer, and so must everything else on the
hidden stream, because its activations are split in both dims (see ``tensor/layers_2d.py``; the cube's layers,
``tensor/layers_3d.py``, take the same places, with ``3D`` for ``2D`` in their names):

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
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from lightning_par.comm.cube import Grid3D
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
)
from lightning_par.tensor.grid_cut import grid_cut
from lightning_par.tensor.layers_3d import (
    Embedding3D,
    LayerNorm3D,
    Linear3D,
    Output3D,
    RMSNorm3D,
    VocabParallelEmbedding3D,
)
from lightning_par.tensor.styles import ColwiseParallel, ParallelBlock, RowwiseParallel, VocabParallel, indivisible
from lightning_par.tensor.styles import divisors


class GridLayers(NamedTuple):
    """The layer classes of one mode, by the place they take (each has a ``from_module``)."""

    linear: Any
    output: Any
    vocab_embedding: Any
    embedding: Any
    layer_norm: Any
    rms_norm: Any


LAYERS_2D = GridLayers(Linear2D, Output2D, VocabParallelEmbedding2D, Embedding2D, LayerNorm2D, RMSNorm2D)
LAYERS_3D = GridLayers(Linear3D, Output3D, VocabParallelEmbedding3D, Embedding3D, LayerNorm3D, RMSNorm3D)


def _is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm")
                                              and isinstance(getattr(module, "weight", None), nn.Parameter))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _segments(style: Union[ColwiseParallel, RowwiseParallel]) -> Union[int, tuple[int, ...], None]:
    return getattr(style, "segments", None)  # a fused output (q/k/v): its pieces, or how many equal ones


def _norm_size(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if _is_rms_norm(module):
        return (getattr(module, "normalized_shape", None) or module.weight.shape)[-1]
    return None


def _misfits(root: nn.Module, linears: Iterable[str], outputs: list[str], tables: list[str], q: int,
             cube: bool) -> list[str]:
    """Every width the layers of a q-sided grid (``cube``: a q x q x q cube) would cut and cannot: linear inputs by
    q (3D: q*q), outputs by q (the output layer pads), the token table's width by q (3D: q*q), other embeddings' by
    q*q (3D: q*q*q), norms by q."""
    def need(power: int) -> tuple[int, str]:
        return q ** power, "*".join("q" * power)

    rules = []  # (module name, width name, width, (divisor, its name))
    for name in [*linears, *outputs]:
        dims = linear_dims(root.get_submodule(name))
        rules.append((name, "in_features", dims[0], need(2 if cube else 1)))
        if name not in outputs:
            rules.append((name, "out_features", dims[1], need(1)))
    for name, module in root.named_modules():
        if isinstance(module, nn.Embedding):
            power = (2 if cube else 1) if name in tables else (3 if cube else 2)
            rules.append((name, "embedding_dim", module.embedding_dim, need(power)))
        elif (size := _norm_size(module)) is not None:
            rules.append((name, "normalized_size", size, need(1)))
    return [f"{name} ({what}={size}, by {label}={by})" for name, what, size, (by, label) in rules if size % by]


def _planned(root: nn.Module, plan: dict) -> tuple[dict, list[str], list[str]]:
    """The automatic plan's linears (name -> style), output layers and token tables."""
    linears = {name: style for name, style in plan.items() if isinstance(style, (ColwiseParallel, RowwiseParallel))}
    vocab = [name for name, style in plan.items() if isinstance(style, VocabParallel)]
    outputs = [name for name in vocab if linear_dims(root.get_submodule(name)) is not None]
    tables = [name for name in vocab if isinstance(root.get_submodule(name), nn.Embedding)]
    return linears, outputs, tables


def misfit_widths(root: nn.Module, automatic: Any, q: int, cube: bool) -> list[str]:
    """The widths the automatic plan (``automatic``, ``auto_plan(root)``) on a q-sided grid (``cube``: 3D) would have
    to cut and cannot (for a default size that fits); empty when it fits."""
    return _misfits(root, *_planned(root, automatic.plan), q, cube)


PLAN_2D_ATTR = "_tensor_parallel_plan_2d"


@dataclass
class Applied2D:
    """What :func:`parallelize_2d` did to a module (kept on it, ``PLAN_2D_ATTR``), so that it can be undone."""

    grid: Union[Grid2D, Grid3D]
    entries: list[tuple[str, str]] = field(default_factory=list)
    replaced: list[tuple[str, nn.Module]] = field(default_factory=list)  # (name, the original module)
    divided: list[tuple[nn.Module, str, int]] = field(default_factory=list)  # (block, attribute, original value)
    originals: dict[int, nn.Parameter] = field(default_factory=dict)  # id(2D parameter) -> the original one

    def describe(self) -> str:
        lines = [f"{self.grid.label}:"] + [f"  {name}: {what}" for name, what in self.entries]
        return "\n".join(lines)


def applied_plan_2d(root: nn.Module) -> Optional[Applied2D]:
    return getattr(root, PLAN_2D_ATTR, None)


def parallelize_2d(root: nn.Module, grid: Union[Grid2D, Grid3D]) -> list[tuple[str, str]]:
    """Cut ``root`` in place for ``grid`` (a q x q grid, stacked for 2.5D, or a 3D cube) by the automatic plan;
    return (module name, what it became). The original modules are kept, their parameters emptied, so that
    :func:`unparallelize_2d` can undo it."""
    if applied_plan_2d(root) is not None:
        raise RuntimeError("This module is already cut for 2D tensor parallelism.")
    automatic = auto_plan(root)
    q = grid.q
    automatic.check(q)  # every head count and width the plan splits divides by q, or an error naming the sizes
    layers = LAYERS_3D if isinstance(grid, Grid3D) else LAYERS_2D
    mode = "3D" if isinstance(grid, Grid3D) else "2D"
    applied = Applied2D(grid)
    entries = applied.entries
    plan = automatic.plan
    linears, outputs, tables = _planned(root, plan)

    # Refused before anything is cut: a linear layer the plan does not name.
    for name, module in root.named_modules():
        if linear_dims(module) is not None and name not in linears and name not in outputs:
            raise ValueError(f"{mode} tensor parallelism: the linear layer {name!r} is not part of an attention or MLP "
                             "block the automatic plan recognises, and a linear cannot stay whole on activations "
                             "split in both dims. Use tensor_mode='1d' for this model.")

    # Refused before anything is cut: widths the grid's layers cannot cut.
    misfits = _misfits(root, linears, outputs, tables, q, cube=isinstance(grid, Grid3D))
    if misfits:
        raise ValueError(f"{mode} tensor parallelism with q={q} ({grid.label.split(' plan on ')[-1]}) cuts these "
                         f"widths, which must divide as shown: {', '.join(misfits)}. A smaller tensor_size or "
                         "another tensor_mode may fit.")

    def _replace(root: nn.Module, name: str, new: nn.Module, note: str = "") -> None:
        applied.replaced.append((name, root.get_submodule(name)))
        _set(root, name, new)
        entries.append((name, type(new).__name__ + note))

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
        layer = layers.output.from_module(whole, grid)
        shared[id(whole.weight)] = layer.weight
        _replace(root, name, layer)
    for name in tables:
        whole = root.get_submodule(name)
        tied = id(whole.weight) in shared
        _replace(root, name, layers.vocab_embedding.from_module(whole, grid, weight=shared.get(id(whole.weight))),
                 " (tied)" if tied else "")
    for name, style in linears.items():
        _replace(root, name, layers.linear.from_module(root.get_submodule(name), grid, segments=_segments(style),
                                                       rowwise=isinstance(style, RowwiseParallel)))

    grid_layers = tuple(layers)
    for name, module in list(root.named_modules()):
        if isinstance(module, grid_layers) or not name:
            continue
        if isinstance(module, nn.LayerNorm):
            _replace(root, name, layers.layer_norm.from_module(module, grid))
        elif _is_rms_norm(module):
            _replace(root, name, layers.rms_norm.from_module(module, grid))
        elif isinstance(module, nn.Embedding):
            _replace(root, name, layers.embedding.from_module(module, grid))
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
                target.data = grid_cut(piece).unshard(piece.detach(), grid).to(piece.dtype)
                target.requires_grad_(piece.requires_grad)
                whole[id(piece)] = target
    move_optimizers(optimizers, whole, lambda piece, value: grid_cut(piece).unshard(value, grid))
    for name, original in reversed(applied.replaced):
        original.train(root.get_submodule(name).training)
        _set(root, name, original)
    for block, attr, value in reversed(applied.divided):
        setattr(block, attr, value)
    delattr(root, PLAN_2D_ATTR)
