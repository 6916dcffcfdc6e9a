"""Issue 11 on the GPUs one machine has: every strategy against one process (parity), and throughput beside peers.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD
    python benchmarks/multi_gpu.py reference --out $OUT/reference.json             # 1 device, 1 process
    torchrun --nproc_per_node N benchmarks/multi_gpu.py parity --reference $OUT/reference.json --out $OUT/p.json
    torchrun --nproc_per_node N benchmarks/multi_gpu.py parity --reference ... --precision bf16   # vs dp bf16
    torchrun --nproc_per_node N benchmarks/multi_gpu.py throughput --out $OUT/throughput.json [--model 7b]
    (benchmarks/gpu_suite.sh MODE runs the lot; --accelerator cpu runs everything on gloo with tiny sizes)

parity (benchmarks/mg_parity.py): the demo GPT (8 blocks, width 128), fp32 with TF32 off, SGD, 8 steps of a global
batch of 16 under each strategy on N ranks (one device each) against one process on the same global batches (the
sample ids every rank reads are checked): relative gap of each step's loss, tolerance 1e-5. ``--precision bf16``:
each strategy under bf16-mixed against ``dp`` under bf16-mixed, tolerance 2e-2. ``ddp`` is always the first row.

throughput: a GPT (``--model 1.3b``: 24 x 2048, 16 heads, batch 4 per GPU; ``--model 7b``: 32 x 4096, 32 heads,
batch 2 per GPU), vocab 50304, sequence 2048, bf16-mixed, fused AdamW, random tokens; each variant timed over
``--steps`` after ``--warmup``; tokens/s over all GPUs, the largest per-GPU peak, and ``host_syncs``: the number
of synchronizing CUDA calls (``torch.cuda.set_sync_debug_mode("warn")``) during the timed steps, the first ones
Python stacks printed. ``dp``, ``zero1``-``zero3`` and ``tp1d`` variants must make none: the command then exits with
status 3 (the offloading variants wait for their host step by design and are exempt; peers are only counted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dp  # noqa: E402  (the shared harness; puts the repository on sys.path)
import lightning.pytorch as pl  # noqa: E402

import lightning_par  # noqa: E402,F401  (registers the strategy names)
import mg_parity  # noqa: E402
import tp_peer  # noqa: E402
from lightning_par.demo.model import GPT  # noqa: E402
from lightning_par.strategies import (  # noqa: E402
    DataParallelStrategy, HybridParallelStrategy, PipelineStrategy, TensorParallel1DStrategy, TensorParallel2DStrategy,
    ZeroStrategy)

MODELS = {  # --model presets: layers, width, heads, batch per GPU
    "1.3b": dict(layers=24, width=2048, heads=16, batch=4),
    "7b": dict(layers=32, width=4096, heads=32, batch=2),  # batch 4 (≈36 GB of bf16 activations) would not fit zero3
}


def local_device(accelerator: str) -> torch.device:
    """This rank's device, set as the current CUDA device before anything else touches CUDA."""
    if accelerator == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


# -------------------------------------------------------------------------------------------------- throughput


class FSDP2Module(bench_dp.BenchModule):
    """Lightning's ModelParallelStrategy wants the module to shard itself: fully_shard per block, then the root."""

    cpu_offload = False  # FSDP2's CPUOffloadPolicy: parameters, gradients and optimizer state on the host

    def configure_model(self) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        if getattr(self, "_sharded", False):
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = {"offload_policy": CPUOffloadPolicy(pin_memory=True)} if self.cpu_offload else {}
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, **offload)
        fully_shard(self.model, mesh=mesh, mp_policy=policy, **offload)
        self._sharded = True


class FSDP2OffloadModule(FSDP2Module):
    """FSDP2 with ``CPUOffloadPolicy``, the step on the host too (the peer of ``zero3_host``, as in
    ``benchmarks/bench_offload.py`` on one GPU)."""

    cpu_offload = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # The parameters live on the host: torch's fused CPU AdamW (the fused CUDA kernel cannot step them).
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=True)


