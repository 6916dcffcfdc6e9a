"""torch.distributed.pipelining beside our pipeline strategies: same GPT, same microbatches, same global batch.

    torchrun --nproc_per_node 4 benchmarks/pipeline_peer.py --model 1.3b --out $OUT/pipeline.json
    torchrun --nproc_per_node 2 benchmarks/pipeline_peer.py --accelerator cpu --layers 4 --width 64 --heads 4 \
        --vocab 128 --seq 32 --batch 4 --steps 2 --warmup 1 --microbatches 4        # smoke test on gloo

The demo GPT (embedding + blocks + final norm + head) is cut by blocks into p = world stages (torch peers:
``Schedule1F1B`` with one stage per rank; ``ScheduleInterleaved1F1B`` with v = 2 stages per rank, looped placement
r, r + p; ``ScheduleInterleavedZeroBubble`` with ``--zb-chunks`` stages per rank, default 1 like our
``zero_bubble``). The peer's output layer is untied from the embedding (they sit on different ranks; same FLOPs);
our strategy keeps the tie and all-reduces its gradient between the first and last stage. bf16 autocast, fused
AdamW, ``--microbatches`` m over a global batch of batch x world, tokens/s over the same timed steps. Our
``pipeline``, ``pipeline_interleaved``, ``pipeline_zero_bubble`` run in the same process through Lightning
(``multi_gpu.run_variant``).

Bubble formulas, from each rank's T_r = forward + backward of one microbatch through all its chunks, measured
alone (no communication). The stages are not of equal time (the last also runs the 50k-vocabulary head), so the
formulas are written for unequal stages: the slowest rank's m microbatches, plus the fill and drain through the
others, S - T_max with S = sum of T_r (for equal stages T_r = T they are the textbook formulas). 1F1B:
m T_max + (S - T_max) [= (m + p - 1) T]; interleaved with v chunks per rank: m T_max + (S - T_max)/v
[= (m + (p - 1)/v) T]; zero bubble (ZB-H1, F = B = W = T/3): m T_max + (S - T_max)/(3v) [= (m + (p - 1)/3v) T].
The ratio measured / formula shows the cost beyond the schedule's bubble (communication, launch overheads).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dp  # noqa: E402
import multi_gpu  # noqa: E402
import profile_variant  # noqa: E402


class Stage(nn.Module):
    """Blocks [lo, hi) of the GPT, with the embedding on the first stage and norm + untied head on the last."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.wte, self.wpe = model.wte, model.wpe
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        if last:
            self.ln_f = model.ln_f
            head = model.lm_head
            self.lm_head = nn.Linear(head.in_features, head.out_features, bias=False, device=head.weight.device)
            with torch.no_grad():
                self.lm_head.weight.copy_(head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.size(1), device=x.device))
        for block in self.blocks:
            x = block(x)
        if self.last:
            x = self.lm_head(self.ln_f(x)).float()
        return x


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def local_stages(args: argparse.Namespace, device: torch.device, rank: int, p: int, v: int) -> list[tuple[int, Stage]]:
    """This rank's (stage index, module) pairs: stage r + c p for chunk c (looped placement)."""
    n = p * v
    if args.layers < n:
        raise ValueError(f"{args.layers} blocks cannot make {n} stages")
    model = bench_dp.build_model(args, device)
    bounds = [round(i * args.layers / n) for i in range(n + 1)]
    out = [(s, Stage(model, bounds[s], bounds[s + 1], s == 0, s == n - 1)) for s in (rank + c * p for c in range(v))]
    del model
    return out


def autocast(device: torch.device):
    return torch.autocast(device.type, torch.bfloat16)


def time_chunks(args: argparse.Namespace, device: torch.device, stages: list[tuple[int, Stage]], mb: int,
                reps: int = 5) -> float:
    """Forward + backward of one microbatch through this rank's chunks, alone (no communication), in seconds."""
    total = 0.0
    for _, mod in stages:
        for i in range(reps + 2):
            if i == 2:
                bench_dp.sync(device)
                t0 = time.perf_counter()
            if mod.first:
                x = torch.randint(0, args.vocab, (mb, args.seq), device=device)
            else:
                x = torch.randn(mb, args.seq, args.width, device=device, requires_grad=True)
            with autocast(device):
                out = mod(x)
            if mod.last:
                loss_fn(out, torch.randint(0, args.vocab, (mb, args.seq), device=device)).backward()
            else:
                out.backward(torch.randn_like(out))
        bench_dp.sync(device)
        total += (time.perf_counter() - t0) / reps
        mod.zero_grad(set_to_none=True)
    return total


