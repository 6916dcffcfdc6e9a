"""One executor for every schedule: it runs a rank's actions in order, moving values with the p2p layer.

The executor knows nothing of Lightning or of how a stage computes: the caller passes ``forward(stage, microbatch,
received)`` and, for training, ``loss(stage, microbatch, output)`` (the scalar to backpropagate on a last stage).
Backward is autograd, per stage: a value entering a stage is a fresh leaf, so B / I of one stage stops at its input,
whose gradient goes to the previous stage. The four compute methods (``_forward``, ``_backward``,
``_backward_input``, ``_backward_weight``) are the only places that compute; the synthetic benchmark replaces them.

[Note: overlap and ordering]
The SEND / RECV actions between two computes (a slot) are posted as one ``dist.batch_isend_irecv`` (NCCL groups
them); the schedule places them so that every rank's batches can run in order on one stream ([Note: communication
actions] in ``schedules.py``), and building an executor runs :func:`~lightning_par.pipeline.simulate.simulate`,
which applies NCCL's rule ([Note: NCCL's in-order rule]) and refuses a schedule that could deadlock. A RECV is
waited right before the compute that uses it: on NCCL ``work.wait()`` makes the current stream wait and returns at
once, so the host runs ahead and a transfer overlaps the compute the device is still running. SENDs are waited at
the end of the step. Shapes: see [Note: batched slots and recorded shapes] in ``lightning_par/comm/p2p.py``. The
caller passes a hashable ``signature`` of the step's input (every rank of a pipeline sees the same batch, so all
compute the same one); the first step with a signature sends metadata and payload over ``side_group`` (gloo) and
records every transfer's shapes; later steps with it post receives of those shapes and never sync the host.
Shapes that change while the signature stays are data-dependent: the sender raises, naming the action.

[Note: stalls]
Nothing may hang silently. Where the host waits (gloo: the slow path, and every wait on a gloo pipeline group) it
waits at most ``stall_timeout`` seconds, then raises ``pipeline rank r: <action> waiting on rank <peer> ...``. On
NCCL the host does not wait for transfers, so a daemon thread watches the posted works (``is_completed()``, which
does not block): when one has not completed for ``stall_timeout`` it prints the same message to stderr, the next
``run`` raises it, and the process group's own timeout aborts the communicator.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_flatten, tree_map

from lightning_par.comm.p2p import (
    META_SLOTS,
    Spec,
    decode_meta,
    describe_spec,
    encode_meta,
    pack_tensors,
    packed_size,
    post_batch,
    spec_of,
    unpack_value,
    wire_meta,
)
from lightning_par.pipeline.schedules import Action, Kind, Schedule, slots
from lightning_par.pipeline.simulate import simulate
from lightning_par.pipeline.split_backward import DeferMatmulWeights, explain_checkpoint_errors
from lightning_par.pipeline.weight_casts import CastLinearWeights, StepCasts
from lightning_par.tensor.deferred_grads import DeferredWeightGrads

__all__ = ["PipelineExecutor"]

ForwardFn = Callable[[int, int, Any], Any]
LossFn = Callable[[int, int, Any], Tensor]
SIGNATURES_KEPT = 64  # recorded input signatures per executor (least recently used dropped)


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


def _backend(group: Optional[ProcessGroup]) -> str:
    return str(dist.get_backend(group)) if dist.is_initialized() else "gloo"


class _Watchdog:
    """Watches NCCL works the host does not wait for (see [Note: stalls]); one daemon thread per executor."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.lock = threading.Lock()
        self.works: list[tuple[str, Any, float]] = []  # (message prefix, work, posted at)
        self.stalled: Optional[str] = None
        self.stop = threading.Event()
        threading.Thread(target=self._loop, name="pipeline-stall-watchdog", daemon=True).start()

    def watch(self, prefix: str, work: Any) -> None:
        with self.lock:
            self.works.append((prefix, work, time.monotonic()))

    def _loop(self) -> None:
        while not self.stop.wait(min(1.0, self.timeout / 4)):
            with self.lock:
                works = list(self.works)
            pending, now = [], time.monotonic()
            for prefix, work, since in works:
                if work.is_completed():
                    continue
                pending.append((prefix, work, since))
                if self.stalled is None and now - since >= self.timeout:
                    self.stalled = (f"{prefix} for {now - since:.0f} s (stall_timeout={self.timeout:g} s; NCCL: the "
                                    "process group's own timeout aborts the communicator)")
                    print(self.stalled, file=sys.stderr, flush=True)
            with self.lock:
                done = {id(w) for _, w, _ in works} - {id(w) for _, w, _ in pending}
                self.works = [x for x in self.works if id(x[1]) not in done]


