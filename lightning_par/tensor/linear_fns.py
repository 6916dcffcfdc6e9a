"""The matmuls of the 1D tensor-parallel layers, as autograd Functions that schedule their own communication.

``column_linear`` (column-parallel layers and the output layer) hands its input gradient to the deferred
reduction of the collective that produced its input ([Note: overlapping the input-gradient reduction] in
``layers_1d.py``); ``row_linear_scatter`` (row-parallel layers under sequence parallelism) reduce-scatters its
output into the token layout, optionally in chunks ([Note: overlapping the row-parallel collectives]). Both
compute in the autocast dtype ([Note: collectives in the autocast dtype]) and leave their weight gradients to the
next layer's collective when deferral is on ([Note: deferred weight gradients] in ``deferred_grads.py``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_par.comm.collectives import InputGradReduction, input_grad_reduction
from lightning_par.comm.raw_collectives import all_gather_fused, reduce_scatter_fused, token_chunks
from lightning_par.tensor.deferred_grads import DeferredWeightGrads

if TYPE_CHECKING:
    from lightning_par.tensor.layers_1d import TensorGroup


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a Linear computes in for input ``x``: the autocast dtype when autocast is on for ``x``'s device
    (and ``x`` is a type autocast casts), else ``x``'s own."""
    dev = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def to_compute_dtype(x: Tensor) -> Tensor:
    return x.to(compute_dtype(x))


class _ColumnLinear(torch.autograd.Function):
    """``F.linear`` in the compute dtype whose backward hands the input gradient to ``reduction`` (when given)
    before computing the weight gradient: see [Note: overlapping the input-gradient reduction]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], reduction: Optional[InputGradReduction],
                dtype: torch.dtype, deferred: Optional[DeferredWeightGrads]) -> Tensor:
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.reduction, ctx.deferred, ctx.weight = reduction, deferred, weight
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if reduction is not None and ctx.needs_input_grad[0]:
            reduction.register()
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        xc, wc = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gy = gy.to(wc.dtype)
        gx = gw = gb = None
        if need_x:
            gx = gy.matmul(wc)
            if ctx.reduction is not None:
                ctx.reduction.add(gx)  # the last consumer launches the reduction here, asynchronously
                gx = None
            else:
                gx = gx.to(x_dtype)
        g2 = gy.reshape(-1, gy.size(-1))
        # What overlaps the reduction launched above: the weight gradient another layer deferred, or our own.
        deferred = ctx.deferred
        if deferred is not None:
            deferred.run()
        if need_w:
            x2 = xc.reshape(-1, xc.size(-1))
            if deferred is None or not deferred.defer(ctx.weight, g2.t(), x2):
                gw = g2.t().mm(x2).to(w_dtype)
        if need_b:
            gb = g2.sum(0).to(b_dtype)
        return gx, gw, gb, None, None, None


class _RowLinearScatter(torch.autograd.Function):
    """``F.linear(x, weight)`` followed by the reduce-scatter into the sequence-parallel token layout, overlapped.

    [Note: overlapping the row-parallel collectives]
    The tokens come in ``k`` chunks (``TensorGroup.token_chunks``; see [Note: token-sharded sequence parallelism]):
    forward multiplies chunk c's rows and launches their reduce-scatter asynchronously, so it runs while chunk c+1
    is multiplied; backward launches the all-gathers of every chunk's output gradient at once and multiplies chunk c
    (input gradient) as soon as its gather arrives, while the next ones travel. The weight gradient needs all of
    them and comes last. With ``k = 1`` it is the plain matmul then collective. Computes in ``dtype`` (the autocast
    dtype), as ``F.linear`` under autocast would; the collectives carry it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, transposed: bool, seq_dim: int, tg: "TensorGroup",
                dtype: torch.dtype) -> Tensor:
        w = (weight.t() if transposed else weight).to(dtype)  # (out, in)
        x2 = x.to(dtype).reshape(-1, x.size(-1))
        n, t = x2.size(0), tg.size
        k = token_chunks(_tokens(x, seq_dim), t, tg.token_chunks)
        rows = n // k
        full = x2.new_empty((n, w.size(0)))
        local = x2.new_empty((n // t, w.size(0)))
        works = []
        with torch.autocast(x.device.type, enabled=False):
            for c in range(k):
                part = full[c * rows:(c + 1) * rows]
                torch.mm(x2[c * rows:(c + 1) * rows], w.t(), out=part)
                works.append(reduce_scatter_fused()(local[c * rows // t:(c + 1) * rows // t], part,
                                                    group=tg.group, async_op=True))
        for work in works:
            work.wait()  # the compute stream waits; the host does not
        ctx.save_for_backward(x2, w)
        ctx.x_meta = (x.shape, x.dtype)
        ctx.w_dtype, ctx.transposed, ctx.tg, ctx.k, ctx.weight = weight.dtype, transposed, tg, k, weight
        shape = list(x.shape[:-1]) + [w.size(0)]
        shape[seq_dim] //= t
        return local.view(shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, w = ctx.saved_tensors
        tg, k = ctx.tg, ctx.k
        g = grad.to(w.dtype).contiguous().view(-1, w.size(0))
        n = x2.size(0)
        rows, local_rows = n // k, g.size(0) // k
        full = g.new_empty((n, w.size(0)))
        works = [all_gather_fused()(full[c * rows:(c + 1) * rows], g[c * local_rows:(c + 1) * local_rows],
                                    group=tg.group, async_op=True) for c in range(k)]
        gx = gw = None
        deferred = tg.weight_grads
        with torch.autocast(x2.device.type, enabled=False):
            deferred.run()  # the weight gradient the previous layer left, while the gathers travel
            if ctx.needs_input_grad[0]:
                gx = x2.new_empty(x2.shape)
                for c, work in enumerate(works):
                    work.wait()
                    torch.mm(full[c * rows:(c + 1) * rows], w, out=gx[c * rows:(c + 1) * rows])
                shape, dtype = ctx.x_meta
                gx = gx.view(shape).to(dtype)
            else:
                for work in works:
                    work.wait()
            if ctx.needs_input_grad[1]:
                a, b = (x2.t(), full) if ctx.transposed else (full.t(), x2)  # weight (in, out) or (out, in)
                if not deferred.defer(ctx.weight, a, b):  # left for the next layer's collective
                    gw = a.mm(b).to(ctx.w_dtype)
        return gx, gw, None, None, None, None


def row_linear_scatter(x: Tensor, weight: Tensor, transposed: bool, seq_dim: int, tg: "TensorGroup") -> Tensor:
    """``F.linear(x, weight)`` (``transposed``: ``weight`` is stored ``(in, out)``) reduce-scattered along
    ``seq_dim`` into the token layout of ``tg`` (any autocast applied)."""
    return _RowLinearScatter.apply(x, weight, transposed, seq_dim, tg, compute_dtype(x))


def _tokens(x: Tensor, seq_dim: int) -> int:
    """The tokens of a whole (gathered) activation: its dims up to the sequence dim, flattened."""
    return math.prod(x.shape[: seq_dim % x.dim() + 1])


def column_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                  deferred: Optional[DeferredWeightGrads] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a column-parallel layer (any autocast applied): when ``x`` is the output
    of an input collective, its input gradient is reduced early, overlapping a weight-gradient matmul (its own,
    or with ``deferred`` active the one the previous layer left, its own then waiting for the next layer)."""
    return _ColumnLinear.apply(x, weight, bias, input_grad_reduction(x), compute_dtype(x), deferred)
