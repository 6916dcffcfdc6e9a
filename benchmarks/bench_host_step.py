"""The host optimizer step of offloaded chunks, alone and beside a busy main thread (issue 16).

With ``delay_update`` or ``step_during_backward`` the host chunks' fused AdamW step runs on a worker thread while the
main thread drives the GPU (Python dispatch, one core busy) and the copy engines read and write pinned host memory.
Measured on the H100 the worker's step took 1.5-1.8x the same step on an idle main thread. This script separates the
causes on the same host: the step on the main thread; on a worker with the main thread idle; beside a main thread
that dispatches GPU kernels; beside host <-> device copies; and with the worker given fewer intra-op threads than
cores (an OpenMP team of every core, one of them shared with the busy main thread, runs at the pace of that one).

    python benchmarks/bench_host_step.py --params 1.3e9            # on the GPU machine (~1 min)
    python benchmarks/bench_host_step.py --params 2e7 --device cpu  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import torch

CHUNK = 64 * 2**20  # elements per chunk, as the engine's default chunk size


def make_optimizers(n: int) -> list[torch.optim.Optimizer]:
    """One fused AdamW per chunk, as the worker builds them (one step call per chunk)."""
    optimizers = []
    for start in range(0, n, CHUNK):
        p = torch.nn.Parameter(torch.zeros(min(CHUNK, n - start)))
        p.grad = torch.randn_like(p)
        optimizers.append(torch.optim.AdamW([p], lr=1e-4, fused=True))
    for opt in optimizers:  # state allocated, first-touch paid
        opt.step()
    return optimizers


def host_step(optimizers: list[torch.optim.Optimizer]) -> float:
    start = time.perf_counter()
    for opt in optimizers:
        opt.step()
    return time.perf_counter() - start


class MainLoad:
    """What the main thread does while the worker steps: nothing, GPU dispatch, or host <-> device copies."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind, self.device = kind, device
        if kind == "dispatch":
            self.x = torch.randn(256, 256, device=device)
        if kind == "copies":  # 1 GiB each way through pinned buffers, as gathers and gradient copies
            pin = device.type == "cuda"
            self.host_in = torch.empty(2**28, pin_memory=pin)
            self.host_out = torch.empty(2**28, pin_memory=pin)
            self.dev = torch.empty(2**28, device=device)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.kind == "dispatch":  # small kernels, one after another: the Python thread is the bottleneck
                for _ in range(100):
                    self.x = self.x * 1.0001
            elif self.kind == "copies":
                self.dev.copy_(self.host_in, non_blocking=True)
                self.host_out.copy_(self.dev, non_blocking=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            else:
                stop.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def on_worker(optimizers: list, threads: int, load: MainLoad, repeats: int) -> float:
    """The mean step on a new thread (its intra-op threads set there) while the main thread runs ``load``."""
    result: list[float] = []
    stop = threading.Event()
    original = torch.get_num_threads()

    def work() -> None:
        torch.set_num_threads(threads)  # this thread's team; the global is restored below
        host_step(optimizers)  # warm
        result.extend(host_step(optimizers) for _ in range(repeats))
        stop.set()

    worker = threading.Thread(target=work)
    worker.start()
    load.run(stop)
    worker.join()
    torch.set_num_threads(original)
    return sum(result) / len(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.3e9, help="host elements stepped (fp32 AdamW)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    cores = torch.get_num_threads()
    optimizers = make_optimizers(int(args.params))
    host_step(optimizers)
    rows = [{"case": "main thread, alone", "threads": cores,
             "s": sum(host_step(optimizers) for _ in range(args.repeats)) / args.repeats}]
    loads = {kind: MainLoad(kind, device) for kind in ("idle", "dispatch", "copies")}
    for kind in ("idle", "dispatch", "copies"):
        for threads in sorted({cores, max(1, cores - 1), max(1, cores - 2), max(1, cores // 2)}, reverse=True):
            if kind == "idle" and threads != cores:
                continue
            rows.append({"case": f"worker, main thread {kind}", "threads": threads,
                         "s": on_worker(optimizers, threads, loads[kind], args.repeats)})
    base = rows[0]["s"]
    print(f"host step of {args.params / 1e9:.2f} G fp32 params (fused AdamW, {len(optimizers)} chunks), "
          f"{cores} intra-op threads, {os.cpu_count()} cpus")
    for r in rows:
        r["vs_main"] = r["s"] / base
        print(f"  {r['case']:<30} threads {r['threads']:>3}  {r['s']:.3f} s  {r['vs_main']:.2f}x  "
              f"{args.params / r['s'] / 1e9:.2f} G params/s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_host_step.json").write_text(json.dumps(
        {"params": args.params, "cores": cores, "device": torch.cuda.get_device_name(device)
         if device.type == "cuda" else "cpu", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
