"""Stage-3 parameters whose chunk is released: reading their values raises a Python error instead of crashing.

[Note: released parameters]
A released chunk's storage is resized to zero behind its parameters' views (``engine.py``, [Note: stage 3 gather
and release]). An attribute read (``layer.weight``) goes through the guarded ``_parameters`` dict (``params.py``),
but a parameter reached by iterating ``module.parameters()`` (a weight-norm callback, ``state_dict()``) does not,
and reading it read freed memory: a segfault on the host, an illegal address on a GPU. So while its chunk is
released, each parameter's class is swapped to ``ReleasedParameter`` (a ``Parameter`` subclass: ``isinstance``
checks still hold) whose ``__torch_function__`` lets metadata through (shape, dtype, device, ``requires_grad``,
``.grad``, hashing, hooks: what optimizers, Lightning and the engine itself read) and, for anything else, waits for
a gather already on its way or raises ``ParameterNotGathered`` naming the parameter and the remedies. The class is
swapped back when the chunk is gathered again, so forward and backward run on plain Parameters at full speed (and
autograd's C++ side never calls ``__torch_function__``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

_PROPERTIES = ("shape", "dtype", "device", "requires_grad", "grad", "_grad", "is_leaf", "layout", "ndim", "is_cuda",
               "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_mkldnn", "grad_fn", "_grad_fn", "_version",
               "itemsize", "nbytes", "_backward_hooks", "_post_accumulate_grad_hooks", "names", "_base")
_METHODS = ("size", "dim", "numel", "nelement", "element_size", "stride", "storage_offset", "is_contiguous",
            "data_ptr", "untyped_storage", "get_device", "is_floating_point", "is_complex", "is_signed", "is_pinned",
            "requires_grad_", "register_hook", "register_post_accumulate_grad_hook", "__hash__", "_is_view",
            "__len__")


def _metadata_functions() -> frozenset:
    out: set[Any] = {torch.is_floating_point, torch.is_complex, torch.numel}
    for name in _PROPERTIES:
        prop = getattr(torch.Tensor, name, None)
        for accessor in ("__get__", "__set__", "__delete__"):
            if hasattr(prop, accessor):
                out.add(getattr(prop, accessor))
    data = torch.Tensor.data
    out.add(data.__set__)  # re-pointing a parameter (the engine, teardown); reading `.data` is a value read
    out.update(getattr(torch.Tensor, name) for name in _METHODS if hasattr(torch.Tensor, name))
    return frozenset(out)


class ReleasedParameter(nn.Parameter):
    """A parameter of a released stage-3 chunk (see [Note: released parameters])."""

    _metadata = _metadata_functions()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in cls._metadata:
            for t in tree_flatten((args, kwargs))[0]:
                if type(t) is cls:
                    t._zero_engine.check_readable(t)  # waits for a gather on its way, else raises
        with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
            return func(*args, **kwargs)


def mark_released(params: list[nn.Parameter], engine: Any) -> None:
    for p in params:
        if type(p) is nn.Parameter:  # a user's own Parameter subclass keeps its class (and the old behaviour)
            p._zero_engine = engine
            p.__class__ = ReleasedParameter


def mark_gathered(params: list[nn.Parameter]) -> None:
    for p in params:
        if type(p) is ReleasedParameter:
            p.__class__ = nn.Parameter
            del p._zero_engine
