"""Issue 7 on the GPUs one machine has: every strategy on NCCL against one process, and throughput beside Lightning.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python benchmarks/multi_gpu.py reference --out $OUT/reference.json             # 1 GPU, 1 process
    torchrun --nproc_per_node N benchmarks/multi_gpu.py parity --reference $OUT/reference.json --out $OUT/parity.json
    torchrun --nproc_per_node N benchmarks/multi_gpu.py throughput --out $OUT/throughput.json
    python benchmarks/multi_gpu.py throughput --out $OUT/throughput_1gpu.json --variants zero3   # scaling, 1 GPU

parity: the demo GPT (4 blocks, width 128), fp32 with TF32 off, SGD, 8 steps of a global batch of 16, under each
strategy on N ranks (one per GPU, NCCL) against the same global batches in one process: the relative gap of each
step's loss (mean over the data-parallel replicas). Lightning's torchrun environment is detected, so every
``Trainer`` joins the N processes.

throughput: a GPT of ``--layers x --width`` (default 1.3 B, sequence 2048, batch 4 per GPU), bf16-mixed, fused
AdamW, random tokens; each variant timed over ``--steps`` after ``--warmup``; tokens/s over all GPUs and the largest
per-GPU peak. Ours (dp, zero1-3, tp1d, pipeline) beside Lightning's ddp, fsdp and ModelParallelStrategy (FSDP2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dp  # noqa: E402  (the shared harness; puts the repository on sys.path)
import lightning.pytorch as pl  # noqa: E402

import lightning_par  # noqa: E402,F401  (registers the strategy names)
from lightning_par.demo.model import DemoGPT  # noqa: E402
from lightning_par.strategies import PipelineStrategy, TensorParallel1DStrategy, ZeroStrategy  # noqa: E402

GLOBAL_BATCH, STEPS, SEQ, VOCAB = 16, 8, 64, 256


# ------------------------------------------------------------------------------------------------------ parity


class Recording(DemoGPT):
    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB, block_size=SEQ, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
                         optimizer="sgd", learning_rate=0.1)
        self.recorded: list[float] = []

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.recorded.append(float(outputs["loss"]) * self.trainer.accumulate_grad_batches)


def parity_strategies(nvme_dir: str, world: int) -> dict[str, Callable[[], Any]]:
    # ~0.83 M parameters: 13.3 MB of fp32 masters, gradients and Adam-sized state over the ranks; a host limit of
    # 10 MB in all makes about half of the host chunks spill their state to disk at any world size.
    host_limit = 10_000_000 // world
    return {
        "dp": lambda: "dp",
        "zero1": lambda: "zero1",
        "zero2": lambda: "zero2",
        "zero3": lambda: "zero3",
        "zero2_offload": lambda: "zero2_offload",
        "zero3_offload": lambda: "zero3_offload",
        "zero3 half on host": lambda: ZeroStrategy(stage=3, chunk_size=2**16, offload=0.5),
        "zero3_nvme (spilling)": lambda: ZeroStrategy(stage=3, chunk_size=2**16, offload=1.0, nvme_dir=nvme_dir,
                                                       host_memory_limit=host_limit),
        "tp1d": lambda: "tp1d",
        "tp1d + sequence parallel": lambda: TensorParallel1DStrategy(sequence_parallel=True),
        **{f"pipeline {s}": (lambda s=s: PipelineStrategy(schedule=s, microbatches=4))
           for s in ("1f1b", "gpipe", "interleaved", "zero_bubble", "chimera")},
    }


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (STEPS * GLOBAL_BATCH, SEQ + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def fit_losses(strategy: Any, devices: int, per_rank_batch: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    module = Recording()
    trainer = pl.Trainer(accelerator="gpu", devices=devices, strategy=strategy, precision="32-true",
                         max_steps=STEPS, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(dataset(), batch_size=per_rank_batch))
    return module.recorded


def exact_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def cmd_reference(args: argparse.Namespace) -> None:
    exact_fp32()
    losses = fit_losses("auto", 1, GLOBAL_BATCH)
    Path(args.out).write_text(json.dumps({"losses": losses}))
    print("reference", losses)


def data_parallel_size(strategy: Any, world: int) -> int:
    return strategy.topology_for(world).data if hasattr(strategy, "topology_for") else world


def cmd_parity(args: argparse.Namespace) -> None:
    exact_fp32()
    reference = json.loads(Path(args.reference).read_text())["losses"]
    world = int(os.environ["WORLD_SIZE"])
    rows = []
    for name, make in parity_strategies(args.nvme_dir, world).items():
        strategy = make()
        if isinstance(strategy, str):
            from lightning.pytorch.strategies import StrategyRegistry

            entry = StrategyRegistry[strategy]
            strategy = entry["strategy"](**entry["init_params"])
        data = data_parallel_size(strategy, world)
        row: dict[str, Any] = {"strategy": name, "world": world, "data_parallel": data}
        t0 = time.perf_counter()
        try:
            losses = fit_losses(strategy, world, GLOBAL_BATCH // data)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, losses)
            replicas = [gathered[d * (world // data)] for d in range(data)]
            ours = [sum(step) / data for step in zip(*replicas)]
            gap = max(abs(a - b) / abs(b) for a, b in zip(ours, reference))
            row.update(status="ok" if len(ours) == len(reference) else "steps differ", gap=gap, first=ours[0],
                       last=ours[-1])
        except Exception as e:  # noqa: BLE001 - recorded, the next strategy runs
            row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"{name:<26} {row['status']:<6} gap {row.get('gap', float('nan')):.2e} "
                  f"({row['seconds']:.0f} s) {row.get('error', '')}", flush=True)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({"reference": reference, "rows": rows}, indent=1))


# -------------------------------------------------------------------------------------------------- throughput


class FSDP2Module(bench_dp.BenchModule):
    """Lightning's ModelParallelStrategy wants the module to shard itself: fully_shard per block, then the root."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, mp_policy=policy)


