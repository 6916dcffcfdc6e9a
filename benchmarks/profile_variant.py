"""Where a step's time goes: one variant of ``multi_gpu.py throughput`` under ``torch.profiler``, every rank.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD
    torchrun --nproc_per_node 4 benchmarks/profile_variant.py --variant tp1d --model 1.3b --out $OUT/prof_tp1d
    (--accelerator cpu with tiny sizes runs it on gloo: the smoke test)

The variant trains ``--warmup`` steps, then ``--steps`` steps under the profiler. Each rank writes
``OUT/rank<r>.txt``: the step's wall time and its device time split into communication kernels (NCCL), matrix
multiplies, attention and the rest, per step; the idle time of the busiest stream (the wall time minus that
stream's kernel time: what neither overlap nor compute filled); and the 40 kernels with the most device time.
Rank 0 also writes ``OUT/trace_rank0.json.gz`` (Chrome trace, for https://ui.perfetto.dev). A figure from here is
a diagnosis, not a throughput: the profiler itself costs time; throughput comes from ``multi_gpu.py throughput``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import lightning.pytorch as pl  # noqa: E402

import bench_dp  # noqa: E402
import multi_gpu  # noqa: E402

CATEGORIES = (  # first match wins; kernel names of cuBLAS/CUTLASS GEMMs, flash/cuDNN attention, NCCL
    ("communication", re.compile(r"nccl", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|sm90_xmma|sm80_xmma|cublas|matmul|nvjet", re.I)),  # nvjet: cuBLAS 12.9+
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
)


class StepProfiler(pl.Callback):
    """Profiles batches ``first`` to ``first + steps - 1`` and times them on the host."""

    def __init__(self, first: int, steps: int, device: torch.device) -> None:
        self.first, self.last, self.device = first, first + steps - 1, device
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            bench_dp.sync(self.device)
            self.profiler.start()
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.last:
            bench_dp.sync(self.device)
            self.seconds = time.perf_counter() - self._t0
            self.profiler.stop()


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _kernel_spans(profiler: torch.profiler.profile) -> tuple[list, list]:
    """``(start_s, stop_s, name)`` of every kernel (annotations left out): compute ones, then NCCL ones."""
    compute, comm = [], []
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and not _is_annotation(event):
            span = (event.time_range.start / 1e6, event.time_range.end / 1e6, event.name)
            (comm if "nccl" in event.name.lower() else compute).append(span)
    return compute, comm


def timeline(profiler: torch.profiler.profile) -> dict[str, float]:
    """Seconds of the profiled window in which some non-NCCL kernel ran (compute), only NCCL ran (communication
    nobody overlapped: exposed), or nothing ran (idle: the host was behind, or waiting)."""
    compute, comm = _kernel_spans(profiler)
    compute, comm = [(a, b) for a, b, _ in compute], [(a, b) for a, b, _ in comm]
    if not compute:
        return {}
    everything = compute + comm
    busy, window = _union(everything), max(e for _, e in everything) - min(s for s, _ in everything)
    return {"compute": _union(compute), "exposed communication": busy - _union(compute), "idle": window - busy}


def exposed_spans(profiler: torch.profiler.profile, top: int = 10) -> list[str]:
    """The longest stretches in which only NCCL ran (exposed communication), with where they fall: ms after the
    window's first kernel, and the compute kernels just before and after. A tail after backward ends in the
    optimizer's kernels; a stretch between two backward kernels is either the compute stream waiting for a
    collective or an ordinary idle gap (the host behind) in which NCCL happened to run."""
    compute, comm = _kernel_spans(profiler)
    if not compute or not comm:
        return []
    compute.sort()
    first = min(compute[0][0], min(c[0] for c in comm))
    spans, end = [], None  # the gaps between compute kernels (all streams together) that NCCL covers
    before = None
    for start, stop, name in compute:
        if end is not None and start > end:
            covered = _union([(max(c0, end), min(c1, start)) for c0, c1, _ in comm if c0 < start and c1 > end])
            if covered > 0:
                spans.append((covered, end, before, name))
        if end is None or stop > end:
            end, before = stop, name
    lines = ["longest exposed communication (ms after the first kernel; compute kernel before -> after):"]
    for covered, at, prev, nxt in sorted(spans, reverse=True)[:top]:
        lines.append(f"  {covered * 1e3:6.2f} ms at {(at - first) * 1e3:8.1f} ms  {prev[:50]} -> {nxt[:50]}")
    return lines


def idle_causes(profiler: torch.profiler.profile, steps: int, min_gap_s: float = 50e-6) -> list[str]:
    """What the host was doing while the GPU had nothing to run. Every gap of at least ``min_gap_s`` between kernels
    (all streams together) is charged, per CPU thread, to the innermost CPU range (op or annotation) open at the
    gap's middle; the largest gaps are listed with each thread's stack of open ranges. A gap under an op that waits
    (a synchronisation) is the host waiting; a gap under ordinary ops is the host being slower than the GPU there."""
    compute, comm = _kernel_spans(profiler)
    kernels = [(a, b) for a, b, _ in compute + comm]
    ranges = [(e.time_range.start / 1e6, e.time_range.end / 1e6, getattr(e, "thread", 0), e.name)
              for e in profiler.events() if e.device_type != torch.autograd.DeviceType.CUDA]
    gaps, end = [], None
    for start, stop in sorted(kernels):
        if end is not None and start - end >= min_gap_s:
            gaps.append((end, start))
        end = stop if end is None else max(end, stop)
    first = min((s for s, _ in kernels), default=0.0)

    starts = torch.tensor([r[0] for r in ranges], dtype=torch.float64)
    stops = torch.tensor([r[1] for r in ranges], dtype=torch.float64)

    def stacks(at: float) -> dict[int, list[str]]:  # per thread, the ranges open at `at`, outermost first
        open_ranges: dict[int, list[tuple[float, str]]] = defaultdict(list)
        for i in ((starts <= at) & (stops > at)).nonzero().flatten().tolist():
            r0, _, thread, name = ranges[i]
            open_ranges[thread].append((r0, name))
        return {t: [name for _, name in sorted(v)] for t, v in open_ranges.items()}

    charged: dict[str, float] = defaultdict(float)
    for g0, g1 in gaps:
        for thread, stack in stacks((g0 + g1) / 2).items():
            charged[f"thread {thread}: {stack[-1]}"] += g1 - g0
    total = sum(g1 - g0 for g0, g1 in gaps)
    lines = [f"GPU idle gaps >= {min_gap_s * 1e6:.0f} us: {len(gaps) / steps:.0f} per step, {total / steps * 1e3:.1f} ms "
             "per step; charged per thread to the innermost CPU range open at the gap's middle:"]
    for name, seconds in sorted(charged.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {seconds / steps * 1e3:8.2f} ms  {name[:140]}")
    lines.append("largest gaps (ms after the first kernel; each thread's open ranges, outermost first):")
    for g0, g1 in sorted(gaps, key=lambda g: g[0] - g[1])[:12]:
        lines.append(f"  {(g1 - g0) * 1e3:6.2f} ms at {(g0 - first) * 1e3:8.1f} ms")
        for thread, stack in stacks((g0 + g1) / 2).items():
            lines.append(f"      thread {thread}: {' > '.join(n[:60] for n in stack[-6:])}")
    return lines


def _is_annotation(event: Any) -> bool:
    # Ranges on the GPU timeline (record_function, Optimizer.step#..., nccl:...) are not kernels: counting them
    # counted the optimizer's whole step and every collective twice.
    return getattr(event, "is_user_annotation", False) or "#" in event.name or event.name.startswith("nccl:")


def kernel_times(profiler: torch.profiler.profile) -> tuple[dict[str, float], dict[int, float]]:
    """Device seconds per kernel name, and per stream (device events only)."""
    by_name: dict[str, float] = defaultdict(float)
    by_stream: dict[int, float] = defaultdict(float)
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or _is_annotation(event):
            continue
        seconds = event.device_time_total / 1e6  # microseconds -> seconds (the kernel's own time)
        by_name[event.name] += seconds
        by_stream[getattr(event, "device_resource_id", 0)] += seconds
    return by_name, by_stream


def summarize(by_name: dict[str, float], by_stream: dict[int, float], wall: float, steps: int,
              spans: dict[str, float]) -> list[str]:
    split: dict[str, float] = defaultdict(float)
    for name, seconds in by_name.items():
        category = next((c for c, pattern in CATEGORIES if pattern.search(name)), "other")
        split[category] += seconds
    busiest = max(by_stream.values(), default=0.0)
    ms = lambda s: f"{s / steps * 1e3:8.1f} ms"  # noqa: E731 - per step
    lines = [f"wall per step {ms(wall)}  (the profiler's own cost included)"]
    for category in ("matmul", "attention", "other", "communication"):
        lines.append(f"  {category:<14} {ms(split[category])} of device time")
    lines.append(f"  busiest stream {ms(busiest)} busy, idle {ms(max(wall - busiest, 0.0))} "
                 f"(streams: {', '.join(ms(s).strip() for s in sorted(by_stream.values(), reverse=True))})")
    lines.append("  timeline: " + ", ".join(f"{k} {ms(v).strip()}" for k, v in spans.items()))
    lines.append("top kernels (device time per step):")
    for name, seconds in sorted(by_name.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"  {ms(seconds)}  {name[:150]}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    multi_gpu.add_throughput_args(p)
    p.add_argument("--variant", required=True, help="one variant name of multi_gpu.py throughput")
    args = p.parse_args()
    args.steps = min(args.steps, 3)  # a diagnosis: a few steps keep the trace small
    multi_gpu.apply_model_preset(args)
    torch.set_float32_matmul_precision("high")
    device = multi_gpu.local_device(args.accelerator)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out or "profile_out")
    out.mkdir(parents=True, exist_ok=True)
    profiler = StepProfiler(args.warmup, args.steps, device)
    multi_gpu.run_variant(args, args.variant, world, device, extra_callbacks=[profiler])
    header = (f"{args.variant}: world {world}, rank {rank}, {args.layers}x{args.width}, batch {args.batch}/GPU x seq "
              f"{args.seq}, {args.steps} profiled steps after {args.warmup}, "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    write_summary(profiler.profiler, profiler.seconds, args.steps, out, rank, header)
    multi_gpu.exit_now()


def write_summary(profiler: torch.profiler.profile, wall: float, steps: int, out: Path, rank: int,
                  header: str) -> None:
    """``out/rank<r>.txt`` (and rank 0's trace, gzipped) for ``steps`` profiled steps that took ``wall`` seconds."""
    out.mkdir(parents=True, exist_ok=True)
    by_name, by_stream = kernel_times(profiler)
    lines = [header, *summarize(by_name, by_stream, wall, steps, timeline(profiler)), *exposed_spans(profiler),
             *idle_causes(profiler, steps)]
    (out / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    if rank == 0:
        print("\n".join(lines[:9]), flush=True)
        trace = out / "trace_rank0.json"
        profiler.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()


if __name__ == "__main__":
    main()
