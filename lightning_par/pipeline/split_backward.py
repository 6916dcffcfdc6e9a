"""Backward in two halves for zero-bubble schedules: I (the whole backward but the weight matmuls) now, W later.

[Note: W as the deferred weight-gradient matmuls]
Zero bubble splits a stage's backward into I, which the previous stage waits for, and W, which can fill a bubble.
Here W is what the zero-bubble papers and Megatron's ``WeightGradStore`` make it: the weight-gradient matmuls of
the linear layers (``grad_out^T @ input``), about half of the backward's FLOPs. While a zero-bubble stage runs its
forward, :class:`DeferMatmulWeights` takes every ``F.linear`` (``nn.Linear``, a tied head) and every
``torch.addmm(bias, x, weight)`` (Hugging Face ``Conv1D``, weight stored ``(in, out)``) whose weight is a
parameter of this rank and runs it on a detached weight. I is then one ordinary backward: input gradients,
biases, norms and embeddings as usual, and each such layer hands ``(grad_out, input)`` to the microbatch's
:class:`~lightning_par.tensor.deferred_grads.DeferredWeightGrads` instead of multiplying; W multiplies them and
accumulates into ``.grad`` as autograd would.

The earlier version restarted the autograd engine at the nodes where each weight's branch leaves the input path
(as ``torch.distributed.pipelining`` does). Every restart walks the graph back to the stage input, so W's host cost
grew with the square of the layers per stage: on 2 x H100 (12 GPT layers of width 2048 per stage) zero bubble took
507 ms a step against 1F1B's 227 ms, torch's the same. Deferred matmuls cost the host one ``mm`` each.

A parameter with hooks (the data-parallel gradient buckets of pipeline x data) is not deferred: its gradient must
arrive through autograd, once per sync. Its whole gradient is computed in I, so with data parallelism W holds only
the parameters without hooks; ``PipelineExecutor`` opens the gradient sync before a stage's last I.

Activation checkpointing with ``use_reentrant=False`` cannot be combined with it: the recomputation runs inside
backward, outside :class:`DeferMatmulWeights`, so it saves other tensors than the forward did, and
``torch.utils.checkpoint`` refuses. :func:`explain_checkpoint_errors` turns that refusal into an error that says so
and what works instead (reentrant checkpointing recomputes under grad mode in backward with the plain ops and works,
those layers' weight gradients then being computed in I).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError
from lightning_par.pipeline.weight_casts import CastWeightsOnce, StepCasts, apply_matmul
from lightning_par.tensor.deferred_grads import DeferredWeightGrads
from lightning_par.tensor.linear_fns import compute_dtype

__all__ = ["DeferMatmulWeights", "explain_checkpoint_errors"]


class DeferMatmulWeights(CastWeightsOnce):
    """Around a stage's forward: linear layers whose weight is one of ``params`` leave their weight gradient to
    ``store``, the microbatch's (see [Note: W as the deferred weight-gradient matmuls]).

    Such a layer runs the native op on a detached copy of the weight in the compute dtype, so autograd computes
    only its input gradient (and the bias's); a hook on the output hands ``grad_out`` with the saved input to
    ``store``. Native ops and a hook cost the host less than a Python autograd Function (the host, not the GPU,
    sets the pace of 1.3B-model stages on H100). A weight with hooks (the data-parallel buckets) keeps autograd:
    its gradient must arrive through it. Either way the weight is cast to the autocast dtype once per step
    (``casts``: [Note: one weight cast per step] in ``weight_casts.py``).
    """

    def __init__(self, params: Iterable[nn.Parameter], casts: StepCasts) -> None:
        params = list(params)
        super().__init__(params, casts)
        self._deferred_ids = {id(p) for p in params
                              if p.requires_grad and not (p._post_accumulate_grad_hooks or p._backward_hooks)}
        self.store = DeferredWeightGrads()  # set to the microbatch's own before each forward

    def _run(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Optional[Tensor]:
        # The output must need a gradient without the weight (else no hook would see grad_out).
        if id(weight) in self._deferred_ids and (x.requires_grad or (bias is not None and bias.requires_grad)):
            xc, wc = self._compute_copies(x, weight)
            return self._defer(apply_matmul(xc, wc, bias, transposed), weight, xc, transposed)
        return super()._run(x, weight, bias, transposed)  # not deferred: cast once, autograd

    def _defer(self, y: Tensor, weight: nn.Parameter, xc: Tensor, transposed: bool) -> Tensor:
        store = self.store

        def hand_over(grad: Tensor) -> None:
            g2, x2 = grad.reshape(-1, grad.size(-1)), xc.reshape(-1, xc.size(-1))
            a, b = (x2.t(), g2) if transposed else (g2.t(), x2)
            if not store.defer(weight, a, b):  # backward outside the executor's I: accumulate now
                store.accumulate(weight, a, b)

        y.register_hook(hand_over)
        return y

    def _compute_copies(self, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` and a detached ``weight`` in the dtype the op computes in (the autocast dtype under autocast)."""
        dtype = compute_dtype(x)
        if weight.dtype == dtype:
            return x, weight.detach()
        return x.to(dtype), self._casts.get(weight, dtype).detach()


@contextmanager
def explain_checkpoint_errors(what: str) -> Iterator[None]:
    """Around I: ``torch.utils.checkpoint``'s refusal to recompute a layer whose weight gradient is deferred,
    raised again with what to do (see [Note: W as the deferred weight-gradient matmuls]). ``what`` names the
    setting that defers them (``"schedule='zero_bubble'"``, ``"defer_weight_grads=True"``)."""
    try:
        yield
    except CheckpointError as error:
        raise RuntimeError(
            f"With {what} the linear layers' weight gradients are computed outside autograd, which activation "
            "checkpointing with use_reentrant=False cannot recompute. Use another schedule (1f1b, gpipe, "
            "interleaved, chimera) without defer_weight_grads, or torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=True), or no activation checkpointing inside the pipelined model."
        ) from error
