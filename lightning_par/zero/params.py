"""The parameters' side of the ZeRO engine: gathering and releasing chunks, the stage-3 hooks, reading parameters
outside forward, and making the module whole again after ``fit``.

``ZeroEngine`` inherits these methods; they read the engine's chunks, policy and group.

[Note: reading a parameter outside forward]
At stage 3 a released chunk's storage is resized to zero behind the parameters' views (see [Note: stage 3 gather
and release] in ``engine.py``): reading such a parameter would read freed memory. Every module's ``_parameters`` is
therefore a ``_GuardedParameters`` dict while the engine runs: reading a parameter by attribute
(``layer.weight``, which is how forward code and user code reach it) while its chunk is released raises
``ParameterNotGathered``, naming the parameter and the remedies; a chunk still on its way (prefetch) is waited for.
A parameter reached by iterating ``module.parameters()`` is a ``ReleasedParameter`` while its chunk is released:
its metadata reads work, a value read raises the same error (see ``released.py``).
``full_params()`` gathers every chunk, on every rank, so that all parameters can be read (and, with
``writeback=True``, changed) between steps.

[Note: stages 1-2 refresh after the step]
At stages 1-2 every rank keeps whole parameters; after the optimizer step each chunk's updated shard is all-gathered
into its compute buffer. Those gathers are launched right after the step and not waited for there: the guard above
(installed at every stage) makes the compute stream wait for a chunk's gather at the first read of one of its
parameters, so the next forward's first layers start while the later chunks are still on the wire (with NCCL's AVG
reduction this took zero2 at 6.7B on 4 x H100 from 38,989 to 40,536 tokens/s). Iterating the parameters (``parameters()``, ``state_dict()``,
``.to()``) waits for all of them first. The waits order streams only; the host never blocks on NCCL.

[Note: stages 1-2 host masters on the copy stream]
Offloaded (ZeRO-Offload), the refresh first copies each host master shard to the device. On the compute stream those
copies (5.25 GB at 1.3B, ~0.1 s) all ran before the next forward's first kernel. They run on the host-to-device
stream instead, each chunk's gather behind its copy, and an event after each (``chunk.copied``) is what the first
read waits for, as the gathers above are; one device (no gather) works the same way. The host writes a master only
after the device has read it: the undelayed step comes after ``finish_backward``, which synchronizes with that stream;
the delayed one waits for ``chunk.read_done``, recorded on it after the copy.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_par.comm.flat import gather_shards
from lightning_par.zero.released import mark_gathered, mark_released

if TYPE_CHECKING:
    from lightning_par.zero.chunk import Chunk
    from lightning_par.zero.host_step import HostStep
    from lightning_par.zero.policy import ZeroPolicy


class ParameterNotGathered(RuntimeError):
    """A stage-3 parameter was read while its chunk is released."""


class _GuardedParameters(dict):
    """A module's ``_parameters`` at stage 3: attribute reads of a released parameter raise (see the note above)."""

    __slots__ = ("engine",)

    def __getitem__(self, name: str) -> Any:
        p = dict.__getitem__(self, name)
        if p is not None:
            self.engine.check_readable(p)
        return p

    # Iterating parameters (``module.parameters()``, ``state_dict()``, ``.to()``) reads values without an attribute
    # read: first let the stream wait for the gathers still in flight (see [Note: stages 1-2 refresh after the step]).
    def items(self) -> Any:
        self.engine.wait_pending_gathers()
        return dict.items(self)

    def values(self) -> Any:
        self.engine.wait_pending_gathers()
        return dict.values(self)

    def __reduce_ex__(self, protocol: Any) -> Any:  # copies and pickles are plain dicts, without the engine
        return dict, (dict(dict.items(self)),)


