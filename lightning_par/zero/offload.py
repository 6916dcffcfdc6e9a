"""Placement of chunks across device, host and disk: the part of the ZeRO engine that offloading adds.

``ZeroEngine`` inherits these methods; they read the engine's chunks, policy and optimizers. See
``zero/placement.py`` for the arithmetic of a plan, ``zero/spill.py`` for the optimizer step in windows and
``zero/nvme.py`` for the files.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_par.comm.flat import any_rank
from lightning_par.zero.layout import Piece
from lightning_par.zero.placement import (
    GiB, HostMemoryError, Plan, bytes_per_element, host_memory_available, host_shortfall_message, plan_budget,
    plan_fraction, spill_to_disk, state_tensors,
)

if TYPE_CHECKING:
    from lightning_par.zero.chunk import Chunk
    from lightning_par.zero.host import PinnedHost
    from lightning_par.zero.host_step import HostStep
    from lightning_par.zero.layout import ChunkLayout
    from lightning_par.zero.policy import ZeroPolicy
    from lightning_par.zero.spill import SpilledState


class OffloadMixin:
    """Plans (fixed fraction or measured), chunk moves, host-memory checks agreed by every rank, and the optimizer
    step in windows for chunks whose state is on disk or whose host gradients are 16-bit."""

    # What this part reads from the engine (set in `ZeroEngine.__init__`): its declared interface.
    chunks: list["Chunk"]
    layout: "ChunkLayout"
    policy: "ZeroPolicy"
    plan: Plan
    device: torch.device
    group: Any
    rank: int
    world_size: int
    local_ranks: int
    log: Callable[[str], None]
    host_grad_dtype: torch.dtype
    pinned: "PinnedHost"
    spilled: Optional["SpilledState"]
    optimizer_param_names: dict[torch.optim.Optimizer, list[list[str]]]
    piece_group: dict[int, dict[str, Any]]
    host_step: Optional["HostStep"]
    compute_dtype: torch.dtype
    _measuring: bool

    def _shard_numels(self) -> list[int]:
        return [self.layout.shard_numel(c) for c in range(self.layout.num_chunks)]

    def _device_limit(self) -> Optional[int]:
        """Bytes of device memory the plan may fill, model and working memory together."""
        if self.policy.device_memory_limit is not None:
            return self.policy.device_memory_limit
        if self.device.type != "cuda":
            return None  # host and device are the same memory: nothing to plan
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(0.95 * (free + torch.cuda.memory_reserved(self.device)))

    def _with_grad_bytes(self, plan: Plan) -> Plan:
        extra = 0
        if self.policy.delay_update:  # a spare gradient shard; at stage 3 two compute copies too
            extra = self.host_grad_dtype.itemsize + (2 * self.compute_dtype.itemsize if self.policy.stage == 3 else 0)
        return replace(plan, host_grad_bytes=self.host_grad_dtype.itemsize, host_extra_bytes=extra)

    def _state_tensors(self) -> int:
        return max((state_tensors(opt) for opt in self.optimizer_param_names), default=2)

    def _initial_plan(self) -> Plan:
        numels, per = self._shard_numels(), bytes_per_element(2)
        offload = self.policy.offload
        if offload is None:
            return Plan((False,) * len(numels), per, tuple(numels))
        if offload != "auto":
            return plan_fraction(numels, float(offload), per)
        limit = self._device_limit()
        if limit is None:
            self._measuring = False
            return Plan((False,) * len(numels), per, tuple(numels))
        # Working memory is unknown until a step ran: give the model state half of the device for that first step.
        return plan_budget(numels, 0.5 * limit, per)

    def _fit_host(self, plan: Plan, what: str, held: int = 0,
                  done: str = "Nothing was allocated or written.") -> Plan:
        """The plan with its host part fitted into host memory (spilling optimizer state to disk where allowed), or
        an error on every rank together (no rank goes on into a collective that the others never reach).
        ``held``: host bytes this engine holds already (they count as available); ``done``: see
        ``host_shortfall_message``."""
        if self.policy.offload is None:
            return plan
        limit = self.policy.host_memory_limit
        if limit is None:
            limit = host_memory_available(self.local_ranks) + held

        store = self.spilled.store if self.spilled is not None else None

        def fit() -> Plan:
            fitted = spill_to_disk(plan, limit) if store is not None else plan
            if fitted.host_bytes() > limit:
                raise HostMemoryError(host_shortfall_message(fitted, limit, self.rank, what, done))
            if store is not None:  # disk space, before anything is written
                store.reserve(max(0, fitted.nvme_bytes() - store.reserved))
            return fitted

        return self._agree(fit)

    def _agree(self, make: Callable[[], Any]) -> Any:
        """``make()`` on every rank; if it raised on any rank, raise on all (the others point to its error)."""
        error: Optional[BaseException] = None
        try:
            out = make()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agreed
            error, out = e, None
        if self.world_size > 1:
            if any_rank(error is not None, self.group, self.device) and error is None:
                raise RuntimeError("ZeRO setup failed on another rank (see its error); this rank stops with it.")
        if error is not None:
            raise error
        return out

    @torch.no_grad()
    def _replan(self) -> None:
        """ "auto": after the first backward, measure the working memory (the device's peak less the model state it
        holds) and keep on the device as many chunks as fit beside it; move the others."""
        if self.host_step is not None:
            self.host_step.settle()  # no host step may run on a chunk while it moves
        self._measuring = False
        limit = self._device_limit()
        assert limit is not None
        per = bytes_per_element(self._state_tensors())
        summary = self.placement_summary()
        resident = summary["device_bytes"]
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        working = max(0, peak - resident)
        plan = self._with_grad_bytes(plan_budget(self._shard_numels(), limit - working, per))
        plan = self._fit_host(plan, "The automatic placement", held=summary["host_bytes"],
                              done="The first forward and backward ran to measure it, so masters and gradients are "
                                   "allocated; no optimizer state was, no chunk moved and nothing was written.")
        for chunk in self.chunks:  # (before the first step: no chunk has written state yet)
            chunk.nvme = plan.nvme(chunk.index)
        for to_host in (True, False):  # make room on the device before filling it
            for chunk, on_host in zip(self.chunks, plan.on_host):
                if chunk.host != on_host and on_host == to_host:
                    self._move(chunk, to_host)
        self.plan = plan
        self.log(f"ZeRO placement ('auto', measured: working memory {working / GiB:.2f} GiB of {limit / GiB:.2f} GiB): "
                 f"{plan.describe(str(self.device))}")

    def _move(self, chunk: Chunk, to_host: bool) -> None:
        """Move a chunk's optimizer side between host and device; the optimizer's pieces keep their identity."""
        had_grad = [chunk.window_open[k] if chunk.half_grads else q.grad is not None
                    for k, (_, q) in enumerate(chunk.pieces)]
        if to_host:
            master = self.pinned.empty(chunk.shard_numel).copy_(chunk.master)
            grad = self.pinned.zeros(chunk.shard_numel, self.host_grad_dtype)
            if chunk.grad_shard.numel():  # (a device chunk's stale gradient may have been freed)
                grad.copy_(chunk.grad_shard)
        else:
            master, grad = chunk.master.to(self.device), chunk.grad_shard.to(self.device, torch.float32)
        old = (chunk.master, chunk.grad_shard)
        chunk.master, chunk.grad_shard, chunk.host = master, grad, to_host
        target = master.device
        for k, (piece, q) in enumerate(chunk.pieces):
            lo, hi = piece.shard_offset, piece.shard_offset + piece.numel
            q.data = master[lo:hi]
            q.grad = grad[lo:hi] if had_grad[k] and not chunk.half_grads else None
            chunk.window_open[k] = had_grad[k] and chunk.half_grads
            for opt in self.optimizer_param_names:
                state = opt.state.get(q)
                if not state:
                    continue
                group = self.piece_group[id(q)]
                for name, v in state.items():
                    # Non-fused, non-capturable optimizers keep scalar steps on the CPU; the others beside the data.
                    if isinstance(v, Tensor) and (v.dim() > 0 or group.get("fused") or group.get("capturable")):
                        state[name] = v.to(target)
        for t in old:  # the pieces point at the new tensors now
            self.pinned.free(t)
        if self.host_step is not None:  # delay_update's compute copies follow the chunk to the host, or go
            if to_host:
                self.host_step.attach(chunk, self.compute_dtype, self.pinned, self.policy.stage)
            else:
                self.host_step.detach(chunk, self.pinned)

    def placement_summary(self) -> dict[str, Any]:
        """Bytes of masters, gradient shards and optimizer state on the device and on the host, and the plan."""
        states = {id(q): s for opt in self.optimizer_param_names for q, s in opt.state.items()}
        out = {"chunks": len(self.chunks), "host_chunks": sum(c.host for c in self.chunks),
               "nvme_chunks": sum(c.nvme for c in self.chunks), "device_bytes": 0, "host_bytes": 0,
               "nvme_bytes": self.spilled.bytes_on_disk() if self.spilled is not None else 0,
               "plan": self.plan.describe(str(self.device))}
        for chunk in self.chunks:
            tensors = [chunk.master, chunk.grad_shard]
            tensors += [t for t in (chunk.published, chunk.publishing, chunk.grad_spare) if t is not None]
            tensors += [v for _, q in chunk.pieces for v in states.get(id(q), {}).values()
                        if isinstance(v, Tensor) and v.dim() > 0]
            key = "host_bytes" if chunk.host else "device_bytes"
            out[key] += sum(t.numel() * t.element_size() for t in tensors)
        return out

    def _close_windows_on_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """16-bit host gradients are not the pieces' .grad, so the optimizer's zero_grad cannot clear them: it
        closes their accumulation window instead (the next backward overwrites)."""
        original = optimizer.zero_grad
        mine = {id(q) for g in optimizer.param_groups for q in g["params"]}

        def zero_grad(set_to_none: bool = True) -> None:
            original(set_to_none)
            for chunk in self.chunks:
                for k, (_, q) in enumerate(chunk.pieces):
                    if id(q) in mine:
                        chunk.window_open[k] = False

        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]

    def _window_grads(self, chunk: Chunk, pieces: list) -> dict[nn.Parameter, Tensor]:
        """fp32 gradients for the pieces of a chunk whose host gradient shard is 16-bit (cast for its window)."""
        if not chunk.half_grads:
            return {}
        index = {id(q): k for k, (_, q) in enumerate(chunk.pieces)}
        full = chunk.grad_shard.float()
        out = {}
        for piece, q in pieces:
            k = index[id(q)]
            if chunk.window_open[k] and chunk.trainable[chunk.piece_slots[k]]:
                out[q] = full[piece.shard_offset : piece.shard_offset + piece.numel]
        return out

    def _step_spilled(self, optimizer: torch.optim.Optimizer, opt_index: int) -> None:
        """Make ``optimizer.step`` step the chunks on disk one by one (see [Note: the spilled optimizer step])."""
        original = optimizer.step
        spilled = self.spilled
        assert spilled is not None

        def step(closure: Optional[Callable[[], Any]] = None) -> Any:
            loss = None
            if closure is not None:  # Lightning's closure: forward, backward, clipping
                with torch.enable_grad():
                    loss = closure()
            windowed = [c for c in self.chunks if c.nvme or c.half_grads]
            spilled.step(optimizer, opt_index, windowed, original, self._window_grads)
            return loss

        optimizer.step = step  # type: ignore[method-assign]

    def piece_state(self, optimizer: torch.optim.Optimizer, piece: Piece, q: nn.Parameter) -> dict[str, Any]:
        """A piece's optimizer state, for checkpoints: in memory, or read through a map of its files on disk."""
        chunk = self.chunks[piece.chunk]
        if q in optimizer.state or self.spilled is None or not chunk.nvme:
            return optimizer.state.get(q, {})
        return self.spilled.state_of(list(self.optimizer_param_names).index(optimizer), chunk, piece, q)

    def settle(self) -> None:
        """Wait for a delayed host step in flight (delay_update): the masters and optimizer state hold every update."""
        if self.host_step is not None:
            self.host_step.settle()

    def close(self) -> None:
        """At the end of fit: remove the files of spilled optimizer state, unpin host memory (the shards stay
        readable for a checkpoint saved after fit)."""
        if self.host_step is not None:
            self.host_step.close()
        if self.spilled is not None:
            self.spilled.close()
        self.pinned.close()

