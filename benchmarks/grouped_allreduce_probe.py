"""Is dp's copy into flat buckets worth removing? Gradient averaging as ``dp`` does it against a grouped variant.

    torchrun --nproc_per_node 2 benchmarks/grouped_allreduce_probe.py            # 1.3B GPT's gradients, NCCL
    torchrun --nproc_per_node 2 benchmarks/grouped_allreduce_probe.py --cpu      # tiny, gloo: the smoke test

``dp`` copies each fresh gradient into its bucket's flat buffer (Lightning's ``zero_grad(set_to_none=True)`` hands a
new tensor every step) and all-reduces the buffer: 8 bytes moved per fp32 element before the wire, about 4 ms a step
for 1.3B on an H100. The alternative all-reduces the gradients where autograd left them, one NCCL group of
per-tensor all-reduces per bucket (``torch.distributed._coalescing_manager``), with no copy. Here both run alone (no
backward beside them), over the buckets ``comm/buckets.py``'s ``GradientBucketer`` forms (25 MiB by default):
the time of each per step, and whether the results agree.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from lightning_par.comm.buckets import GradientBucketer
from lightning_par.comm.collectives import mean_op
from lightning_par.demo.model import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    rank = int(os.environ["RANK"])
    if args.cpu:
        device, cfg = torch.device("cpu"), GPTConfig(vocab_size=128, n_layer=2, n_head=2, n_embd=32)
        dist.init_process_group("gloo")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        cfg = GPTConfig(vocab_size=50304, block_size=2048, n_layer=24, n_head=16, n_embd=2048)
        dist.init_process_group("nccl", device_id=device)
    with torch.device("meta"):
        shapes = [q.shape for q in GPT(cfg).parameters()]
    gen = torch.Generator(device=device).manual_seed(rank)
    params = [torch.nn.Parameter(torch.empty(shape, device=device)) for shape in shapes]
    grads = {p: torch.randn(p.shape, device=device, generator=gen) for p in params}  # this rank's fresh gradients
    group = dist.group.WORLD
    bucketer = GradientBucketer([(str(i), p) for i, p in enumerate(params)], group)  # dp's buckets, as dp forms them
    bucketer.remove()  # only its buckets are used here, not its hooks
    buckets = [[grads[p] for p in bucket.params] for bucket in bucketer.buckets]
    op, _ = mean_op(group)

    def flat_step() -> list[torch.Tensor]:
        works = []
        for bucket in bucketer.buckets:
            for p, view in zip(bucket.params, bucket.views):
                view.copy_(grads[p])  # the copy dp makes for a fresh gradient, one per parameter
            works.append(dist.all_reduce(bucket.buffer, op=op, async_op=True))  # with dp's flag elements
        for w in works:
            w.wait()
        return [bucket.buffer[:bucket.numel] for bucket in bucketer.buckets]

    def grouped_step(tensors: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        works = []
        for bucket in tensors:
            if args.cpu:  # gloo cannot coalesce: one all-reduce per tensor (the smoke test only)
                works += [dist.all_reduce(t, op=op, async_op=True) for t in bucket]
                continue
            with dist._coalescing_manager(device=device, async_ops=True) as cm:
                for t in bucket:
                    dist.all_reduce(t, op=op)
            works.append(cm)
        for w in works:
            w.wait()
        return tensors

    def timed(fn, *a) -> float:
        for _ in range(2):
            fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn(*a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / args.steps * 1e3

    copies = [[t.clone() for t in b] for b in buckets]
    flat_ms = timed(flat_step)
    grouped_ms = timed(grouped_step, copies)
    # Agreement: both from this rank's original gradients (the flat path copies them, so they are unchanged).
    fresh = [[t.clone() for t in b] for b in buckets]
    got = torch.cat([t.reshape(-1) for b in grouped_step(fresh) for t in b])
    ref = torch.cat([f.reshape(-1) for f in flat_step()])
    n_bytes = sum(t.numel() * t.element_size() for t in grads.values())
    if rank == 0:
        print(f"grouped all-reduce probe: {len(params)} gradients, {n_bytes / 2**30:.2f} GiB, {len(buckets)} buckets, "
              f"world {dist.get_world_size()}, {device.type}")
        print(f"  copy + flat all-reduce   {flat_ms:8.2f} ms per step")
        print(f"  grouped, no copy         {grouped_ms:8.2f} ms per step   ({flat_ms / grouped_ms:.2f}x)")
        print(f"  results agree: {torch.allclose(got, ref, rtol=1e-5, atol=1e-6)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
