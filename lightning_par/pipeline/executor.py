"""One executor for every schedule: it runs a rank's actions in order, moving values with the p2p layer.

The executor knows nothing of Lightning or of how a stage computes: the caller passes ``forward(stage, microbatch,
received)`` and, for training, ``loss(stage, microbatch, output)`` (the scalar to backpropagate on a last stage).
Backward is autograd, per stage: a value entering a stage is a fresh leaf, so B / I of one stage stops at its input,
whose gradient goes to the previous stage. The four compute methods (``_forward``, ``_backward``,
``_backward_input``, ``_backward_weight``) are the only places that compute; the synthetic benchmark replaces them.

[Note: overlap and ordering]
SENDs are posted and not waited until the end of the step, so a rank computes while its results travel. A RECV is
posted where the schedule puts it (one compute before its use) and waited when its compute starts. Transfers go
through one :class:`~lightning_par.comm.p2p.ShapeCache` per executor, kept across steps: once a value's shapes
have crossed a hop, each transfer is one message posted whole at the RECV, so it also overlaps the compute before
its use (see [Note: the known-shapes fast path] in ``lightning_par/comm/p2p.py``). Two receives from one peer are
never in flight together: the earlier one may change the cached shapes, so posting a RECV first completes the
previous one from that peer (the p2p layer does it). The simulator applies the same rule, which is why a schedule
that passes :func:`~lightning_par.pipeline.simulate.simulate` cannot deadlock here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_flatten, tree_map

from lightning_par.comm.p2p import RecvHandle, SendHandle, ShapeCache, irecv_tensors, isend_tensors
from lightning_par.pipeline.schedules import Action, Kind, Schedule
from lightning_par.pipeline.split_backward import WeightGradients, backward_input

__all__ = ["PipelineExecutor"]

ForwardFn = Callable[[int, int, Any], Any]
LossFn = Callable[[int, int, Any], Tensor]


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, Tensor)]


def _as_leaf(value: Any) -> Any:
    """A value entering a stage: a detached leaf that keeps ``requires_grad`` (so backward stops here)."""
    return tree_map(lambda t: t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t, value)


def _wire(value: Any) -> Any:
    """What goes over p2p: the tensor, or a tuple of tensors (the p2p layer's two shapes)."""
    tensors = _tensors(value)
    if isinstance(value, Tensor):
        return value
    if len(tensors) != len(tree_flatten(value)[0]):
        raise TypeError(f"A pipeline stage may only pass tensors to the next stage; got {type(value).__name__} "
                        "with non-tensor entries.")
    return tuple(tensors)


class PipelineExecutor:
    """Runs the actions of ``rank`` in ``schedule``; ``group`` is the pipeline group (group rank = schedule rank)."""

    def __init__(self, schedule: Schedule, rank: int, group: Optional[ProcessGroup],
                 device: Optional[torch.device] = None) -> None:
        if not 0 <= rank < schedule.ranks:
            raise ValueError(f"rank {rank} is not in a {schedule.ranks}-rank schedule")
        self.schedule = schedule
        self.rank = rank
        self.group = group
        self.device = device
        self.actions = schedule.actions[rank]
        self.training = any(a.kind in (Kind.B, Kind.I) for a in self.actions)
        # Index of the last action that produces weight gradients of each local stage (see `before_last_backward`).
        grad_kind = (Kind.W,) if schedule.split_backward else (Kind.B,)
        self.last_grad_action = {a.stage: i for i, a in enumerate(self.actions) if a.kind in grad_kind}
        # Every executor of a pipeline is built alike on each of its ranks, so the caches of two ends pair up.
        self._shapes = ShapeCache()
        self._reset()

    def _reset(self) -> None:
        self._recvs: dict[Action, RecvHandle] = {}
        self._sends: list[SendHandle] = []
        self._to_send: dict[Action, Any] = {}
        self._local: dict[tuple[Kind, int, int], Any] = {}  # values passed between stages of this rank
        self._inputs: dict[tuple[int, int], Any] = {}
        self._outputs: dict[tuple[int, int], Any] = {}
        self._weights: dict[tuple[int, int], WeightGradients] = {}

    # ----- the compute: overridden by the synthetic benchmark --------------------------------------------------------

    def _forward(self, stage: int, microbatch: int, received: Any) -> Any:
        return self._forward_fn(stage, microbatch, received)

    def _backward(self, stage: int, microbatch: int, roots: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                  inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        return [x.grad for x in inputs]

    def _backward_input(self, stage: int, microbatch: int, roots: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                        inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        input_grads, weights = backward_input(roots, grads, inputs, self._params_fn(stage))
        self._weights[(stage, microbatch)] = weights
        return list(input_grads)

    def _backward_weight(self, stage: int, microbatch: int) -> None:
        self._weights.pop((stage, microbatch)).run()

    # ----- running a schedule --------------------------------------------------------------------------------------

    def run(self, forward: ForwardFn, loss: Optional[LossFn] = None,
            params: Optional[Callable[[int], Sequence[torch.nn.Parameter]]] = None,
            before_last_backward: Optional[Callable[[int], None]] = None) -> dict[int, Any]:
        """Run this rank's actions; returns ``{microbatch: output}`` of the last stages this rank runs (detached).

        ``loss`` turns a last stage's output into the scalar to backpropagate (training schedules);
        ``params(stage)`` are the parameters whose gradients the W of a zero-bubble schedule computes;
        ``before_last_backward(stage)`` is called right before the last action that adds weight gradients of
        ``stage`` (for gradient communication that must only start after it).
        """
        if self.training and loss is None:
            raise ValueError(f"{self.schedule.name} runs backward: pass `loss`.")
        self._forward_fn, self._loss_fn = forward, loss
        self._params_fn = params or (lambda stage: [])
        results: dict[int, Any] = {}
        self._reset()
        try:
            for index, action in enumerate(self.actions):
                if before_last_backward is not None and self.last_grad_action.get(action.stage) == index:
                    before_last_backward(action.stage)
                self._do(action, results)
            for handle in self._sends:
                handle.wait()
        finally:
            leftovers = [name for name in ("_recvs", "_to_send", "_local", "_inputs", "_outputs", "_weights")
                         if getattr(self, name)]
            self._reset()
        if leftovers:
            raise RuntimeError(f"pipeline executor: {', '.join(leftovers)} not consumed by {self.schedule.name}")
        return results

    def _peer(self, stage: int) -> int:
        return self.schedule.placement[stage]

    def _receive(self, key: Action) -> Any:
        return self._recvs.pop(key).wait()

    def _source(self, recv: Action) -> int:
        s, m = recv.stage, recv.microbatch
        other = self.schedule.prev_stage(s, m) if recv.kind is Kind.RECV_F else self.schedule.next_stage(s, m)
        assert other is not None
        return self._peer(other)

    def _do(self, action: Action, results: dict[int, Any]) -> None:
        s, m, kind = action.stage, action.microbatch, action.kind
        schedule = self.schedule
        if kind in (Kind.RECV_F, Kind.RECV_B):
            # Completes the previous receive from the same peer first: see [Note: overlap and ordering].
            self._recvs[action] = irecv_tensors(self._source(action), self.group, self.device, self._shapes)
        elif kind in (Kind.SEND_F, Kind.SEND_B):
            target = (schedule.next_stage if kind is Kind.SEND_F else schedule.prev_stage)(s, m)
            assert target is not None
            self._sends.append(isend_tensors(self._to_send.pop(action), self._peer(target), self.group,
                                            self._shapes))
        elif kind is Kind.F:
            prev = schedule.prev_stage(s, m)
            if prev is None:
                received = None
            elif self._peer(prev) == self.rank:
                received = self._local.pop((Kind.F, s, m))
            else:
                received = _as_leaf(self._receive(Action(s, Kind.RECV_F, m)))
            output = self._forward(s, m, received)
            nxt = schedule.next_stage(s, m)
            if self.training:
                self._inputs[(s, m)] = received
                self._outputs[(s, m)] = output if nxt is not None else self._loss_fn(s, m, output)
            if nxt is None:
                results[m] = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, output)
                return
            if self._peer(nxt) == self.rank:
                self._local[(Kind.F, nxt, m)] = _as_leaf(output)
            else:
                self._to_send[Action(s, Kind.SEND_F, m)] = _wire(output)
        elif kind in (Kind.B, Kind.I):
            roots = _tensors(self._outputs.pop((s, m)))
            nxt = schedule.next_stage(s, m)
            if nxt is None:
                grads: list[Optional[Tensor]] = [None] * len(roots)
            else:
                grads = list(_tensors(self._local.pop((Kind.B, s, m)) if self._peer(nxt) == self.rank
                                      else self._receive(Action(s, Kind.RECV_B, m))))
                roots = [r for r in roots if r.requires_grad]
                if len(grads) != len(roots):
                    raise RuntimeError(f"{action}: {len(grads)} gradients for {len(roots)} outputs that need one")
            inputs = [x for x in _tensors(self._inputs.pop((s, m), None)) if x.requires_grad]
            compute = self._backward if kind is Kind.B else self._backward_input
            input_grads = compute(s, m, roots, grads, inputs)
            prev = schedule.prev_stage(s, m)
            if prev is None:
                return
            # Every input that needs a gradient gets one (zeros where it was unused), so the two ends agree.
            value = tuple(g if g is not None else torch.zeros_like(x) for g, x in zip(input_grads, inputs))
            value = value[0] if len(value) == 1 else value
            if self._peer(prev) == self.rank:
                self._local[(Kind.B, prev, m)] = value
            else:
                self._to_send[Action(s, Kind.SEND_B, m)] = value
        elif kind is Kind.W:
            self._backward_weight(s, m)