class _Recv:
    """A posted receive: its work, buffer and (fast path) the recorded spec."""

    __slots__ = ("action", "peer", "work", "buf", "spec", "tag")

    def __init__(self, action: Action, peer: int, work: Any, buf: Tensor, spec: Optional[Spec], tag: int) -> None:
        self.action, self.peer, self.work, self.buf, self.spec, self.tag = action, peer, work, buf, spec, tag


class PipelineExecutor:
    """Runs the actions of ``rank`` in ``schedule``; ``group`` is the pipeline group (group rank = schedule rank).

    ``side_group``: a gloo group over the same ranks for the first step of each input signature (required when
    ``group`` is not gloo; by default ``group`` itself). ``stall_timeout``: seconds before a transfer that does not
    complete raises (see [Note: stalls]). Raises ScheduleError for a schedule that could deadlock.
    ``defer_weights``: schedules without a W action also take the linear layers' weight gradients out of autograd
    (as zero bubble does: [Note: W as the deferred weight-gradient matmuls]) and compute them after the input
    gradient is sent, accumulating them inside the matmul.
    """

    def __init__(self, schedule: Schedule, rank: int, group: Optional[ProcessGroup],
                 device: Optional[torch.device] = None, side_group: Optional[ProcessGroup] = None,
                 stall_timeout: float = 600.0, defer_weights: bool = False) -> None:
        if not 0 <= rank < schedule.ranks:
            raise ValueError(f"rank {rank} is not in a {schedule.ranks}-rank schedule")
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be positive; got {stall_timeout!r}")
        simulate(schedule)  # ScheduleError for a schedule that could deadlock, under NCCL's rule too
        self.schedule = schedule
        self.rank = rank
        self.group = group
        self.actions = schedule.actions[rank]
        self.stall_timeout = float(stall_timeout)
        self.training = any(a.kind in (Kind.B, Kind.I) for a in self.actions)
        self.defer_weights = self.training and (schedule.split_backward or defer_weights)
        # Index of the last action that produces gradients of parameters with hooks, per local stage (see
        # `before_last_backward`): the last B, or the last I (W holds only parameters without hooks: see
        # [Note: W as the deferred weight-gradient matmuls] in split_backward.py).
        self.last_grad_action = {a.stage: i for i, a in enumerate(self.actions) if a.kind in (Kind.B, Kind.I)}
        self._index = {a: i for i, a in enumerate(self.actions)}
        self._items = slots(self.actions)
        # Peer of every transfer, and its position on its channel: the slow path's tags, the same on both ends.
        self._peer: dict[Action, int] = {}
        self._tag: dict[Action, int] = {}
        count: dict[tuple[bool, int], int] = {}
        for a in self.actions:
            if a.kind.is_compute:
                continue
            is_send = a.kind in (Kind.SEND_F, Kind.SEND_B)
            if is_send:
                other = (schedule.next_stage if a.kind is Kind.SEND_F else schedule.prev_stage)(a.stage, a.microbatch)
            else:
                other = (schedule.prev_stage if a.kind is Kind.RECV_F else schedule.next_stage)(a.stage, a.microbatch)
            assert other is not None
            self._peer[a] = peer = schedule.placement[other]
            position = count.get((is_send, peer), 0)
            count[(is_send, peer)] = position + 1
            self._tag[a] = 2 * position + 1
        backend = _backend(group)
        self._device_waits = "nccl" in backend  # the host does not wait for NCCL works
        if side_group is None and backend != "gloo" and self._peer:
            raise ValueError(f"PipelineExecutor on a {backend!r} group needs `side_group`, a gloo group over the same "
                             "ranks (dist.new_group(ranks, backend='gloo')), for the first step of each input shape.")
        self.side_group = side_group if side_group is not None else group
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self.device = device
        self._shapes: OrderedDict[Hashable, dict[Action, Any]] = OrderedDict()
        self._first_run = True
        self._watchdog: Optional[_Watchdog] = None
        self._modes: dict[int, Union[CastLinearWeights, DeferMatmulWeights]] = {}  # see `_forward`
        self._reset()

    def _reset(self) -> None:
        self._recvs: dict[Action, _Recv] = {}
        self._sends: list[tuple[Action, int, Any, list[Tensor]]] = []  # (action, peer, work, buffers kept alive)
        self._to_send: dict[Action, Any] = {}
        self._local: dict[tuple[Kind, int, int], Any] = {}  # values passed between stages of this rank
        self._inputs: dict[tuple[int, int], Any] = {}
        self._outputs: dict[tuple[int, int], Any] = {}
        self._weights: dict[tuple[int, int], DeferredWeightGrads] = {}  # W of each (stage, microbatch)
        for mode in self._modes.values():
            mode.close()  # a stage's weight mode lives for one step
        self._casts = StepCasts()  # the weights in the autocast dtype, for this step
        self._modes = {}  # each local stage's weight mode for the forward, for this step
        self._after_send: list[tuple[int, int]] = []  # the W of a B action, run once its input gradient is posted

    # ----- the compute: overridden by the synthetic benchmark --------------------------------------------------------

    def _forward(self, stage: int, microbatch: int, received: Any) -> Any:
        if not self.training:
            return self._forward_fn(stage, microbatch, received)
        mode = self._modes.get(stage)
        if mode is None:  # one per stage and step: the parameter sets are built once, not per microbatch
            if self.defer_weights:
                mode = DeferMatmulWeights(self._params_fn(stage), self._casts)
            else:
                mode = CastLinearWeights(self._modules_fn(stage), self._params_fn(stage), self._casts)
            self._modes[stage] = mode
        if isinstance(mode, DeferMatmulWeights):
            mode.store = self._weights[(stage, microbatch)] = DeferredWeightGrads()
        with mode:
            return self._forward_fn(stage, microbatch, received)

    def _backward(self, stage: int, microbatch: int, roots: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                  inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        pairs = [(r, g) for r, g in zip(roots, grads) if r.requires_grad]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        return [x.grad for x in inputs]

    def _backward_input(self, stage: int, microbatch: int, roots: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                        inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        weights = self._weights[(stage, microbatch)]
        weights.active = True  # the linear layers hand their weight gradients to W
        try:
            with explain_checkpoint_errors(f"schedule={self.schedule.name!r}" if self.schedule.split_backward
                                           else "defer_weight_grads=True"):
                return self._backward(stage, microbatch, roots, grads, inputs)
        finally:
            weights.active = False

    def _backward_weight(self, stage: int, microbatch: int) -> None:
        self._weights.pop((stage, microbatch)).run()

    def _run_after_send(self) -> None:
        # The slot after a B posts its input gradient first: the previous stage waits for I only, not for W.
        while self._after_send:
            self._backward_weight(*self._after_send.pop(0))

    # ----- running a schedule --------------------------------------------------------------------------------------

    def run(self, forward: ForwardFn, loss: Optional[LossFn] = None,
            params: Optional[Callable[[int], Sequence[torch.nn.Parameter]]] = None,
            modules: Optional[Callable[[int], Sequence[torch.nn.Module]]] = None,
            before_last_backward: Optional[Callable[[int], None]] = None,
            signature: Hashable = None) -> dict[int, Any]:
        """Run this rank's actions; returns ``{microbatch: output}`` of the last stages this rank runs (detached).

        ``loss`` turns a last stage's output into the scalar to backpropagate (training schedules);
        ``params(stage)`` are the parameters whose gradients the W of a zero-bubble schedule computes, and whose
        casts to the autocast dtype are made once per step; ``modules(stage)`` the modules that use them (their
        linear layers read that cast: [Note: one weight cast per step]);
        ``before_last_backward(stage)`` is called right before the last action that adds weight gradients of
        ``stage`` (for gradient communication that must only start after it); ``signature`` identifies the shapes
        of the step's input, the same on every rank of the pipeline (see [Note: overlap and ordering]).
        """
        if self.training and loss is None:
            raise ValueError(f"{self.schedule.name} runs backward: pass `loss`.")
        self._check_watchdog()
        if self._first_run:
            self._first_use()
        self._forward_fn, self._loss_fn = forward, loss
        self._params_fn = params or (lambda stage: [])
        self._modules_fn = modules or (lambda stage: [])
        self._known = self._shapes.get(signature)
        if self._known is not None:
            self._shapes.move_to_end(signature)
        self._record: dict[Action, Any] = {}
        results: dict[int, Any] = {}
        self._reset()
        try:
            for item in self._items:
                action = item[0]
                if not action.kind.is_compute:
                    self._post(item)
                    continue
                if before_last_backward is not None and self.last_grad_action.get(action.stage) == self._index[action]:
                    before_last_backward(action.stage)
                self._run_after_send()
                self._do(action, results)
            self._run_after_send()
            for action, peer, work, _ in self._sends:
                self._wait(work, action, peer, self._known is None)
        finally:
            leftovers = [name for name in ("_recvs", "_to_send", "_local", "_inputs", "_outputs", "_weights")
                         if getattr(self, name)]
            self._reset()
        if leftovers:
            raise RuntimeError(f"pipeline executor: {', '.join(leftovers)} not consumed by {self.schedule.name}")
        if self._known is None:
            self._shapes[signature] = self._record
            while len(self._shapes) > SIGNATURES_KEPT:
                self._shapes.popitem(last=False)
        return results

    def _first_use(self) -> None:
        # NCCL: the first batched p2p on a group must involve all of its ranks; a collective first makes any later
        # batch safe (every rank of the pipeline runs the same executors in the same order).
        if self._peer and dist.get_world_size(self.group) > 1:
            dist.all_reduce(torch.zeros(1, device=self.device), group=self.group)
        self._first_run = False

    def _stall_message(self, action: Action, peer: int, seconds: float) -> str:
        return (f"pipeline rank {self.rank}: {action} waiting on rank {peer} for {seconds:.0f} s "
                f"({self.schedule.name}, stall_timeout={self.stall_timeout:g} s)")

    def _wait(self, work: Any, action: Action, peer: int, slow: bool) -> None:
        if self._device_waits and not slow:
            work.wait()  # a stream wait: the watchdog thread looks after it
            return
        start = time.monotonic()
        try:
            work.wait(timeout=timedelta(seconds=self.stall_timeout))
        except RuntimeError as error:  # gloo raises on its timeout, or when the peer's connection drops
            raise RuntimeError(f"{self._stall_message(action, peer, time.monotonic() - start)}: {error}") from error

    def _check_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.stalled:
            raise RuntimeError(self._watchdog.stalled)

    def _watch(self, action: Action, peer: int, work: Any) -> None:
        if self._watchdog is None:
            self._watchdog = _Watchdog(self.stall_timeout)
            weakref.finalize(self, self._watchdog.stop.set)
        self._watchdog.watch(f"pipeline rank {self.rank}: {action} waiting on rank {peer}", work)

    def _post(self, slot: tuple[Action, ...]) -> None:
        """Post one slot as one batch: the recorded shapes (fast path), else metadata and payload over gloo."""
        known, ops, meta = self._known, [], []
        for action in slot:
            peer, tag = self._peer[action], self._tag[action]
            if action.kind in (Kind.SEND_F, Kind.SEND_B):
                value_meta, items = wire_meta(self._to_send.pop(action))
                if known is None:
                    self._record[action] = value_meta
                    # Slow path: one host copy; the payload's tag follows its metadata's.
                    bufs = [encode_meta(value_meta), pack_tensors(items).cpu()]
                    ops += [(True, bufs[0], peer, tag), (True, bufs[1], peer, tag + 1)]
                else:
                    if known[action] != value_meta:
                        raise RuntimeError(
                            f"pipeline rank {self.rank}: {action} to rank {peer} has shapes "
                            f"{describe_spec(spec_of(value_meta))}, but the first step with this input signature "
                            f"sent {describe_spec(spec_of(known[action]))}. The pipeline's fast path needs shapes "
                            "that are static per input signature (microbatch shapes and dtypes); a stage whose "
                            "output shapes depend on the data cannot use it.")
                    bufs = [pack_tensors(items)]
                    ops.append((True, bufs[0], peer, 0))
                meta.append((action, peer, bufs))
            else:
                if known is None:
                    buf, spec = torch.empty(META_SLOTS, dtype=torch.int64), None
                else:
                    spec = known[action]
                    buf = torch.empty(packed_size(spec), dtype=torch.uint8, device=self.device)
                ops.append((False, buf, peer, tag if known is None else 0))
                meta.append((action, peer, _Recv(action, peer, None, buf, spec, tag)))
        works = post_batch(ops, self.side_group if known is None else self.group)
        at = 0
        for action, peer, what in meta:
            if isinstance(what, _Recv):
                what.work = works[at]
                self._recvs[action] = what
                at += 1
            else:
                for work in works[at: at + len(what)]:
                    self._sends.append((action, peer, work, what))
                at += len(what)
            if self._device_waits and known is not None:
                self._watch(action, peer, works[at - 1])

    def _receive(self, key: Action) -> Any:
        recv = self._recvs.pop(key)
        slow = recv.spec is None
        self._wait(recv.work, key, recv.peer, slow)
        if not slow:
            return unpack_value(recv.buf, recv.spec)
        value_meta, spec = decode_meta(recv.buf)
        self._record[key] = spec
        payload = torch.empty(packed_size(spec), dtype=torch.uint8)
        work = dist.irecv(payload, group=self.side_group, tag=recv.tag + 1, group_src=recv.peer)
        self._wait(work, key, recv.peer, True)
        return unpack_value(payload, spec, self.device)

    def _placed(self, stage: int) -> int:
        return self.schedule.placement[stage]

    def _do(self, action: Action, results: dict[int, Any]) -> None:
        s, m, kind = action.stage, action.microbatch, action.kind
        schedule = self.schedule
        if kind is Kind.F:
            prev = schedule.prev_stage(s, m)
            if prev is None:
                received = None
            elif self._placed(prev) == self.rank:
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
            if self._placed(nxt) == self.rank:
                self._local[(Kind.F, nxt, m)] = _as_leaf(output)
            else:
                self._to_send[Action(s, Kind.SEND_F, m)] = _wire(output)
        elif kind in (Kind.B, Kind.I):
            roots = _tensors(self._outputs.pop((s, m)))
            nxt = schedule.next_stage(s, m)
            if nxt is None:
                grads: list[Optional[Tensor]] = [None] * len(roots)
            else:
                grads = list(_tensors(self._local.pop((Kind.B, s, m)) if self._placed(nxt) == self.rank
                                      else self._receive(Action(s, Kind.RECV_B, m))))
                roots = [r for r in roots if r.requires_grad]
                if len(grads) != len(roots):
                    raise RuntimeError(f"{action}: {len(grads)} gradients for {len(roots)} outputs that need one")
            inputs = [x for x in _tensors(self._inputs.pop((s, m), None)) if x.requires_grad]
            deferred = kind is Kind.I or self.defer_weights
            input_grads = (self._backward_input if deferred else self._backward)(s, m, roots, grads, inputs)
            if kind is Kind.B and deferred:
                self._after_send.append((s, m))
            prev = schedule.prev_stage(s, m)
            if prev is None:
                return
            # Every input that needs a gradient gets one (zeros where it was unused), so the two ends agree.
            value = tuple(g if g is not None else torch.zeros_like(x) for g, x in zip(input_grads, inputs))
            value = value[0] if len(value) == 1 else value
            if self._placed(prev) == self.rank:
                self._local[(Kind.B, prev, m)] = value
            else:
                self._to_send[Action(s, Kind.SEND_B, m)] = value
        elif kind is Kind.W:
            self._backward_weight(s, m)