class ParamsMixin:
    """Gathering and releasing chunks, the stage-3 hooks and parameter guards, ``full_params`` and ``unshard``."""

    # What this part reads from the engine (set in `ZeroEngine.__init__`): its declared interface.
    chunks: list["Chunk"]
    policy: "ZeroPolicy"
    device: torch.device
    group: Any
    world_size: int
    compute_dtype: torch.dtype
    names: dict[nn.Parameter, str]
    original_dtypes: dict[nn.Parameter, torch.dtype]
    where: dict[nn.Parameter, tuple["Chunk", int]]
    _h2d: Optional[torch.cuda.Stream]
    _nccl: bool
    _measuring: bool
    _handles: list[Any]
    _guarded: list[nn.Module]
    _hooked: set[nn.Parameter]
    _module_chunks: dict[nn.Module, list[int]]
    _pending_gathers: list["Chunk"]
    bytes_moved: dict[str, int]
    host_step: Optional["HostStep"]
    settle: Callable[[], None]
    _hook_trainable: Callable[[], None]
    # ----- gather and release --------------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh_compute(self) -> None:
        """Bring the compute buffers up to date with the master shards (after a step or a load): at stages 1-2 the
        all-gathers are launched here and waited for by the next read (see [Note: stages 1-2 refresh after the
        step])."""
        if self.policy.stage == 3:
            self.release_all()  # the next gather casts the master shards
            if self.host_step is not None:
                self.host_step.launch()  # delay_update: the host step prepared by the optimizer step
            return
        # A chunk nothing read since the last refresh (an unused module) may still be on the wire: the stream waits
        # for it before its buffer is written again. This also empties the list, which would otherwise grow.
        self.wait_pending_gathers()
        if self._h2d is not None:
            self._h2d.wait_stream(torch.cuda.current_stream(self.device))  # the last reads of the buffers are done
        for chunk in self.chunks:
            on_h2d = chunk.host and self._h2d is not None  # [Note: stages 1-2 host masters on the copy stream]
            with torch.cuda.stream(self._h2d) if on_h2d else nullcontext():
                self._refresh_chunk(chunk)
                if on_h2d:
                    chunk.copied = self._h2d.record_event()
            if chunk.arriving:
                chunk.gathered = False
                self._pending_gathers.append(chunk)
        if self.host_step is not None:
            self.host_step.launch()  # delay_update: the host step prepared by the optimizer step, after these copies

    def _refresh_chunk(self, chunk: Chunk) -> None:
        """Copy a chunk's master shard into its compute buffer and launch the all-gather, on the current stream."""
        shard = self._compute_shard(chunk)
        if shard.data_ptr() != chunk.master.data_ptr():
            source = self._read_master(chunk)
            if chunk.host:
                self.bytes_moved["h2d"] += source.numel() * source.element_size()
            shard.copy_(source, non_blocking=True)  # casts; from pinned host memory when offloaded
            if chunk.grad_spare is not None and self.device.type == "cuda":  # delay_update: read before it steps
                chunk.read_done = torch.cuda.current_stream(self.device).record_event()
        if self.world_size > 1:
            # NCCL gathers in place (the input is this rank's slice of the output); gloo gets its own copy.
            chunk.gather_input = shard if self._nccl else shard.clone()
            chunk.gather_work = gather_shards(chunk.compute, chunk.gather_input, self.group, async_op=True)

    def _read_master(self, chunk: Chunk) -> Tensor:
        """What the device copies of a master shard: at stage 3 with delay_update, its published compute copy (see
        [Note: the delayed host step])."""
        return chunk.published if chunk.published is not None else chunk.master

    def wait_pending_gathers(self) -> None:
        """Order the current stream after every refresh gather still in flight (no host wait on NCCL)."""
        pending, self._pending_gathers = self._pending_gathers, []
        for chunk in pending:
            if chunk.gather_work is not None:  # not waited for by a read yet
                self._wait_gather(chunk)

    def gather(self, index: int, async_op: bool = False) -> None:
        chunk = self.chunks[index]
        if chunk.gathered or chunk.arriving:
            return
        chunk.compute.untyped_storage().resize_(chunk.padded * chunk.compute.element_size())
        if chunk.host and self._h2d is not None:
            self._gather_from_host(chunk, async_op)
            return
        source = self._read_master(chunk)
        if self.world_size == 1:  # the shard is the chunk: one casting copy, nothing to wait for
            chunk.compute.copy_(source, non_blocking=True)
            chunk.gathered = True
            mark_gathered(chunk.params)
            return
        chunk.gather_input = source.to(self.device, self.compute_dtype, non_blocking=True)
        chunk.gather_work = gather_shards(chunk.compute, chunk.gather_input, self.group, async_op=async_op)
        if not async_op:
            self._wait_gather(chunk)

    def _gather_from_host(self, chunk: Chunk, async_op: bool) -> None:
        """Copy a host master shard to the device (and all-gather it) on the host-to-device stream, so that a
        prefetch overlaps the compute of the modules before."""
        assert self._h2d is not None
        self._h2d.wait_stream(torch.cuda.current_stream(self.device))  # the fresh storage is free on every stream
        source = self._read_master(chunk)
        self.bytes_moved["h2d"] += source.numel() * source.element_size()
        with torch.cuda.stream(self._h2d):
            if self.world_size == 1:
                chunk.compute.copy_(source, non_blocking=True)  # to the device, then cast there
            else:
                chunk.gather_input = source.to(self.device, self.compute_dtype, non_blocking=True)
                chunk.gather_work = gather_shards(chunk.compute, chunk.gather_input, self.group, async_op=True)
            chunk.copied = self._h2d.record_event()
        if not async_op:
            self._wait_gather(chunk)

    def _wait_gather(self, chunk: Chunk) -> None:
        if chunk.gather_work is not None:
            chunk.gather_work.wait()
        if chunk.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(chunk.copied)
        chunk.gather_work = chunk.gather_input = chunk.copied = None
        chunk.gathered = True
        mark_gathered(chunk.params)

    def ensure_gathered(self, index: int) -> None:
        chunk = self.chunks[index]
        if chunk.gathered:
            return
        if not chunk.arriving:
            self.gather(index)
        else:
            self._wait_gather(chunk)

    def release(self, index: int) -> None:
        chunk = self.chunks[index]
        if chunk.arriving:
            self._wait_gather(chunk)
        if chunk.gathered:
            chunk.compute.untyped_storage().resize_(0)
            chunk.gathered = False
            mark_released(chunk.params, self)

    def release_all(self) -> None:
        for chunk in self.chunks:
            self.release(chunk.index)

    # ----- stage 3 hooks --------------------------------------------------------------------------------------------

    def _install_stage3_hooks(self, module: nn.Module) -> None:
        for m in module.modules():
            owned = sorted({self.where[p][0].index for p in m.parameters(recurse=False) if p in self.where})
            if owned:
                self._module_chunks[m] = owned
                self._handles.append(m.register_forward_pre_hook(self._pre_forward))
                self._handles.append(m.register_forward_hook(self._post_forward))

    def begin_forward(self) -> None:
        """Called before every step that runs forward: hook parameters unfrozen since the last step, and reset the
        per-forward module counts of stage 3."""
        if any(p.requires_grad and p not in self._hooked for chunk in self.chunks for p in chunk.params):
            self._hook_trainable()
        if self._measuring and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # "auto" measures the first step's working memory
        if self.host_step is not None:
            self.host_step.forward_started()
        for chunk in self.chunks:
            chunk.forward_remaining = 0
        for owned in self._module_chunks.values():
            for c in owned:
                self.chunks[c].forward_remaining += 1

    def _prefetch(self, index: int) -> None:
        if self.policy.prefetch and 0 <= index < len(self.chunks):
            self.gather(index, async_op=True)

    def _pre_forward(self, m: nn.Module, args: Any) -> None:
        owned = self._module_chunks[m]
        for c in owned:
            self.ensure_gathered(c)
        self._prefetch(owned[-1] + 1)

    def _post_forward(self, m: nn.Module, args: Any, output: Any) -> Any:
        owned = self._module_chunks[m]
        for c in owned:
            chunk = self.chunks[c]
            chunk.forward_remaining -= 1
            if chunk.forward_remaining <= 0 and (self.policy.reshard_after_forward or not torch.is_grad_enabled()):
                self.release(c)
        if torch.is_grad_enabled():
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad]
            for t in tensors:
                t.register_hook(lambda grad, owned=owned: self._pre_backward(owned))
        return output

    def _pre_backward(self, owned: list[int]) -> None:
        for c in owned:
            self.ensure_gathered(c)
        self._prefetch(owned[0] - 1)


    # ----- reading parameters outside forward ---------------------------------------------------------------------

    def _guard_parameters(self, module: nn.Module) -> None:
        for m in module.modules():
            if m._parameters and not isinstance(m._parameters, _GuardedParameters):
                guarded = _GuardedParameters(dict.items(m._parameters))
                guarded.engine = self
                m.__dict__["_parameters"] = guarded
                self._guarded.append(m)

    def _unguard_parameters(self) -> None:
        for chunk in self.chunks:
            mark_gathered(chunk.params)  # plain Parameters again (teardown points them at whole tensors)
        for m in self._guarded:
            if isinstance(m._parameters, _GuardedParameters):
                m.__dict__["_parameters"] = dict(dict.items(m._parameters))
        self._guarded = []

    def check_readable(self, p: nn.Parameter) -> None:
        """Raise ``ParameterNotGathered`` if ``p``'s values are not in memory (stage 3, chunk released)."""
        where = self.where.get(p)
        if where is None:
            return
        chunk = where[0]
        if chunk.gathered:
            return
        if chunk.arriving:  # a prefetch on its way: local, no collective
            self._wait_gather(chunk)
            return
        raise ParameterNotGathered(
            f"{self.names[p]} is sharded by ZeRO stage 3 and released here: its values exist only inside the "
            "forward and backward of the module that owns it. To read it elsewhere (in training_step, a callback), "
            "wrap the read in `with trainer.strategy.full_params():` on every rank (`full_params(writeback=True)` to "
            "change it); or use it through the module that owns it; or use zero2, which keeps whole parameters. "
            "Shapes and dtypes are readable through module.named_parameters()."
        )

    @contextmanager
    def full_params(self, writeback: bool = False) -> Generator[None, None, None]:
        """Every parameter whole and readable inside (a collective: enter it on every rank, outside forward and
        backward). ``writeback=True``: values changed inside are written to the fp32 masters on exit (only the
        changed elements: the others keep their full precision), so that training and checkpoints see them; make
        the same changes on every rank. At stage 3 this holds the whole model in the compute dtype on the device."""
        gathered = []
        self.wait_pending_gathers()
        if self.publish_masters() and self.policy.stage != 3:
            self.refresh_compute()
        if self.policy.stage == 3:
            for chunk in self.chunks:
                if not chunk.gathered or chunk.arriving:
                    gathered.append(chunk.index)
                self.ensure_gathered(chunk.index)
        before = None
        if writeback:
            before = [self._compute_shard(chunk).clone() for chunk in self.chunks]
        try:
            yield
        finally:
            if before is not None:
                self._write_back(before)
            for index in gathered:
                self.release(index)

    def publish_masters(self) -> bool:
        """delay_update: wait for the host step in flight and make the masters what the device reads next (after a
        load, and in ``full_params``, which shows and writes back the latest values); True if there was anything to
        publish. The caller refreshes the compute buffers."""
        self.settle()
        delayed = False
        for chunk in self.chunks:
            delayed = delayed or chunk.grad_spare is not None  # (stages 1-2: the refresh reads the masters)
            if chunk.published is not None:
                chunk.published.copy_(chunk.master)
                chunk.publishing.copy_(chunk.master)
        return delayed

    def _compute_shard(self, chunk: Chunk) -> Tensor:
        return chunk.compute[chunk.shard_start : chunk.shard_start + chunk.shard_numel]

    @torch.no_grad()
    def _write_back(self, before: list[Tensor]) -> None:
        for chunk, old in zip(self.chunks, before):
            now = self._compute_shard(chunk)
            if now.data_ptr() == chunk.master.data_ptr():
                continue  # fp32 stages 1-2 without offload: the masters are this very memory
            changed = now != old
            if bool(changed.any()):
                master = chunk.master.to(now.device)
                chunk.master.copy_(torch.where(changed, now.float(), master))
        self.publish_masters()
        if self.policy.stage != 3:
            self.refresh_compute()  # every rank's compute buffers from the masters again

    # ----- after fit ----------------------------------------------------------------------------------------------

    def drop_gradients(self) -> None:
        """Free every gradient the engine holds (after fit: nothing steps any more)."""
        for chunk in self.chunks:
            chunk.grad_full = chunk.reduced = chunk.reduce_input = None
            chunk.grad_shard = chunk.grad_shard.new_empty(0)
            chunk.grad_spare = None
            for _, q in chunk.pieces:
                q.grad = None
            for p in chunk.params:
                p.grad = None

    @torch.no_grad()
    def unshard_bytes(self, device: torch.device) -> int:
        """Bytes ``unshard(device)`` allocates on ``device`` when it differs from the engine's (the host, for an
        offloading strategy): whole fp32 chunks, except those whose master already lies there (world size 1), and
        the casts of parameters whose original dtype is not fp32."""
        device = torch.device(device)
        if device == self.device:
            return 0
        total = 0
        for chunk in self.chunks:
            if not (self.world_size == 1 and chunk.master.device == device):
                total += 4 * chunk.padded
            total += sum(p.numel() * self.original_dtypes[p].itemsize for p in chunk.params
                         if self.original_dtypes[p] != torch.float32)
        return total

    def unshard(self, device: Optional[torch.device] = None) -> None:
        """Give every parameter back its whole value, from the fp32 masters, in the dtype it had before sharding, on
        ``device`` (default: the engine's): after ``fit`` the module is an ordinary module again, usable and savable
        anywhere. Gradients are freed first; a chunk is gathered on the engine's device (one chunk at a time) and,
        for another ``device``, moved there at once, so the device never holds more than one extra chunk."""
        device = torch.device(device) if device is not None else self.device
        self.settle()  # delay_update: the masters hold every update
        self.wait_pending_gathers()
        self.drop_gradients()
        for chunk in self.chunks:
            shares = chunk.master.untyped_storage().data_ptr() == chunk.compute.untyped_storage().data_ptr()
            if shares and device == self.device and all(self.original_dtypes[p] == torch.float32 for p in chunk.params):
                for i, p in enumerate(chunk.params):  # fp32 stages 1-2: the compute buffer is the gathered masters
                    p.data = chunk.view(chunk.compute, i)
                continue
            if self.world_size == 1 and chunk.master.device == device:
                # The master is the whole chunk already, where it must end (e.g. a host chunk of an offloading
                # strategy made whole on the host): the parameters become its views, with no copy. (10B on one H100,
                # 2026-11-26: the host peaked 38 GiB above the plan's host bytes; copies of host masters were ~20.)
                full = chunk.master
            else:
                full = torch.empty(chunk.padded, dtype=torch.float32, device=self.device)
                if self.world_size == 1:
                    full.copy_(chunk.master)
                else:
                    gather_shards(full, chunk.master.to(self.device), self.group)
                if device != self.device:
                    full = full.to(device)
            for i, p in enumerate(chunk.params):
                view = chunk.view(full, i)
                dtype = self.original_dtypes[p]
                p.data = view if dtype == torch.float32 else view.to(dtype)
            if not shares:
                chunk.compute.untyped_storage().resize_(0)
                chunk.gathered = False
