"""Pipeline schedules on synthetic stages: step time against the formula and against torch.distributed.pipelining.

Every stage is a module whose forward sleeps ``f``, whose backward for the input sleeps ``i`` and whose backward for
the weight sleeps ``w`` (a hook on the weight's gradient, so a schedule that splits backward pays each part where it
runs it). The same modules run under lightning_par's executor and under torch's schedule classes (GPipe, 1F1B,
Interleaved1F1B, InterleavedZeroBubble with one stage per rank — the ZB-H1 order; torch has no Chimera), in the same
processes, alternating, over gloo on CPU. Sleeping stages measure the schedule and its communication, not kernels,
so several ranks share a few cores fairly.

    python benchmarks/bench_pipeline.py --ranks 4 --microbatches 8 --forward-ms 20 --repeats 5

The model's total forward time is ``ranks * f`` whatever the schedule: interleaved cuts it into ``ranks * chunks``
chunks of ``f / chunks``. Chimera's closed form assumes forward = backward (the paper's slots), so it also runs
with ``b = f`` (row ``chimera (f=b)``); with ``b = 2f`` only the simulator's prediction exists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning_par.pipeline import Costs, build_schedule, expected_makespan, simulate  # noqa: E402
from lightning_par.pipeline.executor import PipelineExecutor  # noqa: E402

WIDTH = 64  # activation: (microbatch size, WIDTH) floats


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, input_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.input_s = input_s
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.input_s)
        return grad, None, None


class SleepStage(nn.Module):
    """forward: f; gradient of the input: i; gradient of the weight: w (only when it is computed)."""

    def __init__(self, forward_s: float, input_s: float, weight_s: float) -> None:
        super().__init__()
        self.forward_s, self.input_s = forward_s, input_s
        self.weight = nn.Parameter(torch.ones(1))
        self.weight.register_hook(lambda g: (time.sleep(weight_s), g)[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # the first stage: without this autograd would skip the input-gradient sleep
            x = x.detach().requires_grad_()
        return _Sleep.apply(x, self.forward_s, self.input_s) + self.weight * torch.zeros_like(x)


def _costs(name: str, f: float, equal_backward: bool) -> Costs:
    b = f if equal_backward else 2 * f
    return Costs(forward=f, backward=b, backward_input=b / 2, backward_weight=b / 2)


def _stage_modules(schedule, rank: int, costs: Costs, chunks: int) -> dict[int, SleepStage]:
    scale = 1.0 / chunks  # interleaved: each of the v chunks holds 1/v of the rank's layers
    return {s: SleepStage(costs.forward * scale, costs.backward_input * scale, costs.backward_weight * scale)
            for s in schedule.stages_of(rank)}


def _ours(executor: PipelineExecutor, schedule, modules: dict[int, SleepStage], batch: torch.Tensor) -> float:
    micro = batch.chunk(schedule.microbatches)
    params = [p for m in modules.values() for p in m.parameters()]

    def forward(stage, microbatch, received):
        return modules[stage](micro[microbatch] if received is None else received)

    dist.barrier()
    start = time.perf_counter()
    executor.run(forward, lambda s, m, out: out.mean(), params=lambda stage: params)
    dist.barrier()
    return time.perf_counter() - start


def _torch_schedule(name: str, schedule, rank: int, modules: dict[int, SleepStage], m: int):
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    stages = [PipelineStage(mod, stage_index=s, num_stages=schedule.num_stages, device=torch.device("cpu"),
                            group=dist.group.WORLD) for s, mod in sorted(modules.items())]
    loss = lambda out, target: out.mean()  # noqa: E731
    if name == "gpipe":
        return ScheduleGPipe(stages[0], m, loss_fn=loss)
    if name == "1f1b":
        return Schedule1F1B(stages[0], m, loss_fn=loss)
    if name == "interleaved":
        return ScheduleInterleaved1F1B(stages, m, loss_fn=loss)
    if name == "zero_bubble":
        return ScheduleInterleavedZeroBubble(stages, m, loss_fn=loss)
    return None


def _theirs(torch_schedule, schedule, rank: int, batch: torch.Tensor) -> float:
    first = 0 in schedule.stages_of(rank)
    last = schedule.num_stages - 1 in schedule.stages_of(rank)
    dist.barrier()
    start = time.perf_counter()
    args = (batch,) if first else ()
    kwargs: dict[str, Any] = {"target": torch.zeros(batch.shape[0]), "losses": []} if last else {}
    torch_schedule.step(*args, **kwargs)
    dist.barrier()
    return time.perf_counter() - start


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    f = args.forward_ms / 1000
    m = args.microbatches
    rows = []
    plan = [("gpipe", 1, False), ("1f1b", 1, False), ("interleaved", args.chunks, False), ("zero_bubble", 1, False),
            ("chimera", 1, False), ("chimera", 1, True)]
    for name, chunks, equal in plan:
        costs = _costs(name, f, equal)
        schedule = build_schedule(name, world, m, chunks)
        chunk_costs = Costs(*(c / chunks for c in (costs.forward, costs.backward, costs.backward_input,
                                                    costs.backward_weight)))
        formula = expected_makespan(schedule, chunk_costs)
        simulated = simulate(schedule, chunk_costs).makespan
        batch = torch.ones(m * 2, WIDTH)
        ours_modules = _stage_modules(schedule, rank, costs, chunks)
        theirs_modules = _stage_modules(schedule, rank, costs, chunks)
        torch_schedule = None if equal else _torch_schedule(name, schedule, rank, theirs_modules, m)
        # One executor per schedule, kept across rounds as PipelineStrategy keeps it across steps (and as torch's
        # schedule object is kept): its shape cache is warm after the first round, like torch's inferred shapes.
        executor = PipelineExecutor(schedule, rank, dist.group.WORLD)
        ours: list[float] = []
        theirs: list[float] = []
        for repeat in range(args.repeats + 1):  # the first round warms up (torch infers shapes)
            pair = [("ours", ours), ("torch", theirs)]
            for label, bucket in (pair if repeat % 2 == 0 else pair[::-1]):
                if label == "ours":
                    t = _ours(executor, schedule, ours_modules, batch)
                elif torch_schedule is not None:
                    t = _theirs(torch_schedule, schedule, rank, batch)
                else:
                    continue
                if repeat:
                    bucket.append(t)
        rows.append({
            "schedule": f"{name} (f=b)" if equal else name,
            "formula_s": formula,
            "simulated_s": simulated,
            "ours_s": statistics.median(ours),
            "ours_rounds": ours,
            "torch_s": statistics.median(theirs) if theirs else None,
            "torch_rounds": theirs,
        })
    if rank == 0:
        out["rows"] = rows
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--forward-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args.ranks, port, args, out), nprocs=args.ranks, join=True)
        rows = out["rows"]
    print(f"ranks={args.ranks} microbatches={args.microbatches} chunks={args.chunks} f={args.forward_ms} ms "
          f"(b = 2f unless noted), median of {args.repeats}")
    print(f"{'schedule':<16} {'formula':>9} {'simulated':>9} {'ours':>9} {'ours/formula':>12} {'torch':>9} "
          f"{'ours/torch':>10}")
    for row in rows:
        reference = row["formula_s"] if row["formula_s"] is not None else row["simulated_s"]
        formula = f"{row['formula_s'] * 1000:8.1f}" if row["formula_s"] is not None else "       —"
        torch_s = f"{row['torch_s'] * 1000:8.1f}" if row["torch_s"] is not None else "       —"
        vs_torch = f"{row['ours_s'] / row['torch_s']:10.3f}" if row["torch_s"] is not None else "         —"
        print(f"{row['schedule']:<16} {formula} ms {row['simulated_s'] * 1000:7.1f} ms {row['ours_s'] * 1000:7.1f} ms "
              f"{row['ours_s'] / reference:12.3f} {torch_s} ms {vs_torch}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