class PipelineBench(bench_dp.BenchModule):
    """The pipeline strategy splits the module's forward: the step must call ``self(...)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def throughput_variants(world: int) -> dict[str, tuple[Callable[[], Any], type]]:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_par.demo.model import Block

    return {
        "dp": (lambda: "dp", bench_dp.BenchModule),
        "zero1": (lambda: "zero1", bench_dp.BenchModule),
        "zero2": (lambda: "zero2", bench_dp.BenchModule),
        "zero3": (lambda: "zero3", bench_dp.BenchModule),
        "tp1d": (lambda: TensorParallel1DStrategy(), bench_dp.BenchModule),
        "pipeline": (lambda: PipelineStrategy(schedule="1f1b"), PipelineBench),  # 2 microbatches per stage
        "lightning ddp": (lambda: "ddp", bench_dp.BenchModule),
        "lightning fsdp": (lambda: FSDPStrategy(auto_wrap_policy={Block}), bench_dp.BenchModule),
        "lightning FSDP2 (ModelParallelStrategy)": (
            lambda: ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1), FSDP2Module),
    }


def run_variant(args: argparse.Namespace, strategy: Any, module_class: type, world: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    data = data_parallel_size(strategy, world) if not isinstance(strategy, str) else world
    n_batches = (args.warmup + args.steps) * data
    ds = bench_dp.Batches(n_batches, args.batch * world // data, args.seq, args.vocab, pin=True, seed=0)
    with device:
        model = bench_dp.build_model(args, device)
    module = module_class(model, args.lr)
    timer = bench_dp.WindowTimer(args.warmup, args.steps)
    trainer = pl.Trainer(accelerator="gpu", devices=world, strategy=strategy, precision="bf16-mixed",
                         max_steps=args.warmup + args.steps, max_epochs=1, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    torch.cuda.reset_peak_memory_stats(device)  # (the previous variant was collected by `bench_dp.free`)
    trainer.fit(module, train_dataloaders=bench_dp.make_loader(ds))
    seconds = timer.t1 - timer.t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    tokens = args.steps * args.batch * world * args.seq  # the global batch is batch x world in every variant
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "peak_gib": peak}


def cmd_throughput(args: argparse.Namespace) -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    variants = throughput_variants(world)
    chosen = [v.strip() for v in args.variants.split(",")] if args.variants else list(variants)
    rows = []
    for name in chosen:
        make, module_class = variants[name]
        row: dict[str, Any] = {"variant": name, "world": world}
        try:
            row.update(run_variant(args, make(), module_class, world))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the next variant runs
            row.update(status="oom" if "out of memory" in str(e).lower() else "error",
                       error=f"{type(e).__name__}: {e}"[:300])
        if dist.is_initialized() and world > 1:
            peaks: list = [None] * world
            dist.all_gather_object(peaks, row.get("peak_gib"))
            row["peak_gib"] = max((p for p in peaks if p is not None), default=None)
        rows.append(row)
        bench_dp.free(torch.device("cuda", torch.cuda.current_device()))  # the trainer and module form cycles: collect
        if rank == 0:
            tps = row.get("tokens_per_s")
            print(f"{name:<42} {row['status']:<6} {tps or 0:>10,.0f} tok/s  per GPU {(tps or 0) / world:>9,.0f}  "
                  f"peak {row.get('peak_gib') or 0:6.1f} GiB {row.get('error', '')}", flush=True)
    if rank == 0:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.out).write_text(json.dumps({"config": config, "world": world, "rows": rows,
                                              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "lightning": pl.__version__}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("--out", required=True)
    ref.set_defaults(func=cmd_reference)
    par = sub.add_parser("parity")
    par.add_argument("--reference", required=True)
    par.add_argument("--out", required=True)
    par.add_argument("--nvme-dir", default="/tmp/lightning_par_multi_gpu_nvme")
    par.set_defaults(func=cmd_parity)
    thr = sub.add_parser("throughput")
    thr.add_argument("--out", required=True)
    thr.add_argument("--variants", default="")
    for name, default in (("layers", 24), ("width", 2048), ("heads", 16), ("vocab", 50304), ("batch", 4),
                          ("seq", 2048), ("steps", 10), ("warmup", 3)):
        thr.add_argument(f"--{name}", type=int, default=default)
    thr.add_argument("--lr", type=float, default=1e-4)
    thr.add_argument("--seed", type=int, default=0)
    thr.add_argument("--precision", default="bf16")
    thr.set_defaults(func=cmd_throughput)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
