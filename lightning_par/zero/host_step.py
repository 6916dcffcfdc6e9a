"""The optimizer step of offloaded chunks: timed at each step; on a worker thread beside the next step's forward and
backward (``delay_update``, the note below) or during this step's backward (``step_during_backward``, [Note: the
early host step] in ``HostStep.__init__``).

[Note: the delayed host step]
ZeRO-Offload's delayed parameter update (DPU): the host chunks' CPU step of step k runs on a worker thread while
the device runs step k + 1's forward and backward, so the step costs the larger of the two instead of their sum.
The price is staleness: the parameters a forward reads lag one update more than without it.

At each optimizer step (after Lightning's closure ran forward, backward and clipping):
1. wait for the previous host step, which updated the host masters; at stage 3 it also cast them into each host
   chunk's *back* compute copy, and the front and back copies swap: the front, which stage 3's gathers read during
   forward and backward, now holds that update;
2. take the host chunks' gradients away from the pieces (their shard buffer swaps with a spare, so the next backward
   writes elsewhere), step the device pieces now, and prepare one worker optimizer per host chunk: the user's class
   and hyper-parameters over proxies of the chunk's pieces (the same storage, the swapped-out gradients), whose
   state *is* the user optimizer's state of those pieces (checkpoints and schedulers see one optimizer);
3. after the refresh that follows the step, launch the host step on the worker thread. At stages 1-2 that refresh
   copies each host master to the device, and a chunk steps once its copy has been read (no extra host copy of
   the parameters); at stage 3 the worker steps every chunk, then waits until the device has read the back copy
   and overwrites it.

So with every chunk on the host, forward k reads the parameters after the update of step k - 2 (k - 1 without the
delay); chunks on the device update without delay. A checkpoint, teardown or a new step waits for the host step in
flight (``settle``), so the masters saved or made whole hold every update; a resumed run starts from them, with no
update in flight. Validation reads what the next training step will read. One process computes the same with its
optimizer applying each step's gradient one step late (``tests/test_host_step.py``).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_par.zero.chunk import Chunk


class _SharedState(dict):
    """The state of the worker's optimizer: each proxy's state is its piece's dict in the user's optimizer."""

    def __init__(self, state: dict, piece_of: dict[int, nn.Parameter]) -> None:
        super().__init__()
        self._state, self._piece_of = state, piece_of

    def __getitem__(self, proxy: nn.Parameter) -> dict:
        return self._state[self._piece_of[id(proxy)]]  # a defaultdict: created empty on the first step

    def __contains__(self, proxy: object) -> bool:
        return id(proxy) in self._piece_of and self._piece_of[id(proxy)] in self._state

    def get(self, proxy: nn.Parameter, default: Any = None) -> Any:
        return self[proxy] if proxy in self else default


def _worker_pool() -> ThreadPoolExecutor:
    """The one worker thread of the host steps, with one intra-op thread fewer than the process.

    The worker steps while the main thread drives the device from Python. An OpenMP team of every core has one
    thread sharing a core with the main thread, and a statically split kernel runs at that thread's pace: on the
    H100 host (16 cores) the worker's 1.3 B-parameter AdamW step took 1.13x its time on an idle main thread, and
    1.02x with 15 threads (``benchmarks/bench_host_step.py``, docs/benchmarks.md). In a whole training step the
    difference was within the spread between runs: there the copies' share of host memory bandwidth dominates.
    """
    threads = torch.get_num_threads()

    def leave_a_core() -> None:
        torch.get_num_threads()  # this thread's lazy set-up first: it would reset the count set below
        torch.set_num_threads(max(1, threads - 1))

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zero-host-step", initializer=leave_a_core)
    # set_num_threads also sets the count threads started later inherit: start the worker, then restore it.
    pool.submit(lambda: None).result()
    torch.set_num_threads(threads)
    return pool


class HostStep:
    """Wraps each optimizer's ``step`` for an engine with chunks on the host: times the step (``components``) and,
    with ``delayed``, runs the host chunks' part of it in the background (see the note above)."""

    def __init__(self, chunks: Callable[[], list["Chunk"]], device: torch.device, delayed: bool,
                 h2d: Optional[torch.cuda.Stream], bytes_moved: dict[str, int],
                 log: Callable[[str], None] = lambda message: None) -> None:
        """``bytes_moved``: the engine's running counts of host <-> device bytes, read and reset at each step;
        ``log``: where the components of the third step are reported."""
        self.chunks = chunks
        self.bytes_moved = bytes_moved
        self.log = log
        self.steps = 0
        self.last_bytes = {"h2d": 0, "d2h": 0}
        self.device = device
        self.delayed = delayed
        self.h2d = h2d
        self._pool: Optional[ThreadPoolExecutor] = None  # started by the first host step run on it (``_submit``)
        self._future: Optional[Future] = None
        # [Note: the early host step] Without the delay, when nothing reads or changes the gradients between backward
        # and the step (no clipping, no accumulation, ...: the strategy decides, ``early``), each host chunk steps on
        # the worker as soon as its reduced gradient is on the host, while backward goes on; the optimizer step then
        # waits for them and steps the rest. Exact: the same update from the same gradient, only sooner.
        self.early = False
        self.early_steps = 0  # chunks stepped early so far
        self._early: list[tuple[Future, list[nn.Parameter]]] = []  # (its step, the pieces it steps)
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._job: Optional[tuple[list, list]] = None  # (chunk, worker) jobs and the device's reads, for ``launch``
        self.last_cpu_step_s = 0.0  # the host step's own time (on the worker when delayed)
        self.last_cpu_idle_s = 0.0  # the part of it the worker spent waiting for the device's copies
        self.last_wait_s = 0.0  # how long the step waited for the worker (delayed, or early steps)
        self.last_compute_s = 0.0  # the device's first forward to last backward of the last step
        self._compute: list[Any] = []  # [start, end]: events on CUDA, perf_counter() on the CPU

    # ----- the compute copies a delayed step publishes -------------------------------------------------------------

    def attach(self, chunk: "Chunk", compute_dtype: torch.dtype, pinned: Any, stage: int) -> None:
        """Give a host chunk its spare gradient buffer and, at stage 3 (whose gathers read the host during forward
        and backward), its front and back compute copies (pinned, in the compute dtype), both from its master."""
        if not self.delayed or not chunk.host or chunk.grad_spare is not None:
            return
        chunk.grad_spare = pinned.zeros(chunk.shard_numel, chunk.grad_shard.dtype)
        if stage == 3:
            chunk.published = pinned.empty(chunk.shard_numel, compute_dtype).copy_(chunk.master)
            chunk.publishing = pinned.empty(chunk.shard_numel, compute_dtype).copy_(chunk.master)

    @staticmethod
    def detach(chunk: "Chunk", pinned: Any) -> None:
        for name in ("published", "publishing", "grad_spare"):
            t = getattr(chunk, name)
            if t is not None:
                pinned.free(t)
                setattr(chunk, name, None)

    # ----- the device's time: its first forward to its last backward, read when the step starts --------------------

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).record_event(torch.cuda.Event(enable_timing=True))
        return time.perf_counter()

    def forward_started(self) -> None:
        if not self._compute:  # the first forward of this step (accumulation runs several)
            self._compute = [self._mark(), None]

    def backward_done(self) -> None:
        if self._compute:
            self._compute[1] = self._mark()

    def _close_compute(self) -> None:
        """At the step: the last backward waited for the host copies, so its end event has completed."""
        if self._compute and self._compute[1] is not None:
            start, end = self._compute
            if self.device.type != "cuda":
                self.last_compute_s = end - start
            elif end.query():  # (no host chunk: nothing waited; then this step's figure is skipped, not waited for)
                self.last_compute_s = start.elapsed_time(end) / 1e3
        self._compute = []

    # ----- the step ----------------------------------------------------------------------------------------------------

    def wrap(self, optimizer: torch.optim.Optimizer) -> None:
        original = optimizer.step
        self.optimizer = optimizer  # (one optimizer for the early and the delayed step; more: early stays off)

        def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            loss = None
            if closure is not None:  # Lightning's closure: forward, backward, clipping
                with torch.enable_grad():
                    loss = closure()
            self._close_compute()
            self.last_bytes = dict(self.bytes_moved)
            self.bytes_moved.update(h2d=0, d2h=0)
            if not self.delayed:
                start = time.perf_counter()
                early_s, self.last_cpu_idle_s = self._join_early()
                self.last_wait_s = time.perf_counter() - start
                start = time.perf_counter()
                original(**kwargs)  # the device's part is only launched; early-stepped pieces have no gradient now
                self.last_cpu_step_s = early_s + time.perf_counter() - start
            else:
                self._step_delayed(optimizer, original, kwargs)
            self.steps += 1
            if self.steps == 3:  # past the first step's plan and warm-up
                self.log(self.describe())
            return loss

        optimizer.step = step  # type: ignore[method-assign]

    def _step_delayed(self, optimizer: torch.optim.Optimizer, original: Callable[..., Any], kwargs: dict) -> None:
        start = time.perf_counter()
        self.settle()
        self.last_wait_s = time.perf_counter() - start
        host = [c for c in self.chunks() if c.host and c.grad_spare is not None]
        for chunk in host:  # 1. stage 3: the update of the last host step becomes what the device reads
            if chunk.published is not None:
                chunk.published, chunk.publishing = chunk.publishing, chunk.published
        reads = self._reads_so_far()
        jobs = []
        for chunk in host:  # 2. the host gradients leave the pieces: the next backward fills the spare buffer
            grads, chunk.grad_shard, chunk.grad_spare = chunk.grad_shard, chunk.grad_spare, chunk.grad_shard
            stepped = [(piece, q) for piece, q in chunk.pieces if q.grad is not None]
            worker = self._worker(optimizer, stepped, grads)
            if worker is not None:
                jobs.append((chunk, worker))
                for _, q in stepped:
                    q.grad = None
        original(**kwargs)  # the device pieces (the host ones have no gradient now)
        # 3. launched once the device has been told to read the masters it needs (``launch``, after the refresh)
        self._job = (jobs, reads) if jobs else None

    # ----- the early step (see [Note: the early host step]) ---------------------------------------------------------

    def gradient_on_host(self, chunk: "Chunk", copied: Any) -> None:
        """A host chunk's reduced gradient is on its way into ``chunk.grad_shard`` (``copied``: an event after the
        copy, on CUDA): with early steps on, step its pieces on the worker once the copy is done."""
        if not self.early or self.optimizer is None:
            return
        trained = [(piece, q) for k, (piece, q) in enumerate(chunk.pieces) if chunk.trainable[chunk.piece_slots[k]]]
        worker = self._worker(self.optimizer, trained, chunk.grad_shard)
        if worker is not None:
            self.early_steps += 1
            pieces = [q for _, q in trained]
            self._early.append((self._submit(self._early_step, worker, copied), pieces))

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn`` on the worker thread, started at the first call: an engine whose steps all run on the main
        thread (neither option on) starts none."""
        if self._pool is None:
            self._pool = _worker_pool()
        return self._pool.submit(fn, *args)

    @staticmethod
    def _early_step(worker: torch.optim.Optimizer, copied: Any) -> tuple[float, float]:
        start = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        idle = time.perf_counter() - start
        worker.step()
        return time.perf_counter() - start, idle

    def _join_early(self) -> tuple[float, float]:
        """Wait for this backward's early steps; their pieces then have no gradient, so the optimizer skips them.
        Returns the worker's time on them, and the part of it spent waiting for their gradients' copies."""
        early, self._early = self._early, []
        total = idle = 0.0
        for future, pieces in early:
            spent, waited = future.result()
            total, idle = total + spent, idle + waited
            for q in pieces:
                q.grad = None
        return total, idle

    @staticmethod
    def _worker(optimizer: torch.optim.Optimizer, pieces: list, grads: Tensor) -> Optional[torch.optim.Optimizer]:
        """An optimizer of the user's class over proxies of ``pieces`` (those ``optimizer`` holds) whose gradients
        are their slices of ``grads`` (a chunk's gradient shard), with the hyper-parameters as they are now (a
        scheduler may change them before it runs) and the user optimizer's state of the pieces as its state; None
        when ``optimizer`` holds none of them."""
        group_index = {id(q): i for i, g in enumerate(optimizer.param_groups) for q in g["params"]}
        piece_of: dict[int, nn.Parameter] = {}
        proxies_by_group: dict[int, list[nn.Parameter]] = {}
        for piece, q in pieces:
            if id(q) not in group_index:
                continue
            proxy = nn.Parameter(q.data, requires_grad=True)  # the piece's storage: the step writes the master
            proxy.grad = grads[piece.shard_offset: piece.shard_offset + piece.numel]
            piece_of[id(proxy)] = q
            proxies_by_group.setdefault(group_index[id(q)], []).append(proxy)
        if not piece_of:
            return None
        groups = [{**{k: v for k, v in optimizer.param_groups[i].items() if k != "params"}, "params": proxies}
                  for i, proxies in proxies_by_group.items()]
        # Without the class's constructor (whose arguments are not always its defaults' keys): the base class sets
        # up the groups, each of which carries every hyper-parameter already.
        worker = type(optimizer).__new__(type(optimizer))
        torch.optim.Optimizer.__init__(worker, groups, optimizer.defaults)
        worker.state = _SharedState(optimizer.state, piece_of)  # type: ignore[assignment]
        return worker

    def launch(self) -> None:
        """Start the host step prepared by the last optimizer step. Called after the refresh that follows the step:
        at stages 1-2 that refresh copied each host master to the device (``chunk.read_done``), and a chunk steps
        only once its copy has been read; at stage 3 the device reads the published copies."""
        job, self._job = self._job, None
        if job is not None:
            self._future = self._submit(self._host_step, *job)

    def _reads_so_far(self) -> list[Any]:
        """Events after every device read of the host copies enqueued so far (the back copy's last readers)."""
        if self.device.type != "cuda":
            return []
        streams = [torch.cuda.current_stream(self.device)] + ([self.h2d] if self.h2d is not None else [])
        return [s.record_event() for s in streams]

    def _host_step(self, jobs: list, reads: list[Any]) -> None:
        start = time.perf_counter()
        idle = 0.0
        for chunk, worker in jobs:
            if chunk.read_done is not None:  # stages 1-2: the device has its copy of the master before it changes
                waiting = time.perf_counter()
                chunk.read_done.synchronize()
                idle += time.perf_counter() - waiting
            worker.step()
        waiting = time.perf_counter()
        for event in reads:
            event.synchronize()
        idle += time.perf_counter() - waiting
        for chunk, _ in jobs:
            if chunk.publishing is not None:
                chunk.publishing.copy_(chunk.master)  # stage 3, cast: what the device reads after the next swap
        self.last_cpu_step_s, self.last_cpu_idle_s = time.perf_counter() - start, idle

    def components(self) -> dict[str, float]:
        """The last step's parts: the device's forward and backward (waits for host copies included), the host
        optimizer step (of the step before, when delayed, and how long this step waited for it; of the host step,
        the part the worker waited for the device's copies), bytes each way."""
        return {"compute_s": self.last_compute_s, "cpu_step_s": self.last_cpu_step_s, "wait_s": self.last_wait_s,
                "cpu_idle_s": self.last_cpu_idle_s,
                "h2d_bytes": self.last_bytes["h2d"], "d2h_bytes": self.last_bytes["d2h"]}

    def describe(self) -> str:
        c = self.components()
        step = (f"host optimizer step {c['cpu_step_s']:.3f} s, in the background (step {self.steps} waited "
                f"{c['wait_s']:.3f} s for it)" if self.delayed else f"host optimizer step {c['cpu_step_s']:.3f} s")
        return (f"ZeRO offload, step {self.steps}: device forward and backward {c['compute_s']:.3f} s; {step}; "
                f"host->device {c['h2d_bytes'] / 1e9:.2f} GB, device->host {c['d2h_bytes'] / 1e9:.2f} GB")

    def settle(self) -> None:
        """Wait for the host step in flight (launching it first if the refresh that launches it did not run): the
        masters and the optimizer state then hold every update."""
        self.launch()
        future, self._future = self._future, None
        if future is not None:
            future.result()  # re-raises the worker's error here
        for future, _ in self._early:  # (a backward whose step never came: its pieces keep their gradients)
            future.result()

    def close(self) -> None:
        self.settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