def run_torch(args: argparse.Namespace, kind: str, device: torch.device, rank: int, world: int) -> dict:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    p, m = world, args.microbatches
    v = {"1f1b": 1, "interleaved": 2, "zero_bubble": args.zb_chunks}[kind]
    stages = local_stages(args, device, rank, p, v)
    mb = args.batch * world // m
    t_chunks = time_chunks(args, device, stages, mb)
    pipe = [PipelineStage(mod, s, p * v, device) for s, mod in stages]
    if kind == "1f1b":
        schedule = Schedule1F1B(pipe[0], m, loss_fn=loss_fn)
    elif kind == "interleaved":
        schedule = ScheduleInterleaved1F1B(pipe, m, loss_fn=loss_fn)
    else:
        schedule = ScheduleInterleavedZeroBubble(pipe, m, loss_fn=loss_fn)
    step_kwargs = {"return_outputs": False} if "return_outputs" in inspect.signature(schedule.step).parameters else {}
    params = [q for _, mod in stages for q in mod.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    ds = bench_dp.Batches(args.warmup + args.steps, args.batch * world, args.seq, args.vocab, pin=False, seed=0)
    has_first = any(mod.first for _, mod in stages)
    has_last = any(mod.last for _, mod in stages)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = 0.0
    profiled = min(args.steps, 3) if args.profile else 0  # a diagnosis: its steps are timed with the profiler on
    for i in range(args.warmup + args.steps):
        x, y = (t.to(device) for t in ds[i])
        if i == args.warmup:
            bench_dp.sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            if profiled:
                profiler = profile_variant.StepProfiler(0, profiled, device)
                profiler.profiler.start()
        with autocast(device):
            if has_first:
                schedule.step(x, target=y if has_last else None, **step_kwargs)
            elif has_last:
                schedule.step(target=y, **step_kwargs)
            else:
                schedule.step(**step_kwargs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if profiled and i == args.warmup + profiled - 1:
            bench_dp.sync(device)
            profiler.profiler.stop()
            profile_variant.write_summary(profiler.profiler, time.perf_counter() - t0, profiled,
                                          Path(args.profile) / f"torch_{kind}", rank,
                                          f"torch_{kind}: world {world}, rank {rank}, {args.layers}x{args.width}, "
                                          f"vocab {args.vocab}, {m} microbatches, {profiled} profiled steps")
    bench_dp.sync(device)
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del schedule, pipe, stages, opt
    return {"tokens_per_s": args.steps * args.batch * world * args.seq / seconds, "step_s": seconds / args.steps,
            "peak_gib": peak, "t_chunks": t_chunks, "chunks": v}


def formula(kind: str, m: int, v: int, times: list[float]) -> tuple[float, str]:
    """The step time the schedule's bubble allows, for ranks whose microbatch times are ``times`` (see above)."""
    t_max, fill = max(times), sum(times) - max(times)
    if kind == "1f1b":
        return m * t_max + fill, "m Tmax + (S - Tmax)"
    if kind == "interleaved":
        return m * t_max + fill / v, f"m Tmax + (S - Tmax)/{v}"
    return m * t_max + fill / (3 * v), f"m Tmax + (S - Tmax)/{3 * v} (ZB-H1)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    multi_gpu.add_throughput_args(p)
    p.add_argument("--zb-chunks", type=int, default=1, help="stages per rank for ScheduleInterleavedZeroBubble")
    p.add_argument("--torch-schedules", default="1f1b,interleaved,zero_bubble")
    p.add_argument("--profile", default="", help="folder: profile torch's first timed steps (profile_variant.py's "
                   "summary per rank; their timings then include the profiler)")
    args = p.parse_args()
    args.variants = args.variants or "pipeline,pipeline_interleaved,pipeline_zero_bubble"
    multi_gpu.apply_model_preset(args)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")
    device = multi_gpu.local_device(args.accelerator)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    m = args.microbatches
    if rank == 0:
        print(f"pipeline peer: world {world} = stages, GPT {args.layers}x{args.width}, {args.heads} heads, vocab "
              f"{args.vocab}, global batch {args.batch * world} x {args.seq} in {m} microbatches, "
              f"{args.warmup}+{args.steps} steps, bf16 autocast, fused AdamW", flush=True)
    rows: list[dict[str, Any]] = []
    for kind in [k for k in args.torch_schedules.split(",") if k]:
        row: dict[str, Any] = {"variant": f"torch_{kind}"}
        t = time.perf_counter()
        try:
            row.update(run_torch(args, kind, device, rank, world), status="ok")
        except Exception as e:  # noqa: BLE001 - recorded, the next schedule runs (a hang is the caller's timeout)
            row.update(status="oom" if "out of memory" in str(e).lower() else "error",
                       error=f"{type(e).__name__}: {e}"[:300])
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (row.get("t_chunks"), row.get("peak_gib")))
        if row["status"] == "ok":
            t_ranks = [g[0] for g in gathered if g[0] is not None]
            ideal, name = formula(kind, m, row["chunks"], t_ranks)
            row.update(t_rank=max(t_ranks), t_ranks=t_ranks, formula=name, formula_step_s=ideal,
                       ratio=row["step_s"] / ideal,
                       peak_gib=max((g[1] for g in gathered if g[1] is not None), default=None))
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        bench_dp.free(device)
        if rank == 0:
            print_row(row, world)
    for name in [v for v in args.variants.split(",") if v and v != "none"]:
        row = {"variant": name}
        t = time.perf_counter()
        try:
            row.update(multi_gpu.run_variant(args, name, world, device), status="ok")
        except Exception as e:  # noqa: BLE001
            row.update(status="oom" if "out of memory" in str(e).lower() else "error",
                       error=f"{type(e).__name__}: {e}"[:300])
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        gathered = [None] * world
        dist.all_gather_object(gathered, row.get("peak_gib"))
        row["peak_gib"] = max((g for g in gathered if g is not None), default=None)
        kind = {"pipeline": "1f1b", "pipeline_interleaved": "interleaved", "pipeline_zero_bubble": "zero_bubble"}.get(
            name.removesuffix("_deferred"))
        peer = next((r for r in rows if r["variant"] == f"torch_{kind}" and "t_rank" in r), None)
        if row["status"] == "ok" and peer is not None:
            v = 2 if kind == "interleaved" else 1  # ours: interleaved runs 2 chunks, the others 1
            ideal, fname = formula(kind, m, v, peer["t_ranks"])
            row.update(formula=fname, formula_step_s=ideal, ratio=row["step_s"] / ideal,
                       vs_torch=row["tokens_per_s"] / peer["tokens_per_s"])
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        gc.collect()
        bench_dp.free(device)
        if rank == 0:
            print_row(row, world)
    if rank == 0 and args.out:
        Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()}, "world": world,
                                              "rows": rows, "torch": torch.__version__}, indent=1, default=str))


def print_row(row: dict, world: int) -> None:
    tps = row.get("tokens_per_s") or 0
    extra = ""
    if "ratio" in row:
        extra = f"  formula {row['formula']} = {row['formula_step_s'] * 1e3:.0f} ms, measured/formula {row['ratio']:.2f}"
    if "vs_torch" in row:
        extra += f", vs torch {row['vs_torch']:.2f}x"
    if "t_rank" in row:
        extra += f"  (T per rank {', '.join(f'{t * 1e3:.1f}' for t in row['t_ranks'])} ms)"
    print(f"  {row['variant']:<22} {row['status']:<5} {tps:>10,.0f} tok/s  step {row.get('step_s', 0) * 1e3:7.0f} ms  "
          f"peak {row.get('peak_gib') or 0:5.1f} GiB{extra} {row.get('error', '')}", flush=True)


if __name__ == "__main__":
    main()
    multi_gpu.exit_now()