def fsdp2_offload_strategy(world: int) -> Any:
    """ModelParallelStrategy that leaves FSDP2's host shards on the host: Lightning's ``model_to_device`` after
    ``configure_model`` would move every parameter to the GPU, which CPU offload forbids (buffers, built on the
    GPU with the model, stay there)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class KeepShardsOnHost(ModelParallelStrategy):
        def model_to_device(self) -> None:
            pass

    return KeepShardsOnHost(data_parallel_size=world, tensor_parallel_size=1)


def host_spill_limit(args: argparse.Namespace, world: int) -> int:
    """Host bytes per rank that hold ~60% of what zero3_host keeps there (fp32 master, gradient, Adam's two
    moments: 16 bytes a parameter, sharded over ``world``), so ~40% of the optimizer state spills to NVMe."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in GPT(bench_dp.config(args)).parameters())
    return int(0.6 * 16 * n_params / world)


class PipelineBench(bench_dp.BenchModule):
    """The pipeline strategy splits the module's forward: the step must call ``self(...)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def build_split_gpt(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    with device:
        return tp_peer.SplitGPT(bench_dp.config(args))


class TensorParallelNoDeferral(TensorParallel1DStrategy):
    """tp1d computing every weight gradient at once (no [Note: deferred weight gradients]): the A/B baseline."""

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        plan = self.applied_plan
        if plan is not None:
            plan.tg.weight_grads.active = False


def throughput_variants(world: int, args: argparse.Namespace) -> dict[str, tuple[Callable[[], Any], type, Callable]]:
    """name -> (strategy factory, module class, model builder)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_par.demo.model import Block

    gpt, m = bench_dp.build_model, args.microbatches
    return {
        "dp": (lambda: "dp", bench_dp.BenchModule, gpt),
        # Larger buckets: fewer, longer all-reduces (DDP's default is 25 MB, as ours).
        "dp_bf16_reduce": (lambda: DataParallelStrategy(reduce_dtype="compute"), bench_dp.BenchModule, gpt),
        # dp's default is "grouped" (gradients all-reduced in place); "flat" copies them into flat buckets.
        "dp_grouped": (lambda: DataParallelStrategy(bucket_mode="grouped"), bench_dp.BenchModule, gpt),
        "dp_flat": (lambda: DataParallelStrategy(bucket_mode="flat"), bench_dp.BenchModule, gpt),
        "dp_bucket100": (lambda: DataParallelStrategy(bucket_size_mb=100), bench_dp.BenchModule, gpt),
        "dp_bucket250": (lambda: DataParallelStrategy(bucket_size_mb=250), bench_dp.BenchModule, gpt),
        "zero1": (lambda: "zero1", bench_dp.BenchModule, gpt),
        "zero2": (lambda: "zero2", bench_dp.BenchModule, gpt),
        "zero3": (lambda: "zero3", bench_dp.BenchModule, gpt),
        # Gradients reduced in bf16, as Lightning's fsdp does under bf16-mixed (our default reduces in fp32).
        "zero2_bf16_reduce": (lambda: ZeroStrategy(stage=2, reduce_dtype="compute"), bench_dp.BenchModule, gpt),
        "zero3_bf16_reduce": (lambda: ZeroStrategy(stage=3, reduce_dtype="compute"), bench_dp.BenchModule, gpt),
        # Other chunk sizes (the default is 32 Mi elements): fewer, longer collectives.
        **{f"zero3_bf16_chunk{mi}m": (lambda mi=mi: ZeroStrategy(stage=3, reduce_dtype="compute", chunk_size=mi * 2**20),
                                      bench_dp.BenchModule, gpt) for mi in (64, 128, 256)},
        **{f"zero2_bf16_chunk{mi}m": (lambda mi=mi: ZeroStrategy(stage=2, reduce_dtype="compute", chunk_size=mi * 2**20),
                                      bench_dp.BenchModule, gpt) for mi in (64, 128)},
        "zero3_offload": (lambda: "zero3_offload", bench_dp.BenchModule, gpt),
        # Every chunk on the host (ZeRO-Offload's placement at stage 3), and the same with part of the optimizer
        # state spilled to NVMe (ZeRO-Infinity); their peer is FSDP2 with CPUOffloadPolicy.
        "zero3_host": (lambda: ZeroStrategy(stage=3, offload=1.0), bench_dp.BenchModule, gpt),
        "zero3_nvme_spill": (lambda: ZeroStrategy(stage=3, offload=1.0, nvme_dir=tempfile.gettempdir(),
                                                  host_memory_limit=host_spill_limit(args, world)),
                             bench_dp.BenchModule, gpt),
        "lightning_fsdp2_offload": (lambda: fsdp2_offload_strategy(world), FSDP2OffloadModule, gpt),
        "tp1d": (lambda: TensorParallel1DStrategy(), bench_dp.BenchModule, gpt),
        "tp1d_sp": (lambda: TensorParallel1DStrategy(sequence_parallel=True), bench_dp.BenchModule, gpt),
        "tp1d_nosp": (lambda: TensorParallel1DStrategy(sequence_parallel=False), bench_dp.BenchModule, gpt),
        "tp1d_nodefer": (lambda: TensorParallelNoDeferral(), bench_dp.BenchModule, gpt),
        "tp2d": (lambda: TensorParallel2DStrategy(), bench_dp.BenchModule, gpt),
        # The row-parallel layers' overlap: the tokens in this many chunks (the default, 1, overlaps nothing).
        **{f"tp1d_chunks{k}": (lambda k=k: TensorParallel1DStrategy(sequence_chunks=k), bench_dp.BenchModule, gpt)
           for k in (2, 4)},
        "pipeline": (lambda: PipelineStrategy(schedule="1f1b", microbatches=m), PipelineBench, gpt),
        "pipeline_deferred": (lambda: PipelineStrategy(schedule="1f1b", microbatches=m, defer_weight_grads=True),
                              PipelineBench, gpt),
        "pipeline_interleaved": (lambda: PipelineStrategy(schedule="interleaved", microbatches=m), PipelineBench, gpt),
        "pipeline_interleaved_deferred": (lambda: PipelineStrategy(schedule="interleaved", microbatches=m,
                                                                   defer_weight_grads=True), PipelineBench, gpt),
        "pipeline_zero_bubble": (lambda: PipelineStrategy(schedule="zero_bubble", microbatches=m), PipelineBench, gpt),
        # hybrid at 4 GPUs: data 2 x tensor 2 (buckets, or ZeRO over the data axis), pipeline 2 x tensor 2
        "hybrid_d2_t2": (lambda: HybridParallelStrategy(tensor_size=2), bench_dp.BenchModule, gpt),
        **{f"hybrid_d2_t2_zero{z}": (lambda z=z: HybridParallelStrategy(tensor_size=2, zero_stage=z),
                                     bench_dp.BenchModule, gpt) for z in (1, 2, 3)},
        "hybrid_p2_t2": (lambda: HybridParallelStrategy(pipeline_size=2, tensor_size=2, microbatches=m),
                         PipelineBench, gpt),
        # fewer, larger microbatches: is pipeline x tensor bound by the host's kernel launches?
        **{f"hybrid_p2_t2_m{k}": (lambda k=k: HybridParallelStrategy(pipeline_size=2, tensor_size=2, microbatches=k),
                                  PipelineBench, gpt) for k in (2, 4)},
        "hybrid_p2_t2_nosp": (lambda: HybridParallelStrategy(pipeline_size=2, tensor_size=2, microbatches=m,
                                                             sequence_parallel=False), PipelineBench, gpt),
        "pipeline_2stages": (lambda: PipelineStrategy(schedule="1f1b", stages=2, microbatches=m), PipelineBench, gpt),
        "tp1d_2way": (lambda: TensorParallel1DStrategy(tensor_size=2), bench_dp.BenchModule, gpt),
        "lightning_ddp": (lambda: "ddp", bench_dp.BenchModule, gpt),
        "lightning_fsdp": (lambda: FSDPStrategy(auto_wrap_policy={Block}), bench_dp.BenchModule, gpt),
        "lightning_fsdp2": (lambda: ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                            FSDP2Module, gpt),
        "dtensor_tp": (lambda: ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world),
                       tp_peer.make_module_class(bench_dp.BenchModule), build_split_gpt),
    }


