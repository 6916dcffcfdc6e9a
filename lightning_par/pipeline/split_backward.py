"""Backward in two halves for zero-bubble schedules: I (the whole backward but the weight matmuls) now, W later.

[Note: W as the deferred weight-gradient matmuls]
Zero bubble splits a stage's backward into I, which the previous stage waits for, and W, which can fill a bubble.
Here W is what the zero-bubble papers and Megatron's ``WeightGradStore`` make it: the weight-gradient matmuls of
the linear layers (``grad_out^T @ input``), about half of the backward's FLOPs. While a zero-bubble stage runs its
forward, :class:`DeferMatmulWeights` routes every ``F.linear`` (``nn.Linear``, a tied head) and every
``torch.addmm(bias, x, weight)`` (Hugging Face ``Conv1D``, weight stored ``(in, out)``) whose weight is a
parameter of this rank through :class:`_DeferredLinear`. I is then one ordinary backward: input gradients,
biases, norms and embeddings as usual, and each linear layer hands ``(grad_out, input)`` to the microbatch's
:class:`~lightning_par.tensor.deferred_grads.DeferredWeightGrads` instead of multiplying; W multiplies them and
accumulates into ``.grad`` as autograd would.

The earlier version restarted the autograd engine at the nodes where each weight's branch leaves the input path
(as ``torch.distributed.pipelining`` does). Every restart walks the graph back to the stage input, so W's host cost
grew with the square of the layers per stage: on 2 x H100 (12 GPT layers of width 2048 per stage) zero bubble took
507 ms a step against 1F1B's 227 ms, torch's the same. Deferred matmuls cost the host one ``mm`` each.

A parameter with hooks (the data-parallel gradient buckets of pipeline x data) is not deferred: its gradient must
arrive through autograd, once per sync. Its whole gradient is computed in I, so with data parallelism W holds only
the parameters without hooks; ``PipelineExecutor`` opens the gradient sync before a stage's last I.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_par.tensor.deferred_grads import DeferredWeightGrads
from lightning_par.tensor.linear_fns import compute_dtype

__all__ = ["DeferMatmulWeights"]


class _DeferredLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` (``transposed``: ``bias + x @ weight``) in the compute dtype, whose backward
    leaves the weight gradient to ``store`` when it takes it."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool, dtype: torch.dtype,
                store: DeferredWeightGrads) -> Tensor:
        xc, wc = x.to(dtype), weight.to(dtype)
        w = wc.t() if transposed else wc  # (out, in)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, w, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(xc, w)
        ctx.transposed, ctx.store, ctx.weight = transposed, store, weight
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        xc, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gy = gy.to(w.dtype)
        g2 = gy.reshape(-1, gy.size(-1))
        gx = gw = gb = None
        if need_x:
            gx = gy.matmul(w).to(x_dtype)
        if need_w:
            x2, transposed = xc.reshape(-1, xc.size(-1)), ctx.transposed

            def weight_grad() -> Tensor:
                return x2.t().mm(g2) if transposed else g2.t().mm(x2)

            if not ctx.store.defer(ctx.weight, weight_grad):
                gw = weight_grad().to(w_dtype)
        if need_b:
            gb = g2.sum(0).to(b_dtype)
        return gx, gw, gb, None, None, None


class DeferMatmulWeights(TorchFunctionMode):
    """Around a stage's forward: linear layers whose weight is one of ``params`` compute through
    :class:`_DeferredLinear` bound to ``store`` (see [Note: W as the deferred weight-gradient matmuls])."""

    def __init__(self, params: Iterable[nn.Parameter], store: DeferredWeightGrads) -> None:
        super().__init__()
        self._ids = {id(p) for p in params if p.requires_grad}
        self._store = store

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight, bias = _linear_args(args, kwargs)
            if id(weight) in self._ids:
                return _DeferredLinear.apply(x, weight, bias, False, compute_dtype(x), self._store)
        elif func is torch.addmm and len(args) == 3 and not kwargs and torch.is_grad_enabled():
            bias, x, weight = args  # Conv1D: bias + x @ weight, weight (in, out); beta = alpha = 1
            if id(weight) in self._ids and bias.dim() == 1:
                return _DeferredLinear.apply(x, weight, bias, True, compute_dtype(x), self._store)
        return func(*args, **kwargs)


def _linear_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias
