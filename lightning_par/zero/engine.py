"""One chunk-based engine for ZeRO stages 1, 2 and 3.

[Note: what lives where]
Every parameter's ``.data`` is a view into its chunk's *compute* buffer (the compute dtype: fp32, bf16 or fp16),
so modules run unchanged. Each rank owns an even 1/N *shard* of every chunk and keeps, for that shard only, the fp32
*master* weights, the fp32 *gradient* the optimizer reads, and the optimizer state. The user's optimizer is kept
(learning-rate schedulers hold it) but its parameter groups are rewritten to hold *pieces*: 1-D leaf tensors that
share storage with the master shard, one per (parameter, rank) overlap. Element-wise optimizers then compute exactly
what they would on whole parameters.

  stage 1: full gradient buffers stay allocated (``.grad`` are views into them, accumulation is local); at the
           boundary step each chunk is reduce-scattered into the shard gradients as soon as backward fills it.
  stage 2: a chunk's full gradient exists only while backward fills it; it is reduce-scattered at once (every
           micro-step, the shard gradient accumulates) and freed.
  stage 3: stage 2, and the compute buffer itself is freed at rest: gathered before a module that owns its
           parameters runs (forward and backward), freed after (see [Note: stage 3 gather and release]).

After the optimizer step the updated master shards are cast and all-gathered into the compute buffers (stages 1 and
2); at stage 3 the next gather reads them.

[Note: stage 3 gather and release]
Forward: a pre-hook on each module that owns parameters gathers its chunks (waiting for a prefetch started by the
previous module) and starts gathering the next chunk; a post-hook counts the chunk's modules down and frees the
chunk when all have run. Freeing resizes the buffer's storage to zero, so the views that autograd saved stay valid
and see the data again once it is gathered back into the same storage. Backward: a hook on each module output
gathers the module's chunks before its backward runs; a chunk is freed again when all its parameters received
their gradients (autograd accumulates a gradient only after every use of the parameter). Parameters must therefore
be used through the modules that own them (not read functionally from elsewhere) at stage 3; an attribute read
of a released parameter raises instead of reading freed memory (see ``zero/params.py``, which holds these methods).

[Note: launch order]
Collectives must be issued in the same order on every rank: chunk gradients are reduce-scattered strictly from the
last chunk to the first, a chunk that is ready waiting for the ones after it; ``finish_backward`` launches what a
backward left (chunks with unused parameters, which count as zero gradient).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_par.comm.collectives import mean_op
from lightning_par.comm.flat import all_reduce_, broadcast_from_first, is_nccl, reduce_to_shards
from lightning_par.zero.chunk import Chunk
from lightning_par.zero.host import PinnedHost
from lightning_par.zero.host_step import HostStep
from lightning_par.zero.layout import Piece, build_layout
from lightning_par.zero.nvme import NvmeStore
from lightning_par.zero.materialize import Materializer
from lightning_par.zero.offload import OffloadMixin
from lightning_par.zero.params import ParamsMixin
from lightning_par.zero.spill import SpilledState
from lightning_par.zero.policy import ZeroPolicy, check_optimizer
from lightning_par.zero.released import mark_released


class ZeroEngine(OffloadMixin, ParamsMixin):
    """Shards ``module``'s parameters, gradients and optimizer state over ``group`` according to ``policy``."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, policy: ZeroPolicy,
                 compute_dtype: torch.dtype, device: torch.device,
                 log: Optional[Callable[[str], None]] = None, local_ranks: int = 1,
                 param_init_fn: Optional[Callable[[nn.Module], None]] = None) -> None:
        """``log``: where the placement plan is reported; ``local_ranks``: ranks sharing this host's memory;
        ``param_init_fn``: initialises a module built on the meta device (see ``zero/materialize.py``)."""
        self.group = group
        self.local_ranks = local_ranks
        self.log = log or (lambda message: None)
        self.policy = policy
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.compute_dtype = compute_dtype
        self.sync = True  # stage 1 only: False accumulates locally (Lightning's accumulation steps)
        named = list(module.named_parameters())
        self.names = {p: n for n, p in named}
        self.params_by_name = {n: p for n, p in named}
        self.original_dtypes = {p: p.dtype for _, p in named}  # restored by `unshard`
        self.layout = build_layout([(n, p.numel()) for n, p in named], policy.chunk_numel, self.world_size,
                                   policy.allow_oversize)
        self.device = device
        offloading = policy.offload is not None
        # Copies between host and device run on their own streams, beside compute (one per direction: PCIe is duplex).
        self._h2d = torch.cuda.Stream(device) if offloading and device.type == "cuda" else None
        self._d2h = torch.cuda.Stream(device) if offloading and device.type == "cuda" else None
        self._measuring = policy.offload == "auto"  # "auto" re-plans after measuring the first backward
        self.pinned = PinnedHost(enabled=offloading and device.type == "cuda")
        # The host chunks' optimizer step: timed, and in the background with delay_update.
        self.bytes_moved = {"h2d": 0, "d2h": 0}  # host <-> device bytes of the current step (offload)
        self.host_step = (HostStep(lambda: self.chunks, device, policy.delay_update, self._h2d, self.bytes_moved,
                                   self.log) if offloading else None)
        self.host_grad_dtype = compute_dtype if policy.host_grads == "compute" else torch.float32
        if self.host_grad_dtype == torch.float16:
            raise ValueError("host_grads='compute' keeps gradients in the compute dtype, which under 16-mixed is fp16 "
                             "with loss scaling that must see them; use bf16-mixed, or host_grads='fp32'.")
        self.spilled: Optional[SpilledState] = None  # steps chunks in windows (state on disk, 16-bit host gradients)
        if policy.nvme_dir is not None:  # before any other collective: a bad directory fails on every rank at once
            store = self._agree(lambda: NvmeStore(policy.nvme_dir, rank=dist.get_rank()))
            self.spilled = SpilledState(store)
            self.log(f"ZeRO optimizer state that does not fit in host memory spills to {store.path}")
        elif offloading and self.host_grad_dtype != torch.float32:
            self.spilled = SpilledState(None)
        plan = self._with_grad_bytes(self._initial_plan())
        # Before any allocation. "auto"'s first plan holds no optimizer state on the host before it re-plans
        # (masters and gradients only: 8 bytes per element); the re-plan checks the state too.
        first = replace(plan, bytes_per_element=8) if self._measuring else plan
        first = self._fit_host(first, "The placement")
        self.plan = replace(plan, on_nvme=first.on_nvme)
        if any(self.plan.on_host):
            self.log(f"ZeRO placement ({policy.offload!r}{', before measuring' if self._measuring else ''}): "
                     f"{self.plan.describe(str(device))}")
        # The master shard can be the compute buffer's own shard only if nothing else must survive a free.
        separate_master = compute_dtype != torch.float32 or policy.stage == 3 or offloading
        params = [p for _, p in named]
        owners: dict[nn.Parameter, list[nn.Module]] = {}
        for m in module.modules():
            for q in m.parameters(recurse=False):
                owners.setdefault(q, []).append(m)
        self.chunks: list[Chunk] = []
        materializer = Materializer(module, device, param_init_fn)
        with torch.no_grad():
            # One chunk at a time: gather its initial values (materialising meta parameters), agree on them across
            # ranks, keep the shard, and point the parameters at the chunk, so that at stage 3 a model built on the
            # meta device never exists whole on this device.
            for c in range(self.layout.num_chunks):
                chunk_params = [params[i] for i, s in enumerate(self.layout.slots) if s.chunk == c]
                full = torch.zeros(self.layout.padded_numel(c), dtype=torch.float32, device=device)
                for p, slot in zip(chunk_params, self.layout.slots_in(c)):
                    if p.is_meta:
                        for m in owners[p]:
                            materializer.materialize(m)
                    full[slot.offset : slot.offset + slot.numel].copy_(p.detach().reshape(-1))
                if self.world_size > 1:  # ranks may have initialised differently: rank 0's values win
                    broadcast_from_first(full, group)
                chunk = Chunk(c, chunk_params, full, self.layout, self.rank, separate_master, compute_dtype, device,
                               host=self.plan.on_host[c], pinned=self.pinned, host_grad_dtype=self.host_grad_dtype)
                chunk.nvme = self.plan.nvme(c)
                if self.host_step is not None:
                    self.host_step.attach(chunk, compute_dtype, self.pinned, policy.stage)
                for i, p in enumerate(chunk.params):
                    p.data = chunk.view(chunk.compute, i)
                self.chunks.append(chunk)
                if policy.stage == 3:
                    chunk.compute.untyped_storage().resize_(0)
                    chunk.gathered = False
                    mark_released(chunk.params, self)
            for m in module.modules():  # meta buffers of modules that own no parameters
                materializer.materialize(m)
        self.where = {p: (chunk, i) for chunk in self.chunks for i, p in enumerate(chunk.params)}
        self._next_reduce = len(self.chunks) - 1
        self._nccl = is_nccl(group)  # gathers in place (see `refresh_compute`)
        self._reduce_op, self._divide_first = mean_op(group)  # NCCL: AVG; gloo: divide, then SUM
        self._handles: list[Any] = []
        self._guarded: list[nn.Module] = []  # modules whose parameters are read-guarded (stage 3)
        self._hooked: set[nn.Parameter] = set()
        self._in_flight: list[Chunk] = []  # reductions launched and not yet waited for (stages 2-3)
        self._backward_started = False
        self._hook_trainable()
        self._module_chunks: dict[nn.Module, list[int]] = {}
        # Names of each optimizer's parameters by group, as the user built it: checkpoints map state by name.
        self.optimizer_param_names: dict[torch.optim.Optimizer, list[list[str]]] = {}
        self.piece_group: dict[int, dict[str, Any]] = {}  # id(piece) -> its optimizer's parameter group
        self._pending_gathers: list[Chunk] = []  # stages 1-2: refresh gathers not yet waited for
        if policy.stage == 3:
            self._install_stage3_hooks(module)
        # Stage 3: reads of released parameters raise; stages 1-2: reads wait for the refresh after the step.
        self._guard_parameters(module)

    def _hook_trainable(self) -> None:
        """Gradient hooks on every parameter that requires grad, including ones unfrozen since the last step."""
        for chunk in self.chunks:
            for p in chunk.params:
                if p.requires_grad and p not in self._hooked:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
                    self._hooked.add(p)
            chunk.reset_round()

    # ----- optimizer ------------------------------------------------------------------------------------------------

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Rewrite ``optimizer``'s parameter groups to hold this rank's pieces (see [Note: what lives where])."""
        kind = type(optimizer).__name__
        check_optimizer(optimizer, self.policy.allow_untested_optimizer)
        if optimizer.state:
            raise RuntimeError(f"{kind} already has state; ZeRO must shard it before the first step.")
        self.optimizer_param_names[optimizer] = [[self.names[p] for p in g["params"]] for g in optimizer.param_groups]
        pieces_of = {}
        for piece in self.layout.pieces(self.rank):
            pieces_of.setdefault(piece.name, []).append(piece)
        for group in optimizer.param_groups:
            sharded = []
            for p in group["params"]:
                if p not in self.where:
                    raise ValueError("The optimizer holds a parameter that is not part of the module ZeRO shards.")
                chunk, _ = self.where[p]
                for piece in pieces_of.get(self.names[p], []):
                    lo, hi = piece.shard_offset, piece.shard_offset + piece.numel
                    shard_param = nn.Parameter(chunk.master[lo:hi], requires_grad=p.requires_grad)
                    chunk.pieces.append((piece, shard_param))
                    chunk.piece_slots.append(self.where[p][1])
                    chunk.window_open.append(False)
                    self.piece_group[id(shard_param)] = group
                    sharded.append(shard_param)
            group["params"] = sharded
            if self.policy.offload is not None and kind in ("Adam", "AdamW") and not group.get("fused"):
                # torch's fused CPU Adam(W) is ~4x its foreach path on 16 cores (ANCHORS.md): the step is on the host.
                group["fused"], group["foreach"] = True, False
        if self.spilled is not None:
            self._step_spilled(optimizer, len(self.optimizer_param_names) - 1)
            self._close_windows_on_zero_grad(optimizer)
        elif self.host_step is not None:
            if self.policy.delay_update and len(self.optimizer_param_names) > 1:
                raise ValueError("delay_update steps one optimizer's host pieces in the background; this module has "
                                 f"{len(self.optimizer_param_names)} optimizers. Use one, or leave delay_update off.")
            self.host_step.wrap(optimizer)
        # [Note: no step under an in-flight refresh] At stages 1-2 in fp32 a master shard is this rank's slice of
        # its chunk's compute buffer, and the refresh after a step all-gathers into that buffer without waiting
        # (see [Note: stages 1-2 refresh after the step] in params.py). With several optimizers stepping in a row
        # (manual optimization), the gather launched after the first step must land before the second step writes
        # the shard: on gloo it writes back the shard's pre-step copy, which would undo the second step, and on
        # NCCL it reads the shard as its input. After an automatic step the next forward has waited for every
        # gather already, so this wait finds nothing pending and orders nothing.
        optimizer.register_step_pre_hook(lambda *_: self.wait_pending_gathers())

    def optimizer_pieces(self, optimizer: torch.optim.Optimizer) -> list[tuple[str, Piece, nn.Parameter]]:
        mine = {id(q) for g in optimizer.param_groups for q in g["params"]}
        return [(piece.name, piece, q) for chunk in self.chunks for piece, q in chunk.pieces if id(q) in mine]

    # ----- gradients ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._backward_started:
            self._backward_started = True
            self._drop_stale_gradients()
        chunk, i = self.where[p]
        if self.policy.stage == 1:
            if chunk.grad_full is None:  # zeros: the padding must stay zero
                chunk.grad_full = torch.zeros(chunk.padded, dtype=self.compute_dtype, device=chunk.compute.device)
            view = chunk.view(chunk.grad_full, i)
            if p.grad.data_ptr() != view.data_ptr():  # a fresh gradient: the first of this accumulation window
                view.copy_(p.grad)
                p.grad = view
        else:
            if chunk.grad_full is None:  # no memset: every slot is written by its hook or zeroed at launch
                chunk.grad_full = torch.empty(chunk.padded, dtype=self.policy.reduce_dtype, device=chunk.compute.device)
            chunk.view(chunk.grad_full, i).copy_(p.grad)
            p.grad = None  # the full gradient lives in the chunk only until it is reduce-scattered
        chunk.touched[i] = True
        if self.policy.stage == 1 and not self.sync:
            return
        if chunk.ready[i]:
            raise RuntimeError(
                f"{self.names[p]} received its gradient twice in one backward (reentrant activation checkpointing "
                "does this); use torch.utils.checkpoint with use_reentrant=False."
            )
        chunk.ready[i] = True
        chunk.pending -= 1
        if chunk.pending == 0:
            if self.policy.stage == 3 and all(chunk.trainable):
                self.release(chunk.index)  # every use of its parameters in this backward is done
            self._launch_ready()

    def _drop_stale_gradients(self) -> None:
        """At the start of a backward that opens an accumulation window (the optimizer's zero_grad set every
        piece's gradient to None), free the device chunks' shard gradients of the last window: this backward's
        reduced gradients replace them, and holding both would cost 4 bytes per element at the peak."""
        for chunk in self.chunks:
            if not chunk.host and chunk.pieces and all(q.grad is None for _, q in chunk.pieces):
                chunk.grad_shard = chunk.grad_shard.new_empty(0)

    def _launch_ready(self) -> None:
        while self._next_reduce >= 0 and self.chunks[self._next_reduce].pending == 0:
            self._launch_reduce(self.chunks[self._next_reduce])
            self._next_reduce -= 1

    def _launch_reduce(self, chunk: Chunk) -> None:
        if not any(chunk.trainable):
            return
        if chunk.grad_full is None:  # nothing arrived: every parameter unused in this backward
            chunk.grad_full = torch.zeros(chunk.padded, dtype=self.policy.reduce_dtype, device=chunk.compute.device)
        # Parameters without a gradient in this window count as zero (stage 1 may hold an older window's values).
        for i, touched in enumerate(chunk.touched):
            if not touched:
                chunk.view(chunk.grad_full, i).zero_()
        if self.policy.stage == 1:
            full = chunk.grad_full.to(self.policy.reduce_dtype, copy=True)  # keeps the local buffer for accumulation
        else:
            full = chunk.grad_full
            full[self.layout.chunk_numels[chunk.index] :].zero_()  # padding of an uninitialised buffer
        if self.world_size == 1:
            chunk.reduced = full  # nothing to reduce: the chunk is its own shard
            if self.policy.stage != 1:
                chunk.grad_full = None
            self._to_host_early(chunk)
            return
        if self._divide_first:
            full.div_(self.world_size)
        chunk.reduced = torch.empty(chunk.shard_numel, dtype=self.policy.reduce_dtype, device=full.device)
        chunk.reduce_work = reduce_to_shards(chunk.reduced, full, self._reduce_op, self.group, async_op=True)
        chunk.reduce_input = full  # keep alive until the collective is done
        if self.policy.stage != 1:
            # Stages 2-3 hold a full gradient only while it is on the wire: wait for all but the two most recent
            # reductions and free their full buffers, so at most ~3 full chunks of gradient exist during backward.
            chunk.grad_full = None
            self._in_flight.append(chunk)
            while len(self._in_flight) > 2:
                self._wait_reduce(self._in_flight.pop(0))

    def _wait_reduce(self, chunk: Chunk) -> None:
        if chunk.reduce_work is not None:
            chunk.reduce_work.wait()
        chunk.reduce_work = chunk.reduce_input = None
        self._to_host_early(chunk)

    def _to_host_early(self, chunk: Chunk) -> None:
        """ZeRO-Offload: start copying a reduced shard gradient to the host at once, so that the copy overlaps the
        rest of backward (only when it overwrites: a new accumulation window, or stage 1)."""
        if not chunk.host or chunk.reduced is None or chunk.grad_sent:
            return
        if self.policy.stage == 1 or all(self._fresh(chunk)):
            self.bytes_moved["d2h"] += chunk.reduced.numel() * chunk.reduced.element_size()
            copied = None
            if self._d2h is None:
                chunk.grad_shard.copy_(chunk.reduced)
            else:  # on the copy stream, beside the rest of backward
                self._d2h.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._d2h):
                    chunk.grad_shard.copy_(chunk.reduced, non_blocking=True)
                    copied = self._d2h.record_event()
                chunk.reduced.record_stream(self._d2h)  # not reused before the copy read it
            chunk.grad_sent = True
            if self.host_step is not None and not self._measuring:  # ("auto" may move this chunk after backward)
                self.host_step.gradient_on_host(chunk, copied)  # [Note: the early host step]
            # The device copy is not needed any more: holding every host chunk's reduced gradient on the device until
            # backward ends would cost 4 bytes per offloaded element at the peak.
            chunk.reduced = None
            if self.policy.stage != 1:  # (stage 1 keeps its full gradient buffer for the next window)
                chunk.grad_full = None

    @torch.no_grad()
    def finish_backward(self) -> None:
        """Reduce what backward left, wait for every chunk, and hand the shard gradients to the optimizer pieces."""
        self._backward_started = False
        if self.policy.stage == 1 and not self.sync:
            return
        for chunk in self.chunks[: self._next_reduce + 1][::-1]:
            self._launch_reduce(chunk)
        self._next_reduce = len(self.chunks) - 1
        self._in_flight = []
        for chunk in self.chunks:
            if chunk.reduced is not None or chunk.grad_sent:
                self._take_reduced(chunk)
            chunk.reset_round()
        if self.host_step is not None:
            self.host_step.backward_done()  # (before the wait below, which then completes it)
        if self._d2h is not None and any(chunk.host for chunk in self.chunks):
            # The host's gradients are complete before the CPU step reads them (no wait when the plan keeps every
            # chunk on the device: then nothing was copied, and waiting would only stall the host). The refresh's
            # copies of the masters are done too before it writes them ([Note: stages 1-2 host masters on the copy
            # stream] in params.py).
            self._d2h.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
            if self._h2d is not None:
                self._h2d.synchronize()
        if self.policy.stage == 3:
            self.release_all()
        if self._measuring:
            self._replan()

    def _fresh(self, chunk: Chunk) -> list[bool]:
        """Per piece: the optimizer's zero_grad ran since its last gradient (a new accumulation window)."""
        if chunk.half_grads:
            return [not open_ for open_ in chunk.window_open]
        return [q.grad is None for _, q in chunk.pieces]

    def _take_reduced(self, chunk: Chunk) -> None:
        self._wait_reduce(chunk)
        fresh = self._fresh(chunk)
        if chunk.host:
            if chunk.grad_sent:
                pass  # copied as soon as it was reduced; waited for at the end of finish_backward
            elif self.policy.stage == 1 or all(fresh):
                self.bytes_moved["d2h"] += chunk.reduced.numel() * chunk.reduced.element_size()
                chunk.grad_shard.copy_(chunk.reduced, non_blocking=True)
            else:
                for (piece, _), is_fresh in zip(chunk.pieces, fresh):
                    if is_fresh:
                        chunk.grad_shard[piece.shard_offset : piece.shard_offset + piece.numel].zero_()
                chunk.grad_shard.add_(chunk.reduced.cpu())
        elif self.policy.stage == 1 or all(fresh):
            # Stage 1 overwrites (its full buffer accumulated the window); a fresh window starts from the reduced
            # shard itself. Either way the new tensor becomes the shard gradient: no copy.
            chunk.grad_shard = chunk.reduced.float()
        else:
            for (piece, _), is_fresh in zip(chunk.pieces, fresh):
                if is_fresh:
                    chunk.grad_shard[piece.shard_offset : piece.shard_offset + piece.numel].zero_()
            chunk.grad_shard.add_(chunk.reduced)
        for k, ((piece, q), i) in enumerate(zip(chunk.pieces, chunk.piece_slots)):
            if chunk.half_grads:  # held by the chunk until the step (see `_window_grads`)
                chunk.window_open[k] = True
                continue
            # A frozen parameter's pieces get no gradient, so the optimizer leaves them alone.
            q.grad = chunk.grad_shard[piece.shard_offset : piece.shard_offset + piece.numel] if chunk.trainable[i] else None
        chunk.reduced = None
        chunk.grad_sent = False
        if self.policy.stage == 1:
            # The optimizer's zero_grad only reaches the pieces: drop the module's own .grad so that the next window
            # starts from zero (its hooks copy instead of adding).
            for p in chunk.params:
                p.grad = None
        else:
            chunk.grad_full = None

    def shard_gradients(self, optimizer: Optional[torch.optim.Optimizer] = None) -> list[tuple[str, Tensor]]:
        """(parameter name, gradient of this rank's piece of it) for every piece that has a gradient now, of
        ``optimizer`` (default: all)."""
        mine = None if optimizer is None else {id(q) for g in optimizer.param_groups for q in g["params"]}
        out = []
        for chunk in self.chunks:
            for k, (piece, q) in enumerate(chunk.pieces):
                if mine is not None and id(q) not in mine:
                    continue
                if chunk.half_grads:  # 16-bit host gradients, held by their chunks
                    if chunk.window_open[k] and chunk.trainable[chunk.piece_slots[k]]:
                        out.append((piece.name, chunk.grad_shard[piece.shard_offset : piece.shard_offset + piece.numel]))
                elif q.grad is not None:
                    out.append((piece.name, q.grad))
        return out

    def _all_reduce(self, t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        if self.world_size == 1:
            return t
        on_device = t.to(self.device)  # NCCL reduces device tensors (offloaded gradients are on the host)
        return all_reduce_(on_device, self.group, op).to(t.device)

    @torch.no_grad()
    def grad_norm(self, norm_type: float = 2.0) -> dict[str, Tensor]:
        """Lightning's ``grad_norm(module, norm_type)`` over the sharded gradients: the norm of each parameter's
        whole gradient and their total, from every rank's shards (a collective: call it on every rank, after
        backward and before the optimizer step, e.g. in ``on_before_optimizer_step``)."""
        norm_type = float(norm_type)
        index = {s.name: i for i, s in enumerate(self.layout.slots)}
        acc = torch.zeros(len(index), dtype=torch.float64, device=self.device)
        has = torch.zeros(len(index), dtype=torch.float64, device=self.device)
        for name, g in self.shard_gradients():
            g = g.detach().to(self.device, torch.float64)
            i = index[name]
            has[i] = 1.0
            if norm_type == float("inf"):
                acc[i] = torch.maximum(acc[i], g.abs().max()) if g.numel() else acc[i]
            else:
                acc[i] += g.abs().pow(norm_type).sum()
        inf = norm_type == float("inf")
        acc = self._all_reduce(acc, dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM)
        has = self._all_reduce(has, dist.ReduceOp.MAX)
        per = acc if inf else acc.pow(1.0 / norm_type)
        norms = {f"grad_{norm_type}_norm/{s.name}": per[i].float() for i, s in enumerate(self.layout.slots) if has[i]}
        if norms:
            norms[f"grad_{norm_type}_norm_total"] = torch.stack(list(norms.values())).norm(norm_type)
        return norms

    # ----- bookkeeping ----------------------------------------------------------------------------------------------

    def memory_report(self, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
        """Bytes this rank holds now: parameters (compute buffers + separate masters), gradients, optimizer state."""
        params = grads = 0
        for chunk in self.chunks:
            params += chunk.compute.untyped_storage().nbytes()
            if chunk.master.untyped_storage().data_ptr() != chunk.compute.untyped_storage().data_ptr():
                params += chunk.master.untyped_storage().nbytes()
            grads += chunk.grad_shard.untyped_storage().nbytes()
            if chunk.grad_full is not None:
                grads += chunk.grad_full.untyped_storage().nbytes()
        state = sum(
            t.untyped_storage().nbytes()
            for opt in optimizers for s in opt.state.values() for t in s.values()
            if isinstance(t, Tensor) and t.dim() > 0
        )
        return {"parameters": params, "gradients": grads, "optimizer_state": state}

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = set()
        self._unguard_parameters()
