"""Each weight cast to the autocast dtype once per pipeline step, not once per microbatch.

[Note: one weight cast per step]
Lightning's mixed precision enters autocast with ``cache_enabled=False``: autocast's cache would keep a cast made
under ``no_grad`` and hand it, without a gradient, to a later use under grad mode. So under Lightning every
``F.linear`` casts its fp32 weight again, and a pipeline step of m microbatches casts every weight m times, where
``torch.distributed.pipelining`` in one autocast region (cache on) casts it once: on 2 x H100, 12 GPT layers of width
2048 per stage and 8 microbatches, 672 more cast kernels a step on each stage than torch's 1F1B, the only
difference between the two profiles. :class:`CastWeightsOnce`, around a stage's forward, gives ``F.linear`` and
``torch.addmm`` (Hugging Face ``Conv1D``) the step's cast of their weight. Casts are made and used only under grad
mode, so the hazard autocast's cache avoids cannot occur, and a weight changed in place is cast again.

[Note: casting through module hooks, not a torch function mode]
A ``TorchFunctionMode`` sees every torch call of the forward (each view, transpose, norm), not only the matmuls: on
a 12-layer GPT stage of width 32 it cost a quarter more host time per forward than no interception (on CPU, 2.5 ->
3.1 ms; the hooks 2.5 ms), and small pipeline stages are paced by the host. (On 2 x H100 with 12 layers of width 2048
per stage the step time did not change measurably.) So :class:`CastLinearWeights` hooks only the modules that multiply
by their ``weight`` (``nn.Linear`` and Hugging Face's ``Conv1D``): a pre-hook shadows the parameter with its cast in
the module's instance ``__dict__`` (found before ``nn.Module.__getattr__`` looks in ``_parameters``) and a forward
hook removes it again; the hooks are registered once per step. A weight used by a bare ``F.linear`` in custom code
is cast per microbatch by autocast as before. :class:`CastWeightsOnce`, the mode, stays the base of zero bubble's
:class:`~lightning_par.pipeline.split_backward.DeferMatmulWeights`, which must see the matmul itself.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_par.tensor.linear_fns import compute_dtype

__all__ = ["CastLinearWeights", "CastWeightsOnce", "StepCasts", "apply_matmul", "matmul_call"]


class StepCasts:
    """The weights in their compute dtype for one step (a new one each step)."""

    def __init__(self) -> None:
        self._casts: dict[int, tuple[int, Tensor]] = {}

    def get(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``weight.to(dtype)`` in the graph (its gradient flows to ``weight``), made once while ``weight`` is
        unchanged."""
        version, cast = self._casts.get(id(weight), (None, None))
        if cast is None or version != weight._version or cast.dtype != dtype:
            with torch.enable_grad():
                cast = weight.to(dtype)
            self._casts[id(weight)] = (weight._version, cast)
        return cast


class CastLinearWeights:
    """Around a stage's forward under autocast: the ``nn.Linear`` and Hugging Face ``Conv1D`` modules among
    ``modules`` whose weight is one of ``params`` use the step's cast of it (see [Note: casting through module hooks,
    not a torch function mode]). One instance serves every microbatch of a stage in a step; :meth:`close` at the end
    of the step removes its hooks."""

    def __init__(self, modules: Iterable[nn.Module], params: Iterable[nn.Parameter], casts: StepCasts) -> None:
        ids = {id(p) for p in params if p.requires_grad}
        self._targets = [m for m in modules if _multiplies_by_weight(m) and id(m.weight) in ids]
        self._casts = casts
        self._handles: list[Any] = []
        self._active = False

    def __enter__(self) -> "CastLinearWeights":
        if not self._handles:
            for m in self._targets:
                self._handles.append(m.register_forward_pre_hook(self._shadow))
                self._handles.append(m.register_forward_hook(_unshadow, always_call=True))
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for m in self._targets:
            m.__dict__.pop("weight", None)

    def _shadow(self, module: nn.Module, args: tuple) -> None:
        if not (self._active and args and isinstance(args[0], Tensor) and torch.is_grad_enabled()):
            return
        weight = module._parameters["weight"]
        dtype = compute_dtype(args[0])
        if weight.dtype != dtype:
            module.__dict__["weight"] = self._casts.get(weight, dtype)


def _unshadow(module: nn.Module, args: tuple, output: Any) -> None:
    module.__dict__.pop("weight", None)


def _multiplies_by_weight(module: nn.Module) -> bool:
    """Modules whose forward is one matmul by ``self.weight``: ``nn.Linear`` itself (not subclasses, which may use
    the weight otherwise) and Hugging Face ``Conv1D`` (``torch.addmm(bias, x, self.weight)``)."""
    kind = type(module)
    if kind is nn.Linear:
        return True
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


class CastWeightsOnce(TorchFunctionMode):
    """Around a stage's forward under autocast: linear layers whose weight is one of ``params`` use ``casts``
    (see [Note: one weight cast per step]). One instance serves every microbatch of a stage in a step."""

    def __init__(self, params: Iterable[nn.Parameter], casts: StepCasts) -> None:
        super().__init__()
        self._ids = {id(p) for p in params if p.requires_grad}
        self._casts = casts

    def close(self) -> None:
        """Nothing to undo: a mode holds no hooks (the executor closes every stage's weight mode after a step)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        call = matmul_call(func, args, kwargs) if torch.is_grad_enabled() else None
        if call is not None and id(call[1]) in self._ids:
            out = self._run(*call)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _run(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Optional[Tensor]:
        """The layer's output computed here, or None to run the call as it was made."""
        dtype = compute_dtype(x)
        if weight.dtype == dtype:
            return None
        return apply_matmul(x, self._casts.get(weight, dtype), bias, transposed)


def matmul_call(func: Any, args: tuple, kwargs: dict) -> Optional[tuple[Tensor, Tensor, Optional[Tensor], bool]]:
    """``(input, weight, bias, transposed)`` of an ``F.linear`` call, or of ``torch.addmm(bias, x, weight)`` (Hugging
    Face ``Conv1D``: weight stored ``(in, out)``, beta = alpha = 1); None for any other call."""
    if func is F.linear:
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return x, weight, bias, False
    if func is torch.addmm and len(args) == 3 and not kwargs:
        bias, x, weight = args
        return x, weight, bias, True
    return None


def apply_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Tensor:
    """The call :func:`matmul_call` took apart, made again with these tensors."""
    return torch.addmm(bias, x, weight) if transposed else F.linear(x, weight, bias)
