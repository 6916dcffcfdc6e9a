"""Building a model without its weights, and initialising it chunk by chunk with the model's own initialisation.

[Note: parameters on the meta device, buffers real]
``meta_parameters()`` is the context ``Trainer.init_module(empty_init=True)`` and ``configure_model`` run in at stage 3.
Every parameter registered inside it is moved to the meta device as soon as it is registered (its constructor's
``torch.empty`` is never touched, and the constructor's own initialisation then runs on the meta tensor: free), while
buffers are built as usual: they are small and often computed in the constructor (rotary frequencies, masks), so
they cannot be recovered once built on the meta device.

[Note: initialising a module]
When the engine materialises a chunk, each module that owns one of its meta tensors gets uninitialised storage on the
device (floating-point tensors filled with NaN, so that what no initialiser wrote is found) and is initialised by the
first of these that leaves none of its tensors unset, in this order:

1. ``param_init_fn(module)``, when given to the strategy (as FSDP's ``param_init_fn``; here the module already has
   storage and the function fills the module's own tensors in place);
2. the model's own per-module initialiser: ``_init_weights(module)`` of the nearest enclosing module that has one
   (Hugging Face ``PreTrainedModel``\\s apply it through ``post_init()``; the demo GPT too), tried first on the module
   itself;
3. the module's own ``reset_parameters()`` (torch's layers).

A module whose tensors are still unset after all of them is refused with an error that names it and the remedies;
nothing trains on uninitialised memory. A parameter shared by several modules (tied weights) is initialised once, by
the first of its modules in ``module.modules()`` order, and stays one Parameter.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def has_meta_tensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` still lives on the meta device (has no storage)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


@contextmanager
def meta_parameters() -> Generator[None, None, None]:
    """Parameters registered inside live on the meta device; buffers are built as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and type(param) is nn.Parameter and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _unset(t: Tensor, version: int) -> bool:
    if t.is_floating_point() or t.is_complex():
        return bool(torch.isnan(t).any())
    return t._version == version  # integers cannot hold a marker: written at all counts as initialised


class Materializer:
    """Gives meta tensors storage on ``device`` and initialises them (see [Note: initialising a module])."""

    def __init__(self, root: nn.Module, device: torch.device,
                 param_init_fn: Optional[Callable[[nn.Module], None]] = None, who: str = "ZeRO-3",
                 strategy: str = "ZeroStrategy") -> None:
        """``who`` / ``strategy``: how the error names the caller and its strategy class (tp1d reuses this)."""
        self.device = device
        self.param_init_fn = param_init_fn
        self.who, self.strategy = who, strategy
        self.names = {m: n for n, m in root.named_modules()}
        self.parent: dict[nn.Module, nn.Module] = {}
        for m in root.modules():
            for child in m.children():
                self.parent.setdefault(child, m)

    def _initialisers(self, module: nn.Module) -> list[tuple[str, Callable[[], None]]]:
        if self.param_init_fn is not None:
            return [("param_init_fn", lambda: self.param_init_fn(module))]
        found: list[tuple[str, Callable[[], None]]] = []
        owner: Optional[nn.Module] = module
        while owner is not None:
            init = getattr(owner, "_init_weights", None)
            if callable(init):
                where = self.names.get(owner, "") or "the root module"
                found.append((f"{type(owner).__name__}._init_weights (of {where})", lambda: init(module)))
                break
            owner = self.parent.get(owner)
        if callable(getattr(module, "reset_parameters", None)):
            found.append((f"{type(module).__name__}.reset_parameters()", module.reset_parameters))
        return found

    @torch.no_grad()
    def materialize(self, module: nn.Module) -> None:
        """Give ``module``'s own meta parameters and buffers storage and initialise them. The Parameter objects are
        kept (``swap_tensors``), so tied weights stay tied."""
        meta_params = {n: q for n, q in module._parameters.items() if q is not None and q.is_meta}
        meta_buffers = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta_params and not meta_buffers:
            return
        for q in meta_params.values():
            fresh = torch.empty_like(q, device=self.device)
            if fresh.is_floating_point():
                fresh.fill_(float("nan"))
            torch.utils.swap_tensors(q, nn.Parameter(fresh, requires_grad=q.requires_grad))
        for name in meta_buffers:
            fresh = torch.empty_like(module._buffers[name], device=self.device)
            module._buffers[name] = fresh.fill_(float("nan")) if fresh.is_floating_point() else fresh
        tensors = {**meta_params, **{n: module._buffers[n] for n in meta_buffers}}
        versions = {n: t._version for n, t in tensors.items()}
        tried = []
        unset = list(tensors)
        for what, init in self._initialisers(module):
            init()
            tried.append(what)
            for name, q in meta_params.items():  # an initialiser that assigned a new Parameter: keep ours (tying)
                new = module._parameters.get(name)
                if new is not q:
                    if new is not None and new.shape == q.shape:
                        q.copy_(new.detach().to(q.device, q.dtype))
                    module._parameters[name] = q
            for n in meta_buffers:
                tensors[n] = module._buffers[n]
            unset = [n for n, t in tensors.items() if _unset(t, versions[n])]
            if not unset:
                return
        where = self.names.get(module, "?") or "the root module"
        raise TypeError(
            f"{self.who} cannot initialise module {where!r} ({type(module).__name__}): it was built on the meta device "
            f"(Trainer.init_module(empty_init=True) or configure_model), and its {', '.join(unset)} "
            f"{'is' if len(unset) == 1 else 'are'} still unset after "
            f"{', then '.join(tried) if tried else 'nothing: no initialiser was found for it'}. Remedies: pass "
            f"{self.strategy}(param_init_fn=fn), where fn(module) initialises a module's own tensors in place; give the "
            "model an _init_weights(module) method (as Hugging Face models have) or the module a reset_parameters(); "
            "or build the model without empty_init (outside configure_model) and load its weights."
        )