DEFAULT_VARIANTS = ("dp,zero1,zero2,zero3,tp1d,pipeline,lightning_ddp,lightning_fsdp,lightning_fsdp2,dtensor_tp")


class SyncTimer(bench_dp.WindowTimer):
    """The timed window, and the synchronizing CUDA calls made in it (sync debug mode "warn", warnings recorded)."""

    def __init__(self, warmup: int, steps: int, count_syncs: bool) -> None:
        super().__init__(warmup, steps)
        self.count_syncs = count_syncs
        self.host_syncs: int | None = None
        self.sync_sites: list[str] = []  # where the first synchronizing calls were made (Python stacks)
        self._catcher = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if batch_idx == self.first and self.count_syncs and pl_module.device.type == "cuda":
            with warnings.catch_warnings():  # switching the mode on warns once; that is no sync: not counted
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode("warn")
            self._catcher = warnings.catch_warnings()
            self._catcher.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._on_warning  # restored by the catcher
            self.host_syncs = 0

    def _on_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            self.host_syncs += 1
            if len(self.sync_sites) < 3:
                self.sync_sites.append("".join(traceback.format_stack(limit=14)[:-1]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last and self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def data_parallel_size(strategy: Any, world: int) -> int:
    if hasattr(strategy, "topology_for"):
        return strategy.topology_for(world).data
    if type(strategy).__name__ == "ModelParallelStrategy":
        return strategy._data_parallel_size if isinstance(strategy._data_parallel_size, int) else world
    return world


def run_variant(args: argparse.Namespace, name: str, world: int, device: torch.device,
                extra_callbacks: tuple | list = ()) -> dict:
    make, module_class, builder = throughput_variants(world, args)[name]
    strategy = make()
    if isinstance(strategy, str) and strategy != "ddp":
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry[strategy]
        strategy = entry["strategy"](**entry["init_params"])
    data = data_parallel_size(strategy, world)
    n_batches = (args.warmup + args.steps) * data
    ds = bench_dp.Batches(n_batches, args.batch * world // data, args.seq, args.vocab,
                          pin=device.type == "cuda", seed=0)
    model = builder(args, device)  # on this rank's own device
    module = module_class(model, args.lr)
    timer = SyncTimer(args.warmup, args.steps, count_syncs=args.sync_check)  # peers too: the same yardstick
    trainer = pl.Trainer(accelerator=args.accelerator, devices=world, strategy=strategy, precision="bf16-mixed",
                         max_steps=args.warmup + args.steps, max_epochs=1, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, *extra_callbacks],
                         use_distributed_sampler=False)  # each rank reads all batches: the same per-rank work
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.fit(module, train_dataloaders=bench_dp.make_loader(ds))
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError("the timed window was not reached")
    seconds = timer.t1 - timer.t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tokens = args.steps * args.batch * world * args.seq  # the global batch is batch x world in every variant
    # Where ZeRO put its chunks (GPU, host, NVMe): an offload figure means little without it.
    zero = trainer.strategy if isinstance(trainer.strategy, ZeroStrategy) else None
    placement = zero.engine.plan.describe(str(device)) if zero is not None else None
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / args.steps, "peak_gib": peak,
            "host_syncs": timer.host_syncs, "sync_sites": timer.sync_sites, "placement": placement}


