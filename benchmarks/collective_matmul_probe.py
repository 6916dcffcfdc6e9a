"""Does torch's symmetric-memory collective matmul beat NCCL + matmul at tp1d's shapes? (a probe for issue 11)

    torchrun --nproc_per_node 2 benchmarks/collective_matmul_probe.py      # NCCL_NVLS_ENABLE=0 etc. as in gpu_suite

``tp1d``'s forward runs, per block, two all-gathers of the token-sharded input into a column matmul (attention's
q/k/v, the MLP's first layer) and two row matmuls whose outputs are reduce-scattered back to token shards; nothing
overlaps them (see docs/benchmarks.md, "Where tp1d's time goes"). torch's ``symm_mem.fused_all_gather_matmul`` /
``fused_matmul_reduce_scatter`` (torchtitan's "async TP") pipeline the copies with the matmul chunks over
peer-to-peer memory. This times, at the 1.3B GPT's shapes (width 2048, batch 4 x 2048 tokens per tensor group, bf16),
each pair as NCCL collective then ``mm`` and as the fused op, plus the ``mm`` alone, and checks the fused results
against the plain ones. Prints one line per case; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4 * 2048, help="tokens of the whole (gathered) activation")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, t = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    group = dist.group.WORLD
    enable_symm_mem_for_group(group.group_name)
    c, n = args.width, args.tokens
    torch.manual_seed(rank)
    bf = dict(dtype=torch.bfloat16, device="cuda")
    rows = []
    for name, out_cols in (("qkv (column, 3C/t)", 3 * c // t), ("mlp fc (column, 4C/t)", 4 * c // t)):
        shard = torch.randn(n // t, c, **bf)
        weight = torch.randn(out_cols, c, **bf) / c ** 0.5
        gathered = torch.empty(n, c, **bf)

        def nccl() -> torch.Tensor:
            dist.all_gather_into_tensor(gathered, shard, group=group)
            return gathered @ weight.t()

        def fused() -> torch.Tensor:
            return torch.ops.symm_mem.fused_all_gather_matmul(shard, [weight.t()], 0, group.group_name,
                                                              return_A=False)[1][0]

        gap = (nccl() - fused()).abs().max().item()
        rows.append(dict(case=f"all-gather + {name}", nccl_ms=timed(nccl, args.reps),
                         fused_ms=timed(fused, args.reps), mm_ms=timed(lambda: gathered @ weight.t(), args.reps),
                         max_abs_diff=gap))
    for name, in_cols in (("attn proj (row, C/t)", c // t), ("mlp proj (row, 4C/t)", 4 * c // t)):
        x = torch.randn(n, in_cols, **bf)
        weight = torch.randn(c, in_cols, **bf) / in_cols ** 0.5
        local = torch.empty(n // t, c, **bf)

        def nccl() -> torch.Tensor:
            dist.reduce_scatter_tensor(local, x @ weight.t(), group=group)
            return local

        def fused() -> torch.Tensor:
            return torch.ops.symm_mem.fused_matmul_reduce_scatter(x, weight.t(), "sum", 0, group.group_name)

        gap = (nccl().float() - fused().float()).abs().max().item()
        rows.append(dict(case=f"{name} + reduce-scatter", nccl_ms=timed(nccl, args.reps),
                         fused_ms=timed(fused, args.reps), mm_ms=timed(lambda: x @ weight.t(), args.reps),
                         max_abs_diff=gap))
    if rank == 0:
        print(f"collective matmul probe: {t} GPUs, {torch.cuda.get_device_name()}, width {c}, {n} tokens, bf16")
        for r in rows:
            print(f"  {r['case']:38s} nccl+mm {r['nccl_ms']:6.3f} ms  fused {r['fused_ms']:6.3f} ms  "
                  f"(x{r['nccl_ms'] / r['fused_ms']:.2f})  mm alone {r['mm_ms']:6.3f} ms  max diff {r['max_abs_diff']:.2e}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(world=t, device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
