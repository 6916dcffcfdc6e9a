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

from typing import Union

from torch import nn

from lightning_par.comm.summa import Grid2D
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.layers_2d import (
    Embedding2D,
    LayerNorm2D,
    Linear2D,
    Output2D,
    RMSNorm2D,
    VocabParallelEmbedding2D,
)
from lightning_par.tensor.styles import ColwiseParallel, ParallelBlock, RowwiseParallel, VocabParallel, indivisible
from lightning_par.tensor.styles import divisors

_2D_LAYERS = (Linear2D, Embedding2D, VocabParallelEmbedding2D, LayerNorm2D, RMSNorm2D)


def _is_rms_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.RMSNorm) or (type(module).__name__.endswith("RMSNorm")
                                              and isinstance(getattr(module, "weight", None), nn.Parameter))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _segments(style: Union[ColwiseParallel, RowwiseParallel]) -> Union[int, tuple[int, ...], None]:
    return getattr(style, "segments", None)  # a fused output (q/k/v): its pieces, or how many equal ones


def parallelize_2d(root: nn.Module, grid: Grid2D) -> list[tuple[str, str]]:
    """Cut ``root`` in place for the q x q ``grid`` by the automatic plan; return (module name, what it became)."""
    automatic = auto_plan(root)
    q = grid.q
    automatic.check(q)  # every head count and width the plan splits divides by q, or an error naming the sizes
    entries: list[tuple[str, str]] = []
    plan = automatic.plan
    linears = {name: style for name, style in plan.items() if isinstance(style, (ColwiseParallel, RowwiseParallel))}
    vocab = [name for name, style in plan.items() if isinstance(style, VocabParallel)]
    outputs = [name for name in vocab if isinstance(root.get_submodule(name), nn.Linear)]
    tables = [name for name in vocab if isinstance(root.get_submodule(name), nn.Embedding)]

    for name, style in plan.items():
        if isinstance(style, ParallelBlock):
            block = root.get_submodule(name)
            for attr in style.divide:
                value = getattr(block, attr)
                if value % q:
                    raise indivisible(name, attr, value, q, divisors(automatic.divisor()))
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
        elif isinstance(module, nn.Linear):
            raise ValueError(f"2D tensor parallelism: the linear layer {name!r} is not part of an attention or MLP "
                             "block the automatic plan recognises, and a linear cannot stay whole on activations "
                             "split in both dims. Use tensor_mode='1d' for this model.")
    return entries