def apply_model_preset(args: argparse.Namespace) -> None:
    if args.model:
        for k, v in MODELS[args.model].items():
            if k != "batch" or args.batch is None:
                setattr(args, k, v)
    if args.batch is None:
        args.batch = 4


def cmd_throughput(args: argparse.Namespace) -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    device = local_device(args.accelerator)
    apply_model_preset(args)
    torch.set_float32_matmul_precision("high")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    variants = throughput_variants(world, args)
    chosen = [v.strip() for v in (args.variants or DEFAULT_VARIANTS).split(",") if v.strip()]
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(variants)}")
    with torch.device("meta"):
        n_params = GPT(bench_dp.config(args)).num_params()
    if rank == 0:
        print(f"throughput: world {world}, GPT {n_params / 1e9:.2f}B ({args.layers}x{args.width}, {args.heads} heads, "
              f"vocab {args.vocab}), batch {args.batch}/GPU x seq {args.seq}, {args.warmup}+{args.steps} steps, "
              f"pipeline microbatches {args.microbatches}; dtensor_tp = {tp_peer.DESCRIPTION}", flush=True)
    rows = []
    for name in chosen:
        row: dict[str, Any] = {"variant": name, "world": world}
        t0 = time.perf_counter()
        try:
            row.update(run_variant(args, name, world, device))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the next variant runs
            row.update(status="oom" if "out of memory" in str(e).lower() else "error",
                       error=f"{type(e).__name__}: {e}"[:300])
            # At once, on every rank: if the other ranks are still inside the variant's collectives, the gather of
            # the rows below cannot pair up and the case ends at its time limit; this line is then all that is left.
            print(f"rank {rank}: {name} failed: {row['error']}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        if dist.is_initialized() and world > 1:
            peaks: list = [None] * world
            dist.all_gather_object(peaks, (row.get("peak_gib"), row.get("host_syncs"), row["status"]))
            row["peak_gib"] = max((p[0] for p in peaks if p[0] is not None), default=None)
            syncs = [p[1] for p in peaks if p[1] is not None]
            row["host_syncs"] = max(syncs) if syncs else None  # the largest count of one rank
            if any(p[2] == "oom" for p in peaks):
                row["status"] = "oom"
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        bench_dp.free(device)  # the trainer and module form cycles: collect
        if rank == 0:
            tps = row.get("tokens_per_s") or 0
            syncs = row.get("host_syncs")
            print(f"  {name:<22} {row['status']:<5} {tps:>10,.0f} tok/s  per GPU {tps / world:>9,.0f}  "
                  f"peak {row.get('peak_gib') or 0:6.1f} GiB  host_syncs {'-' if syncs is None else syncs:>4}  "
                  f"({row['seconds']:.0f} s) {row.get('error', '')}", flush=True)
            if row.get("placement"):
                print(f"    placement (rank 0): {row['placement']}", flush=True)
            for site in row.get("sync_sites") or []:  # rank 0's; the count above is the largest of any rank
                print("    host sync at:\n" + "\n".join("      " + line for line in site.splitlines()), flush=True)
        if rank == 0 and args.out:  # after every variant: a later hang (an OOM on one rank only) keeps these rows
            config = {k: v for k, v in vars(args).items() if k != "func"}
            dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            Path(args.out).write_text(json.dumps({"config": config, "world": world, "n_params": n_params,
                                                  "rows": rows, "device": dev_name, "torch": torch.__version__,
                                                  "lightning": pl.__version__}, indent=1))
    synced = [r["variant"] for r in rows if must_not_sync(r["variant"]) and (r.get("host_syncs") or 0) > 0]
    if synced:  # every rank: the counts were gathered
        if rank == 0:
            print(f"FAIL: host syncs in the timed steps of {', '.join(synced)}, which must make none", flush=True)
        args.exit_code = 3


def cmd_sync_check(args: argparse.Namespace) -> None:
    """The host-sync counter's own control: one window with a deliberate ``.item()`` must count 1, one without 0."""
    device = torch.device("cuda", 0)
    module = type("Fake", (), {"device": device})()
    counts = []
    for deliberate in (True, False):
        timer = SyncTimer(0, 1, count_syncs=True)
        timer.on_train_batch_start(None, module, None, 0)
        x = torch.ones(4, device=device).mul(2)
        if deliberate:
            x.sum().item()
        timer.on_train_batch_end(None, module, None, None, 0)
        counts.append(timer.host_syncs)
    ok = counts == [1, 0]
    print(f"sync check: {'PASS' if ok else 'FAIL'} (counted {counts[0]} with one deliberate sync, {counts[1]} without)",
          flush=True)
    args.exit_code = 0 if ok else 3


def must_not_sync(variant: str) -> bool:
    """Our variants whose timed steps must make no host sync (the offloading ones wait for their host step)."""
    return variant.startswith(("dp", "zero", "tp1d", "tp2d", "hybrid_d2")) and not any(k in variant for k in ("offload", "nvme", "host"))


def add_throughput_args(thr: argparse.ArgumentParser) -> None:
    thr.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    thr.add_argument("--out", default="")
    thr.add_argument("--variants", default="", help=f"comma-separated; default {DEFAULT_VARIANTS}")
    thr.add_argument("--model", choices=sorted(MODELS), default="", help="preset: overrides layers/width/heads")
    for name, default in (("layers", 24), ("width", 2048), ("heads", 16), ("vocab", 50304), ("seq", 2048),
                          ("steps", 10), ("warmup", 3), ("microbatches", 8)):
        thr.add_argument(f"--{name}", type=int, default=default)
    thr.add_argument("--batch", type=int, default=None, help="per GPU; default 4 (2 for --model 7b)")
    thr.add_argument("--lr", type=float, default=1e-4)
    thr.add_argument("--seed", type=int, default=0)
    thr.add_argument("--no-sync-check", dest="sync_check", action="store_false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True)
    ref = sub.add_parser("reference")
    ref.add_argument("--out", required=True)
    mg_parity.add_parity_args(ref)
    ref.set_defaults(func=mg_parity.cmd_reference)
    par = sub.add_parser("parity")
    par.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    par.add_argument("--reference", required=True, help="the reference's JSON (its config is used)")
    par.add_argument("--out", required=True)
    par.add_argument("--only", default="", help="comma-separated strategy names (ddp always runs first)")
    par.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    par.add_argument("--nvme-dir", default="/tmp/lightning_par_multi_gpu_nvme")
    par.set_defaults(func=mg_parity.cmd_parity)
    res = sub.add_parser("resume", help="a checkpoint chain: each strategy resumes the previous one's checkpoint")
    mg_parity.add_parity_args(res)
    res.add_argument("--legs", required=True, help="comma-separated strategy names, in order")
    res.add_argument("--dir", required=True, help="where the checkpoints are written (kept for later calls)")
    res.add_argument("--resume-from", default=None, help="the first leg resumes this checkpoint")
    res.add_argument("--epochs-before", type=int, default=0, help="epochs the --resume-from checkpoint holds")
    res.add_argument("--nvme-dir", default="/tmp/lightning_par_multi_gpu_nvme")
    res.set_defaults(func=mg_parity.cmd_resume)
    sub.add_parser("sync_check", help="the host-sync counter's control (CUDA)").set_defaults(
        func=cmd_sync_check, accelerator="gpu")
    thr = sub.add_parser("throughput")
    add_throughput_args(thr)
    thr.set_defaults(func=cmd_throughput)
    args = p.parse_args()
    if args.func is not cmd_throughput:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        local_device(args.accelerator)
    args.func(args)
    exit_now(getattr(args, "exit_code", 0))


def exit_now(code: int = 0) -> None:
    """Results are written: leave without interpreter teardown, where a rank could abort or hang on a background
    communication thread ("terminate called without an active exception" seen at exit on gloo)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
