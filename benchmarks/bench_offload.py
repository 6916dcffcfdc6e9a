"""Heterogeneous memory: ZeRO-3 with offload (ours) against FSDP2 + CPUOffloadPolicy (the peer), on one GPU.

On the H200 (1 GPU, 16 cores, 128 GiB host, 64 GiB disk). Each command is sized for a 10-minute slot: ``--budget``
starts no child with less than 30 s left, and the JSON is rewritten after every child, so a cut run keeps its data.

    python benchmarks/bench_offload.py throughput --sizes 1.3B --strategies zero3,zero3_offload,fsdp2_offload \
        --steps 10 --warmup 2 --budget 560 --tag 1.3B
    python benchmarks/bench_offload.py throughput --sizes 7.5B --strategies zero3,zero3_offload,fsdp2_offload \
        --steps 5 --warmup 2 --budget 560 --tag 7.5B
    python benchmarks/bench_offload.py largest --strategies zero3_offload --ladder 7.5B,10B,12B,15B,17B,20B,22B \
        --budget 560 --tag zero3_offload
    python benchmarks/bench_offload.py largest --strategies zero3_nvme --ladder 12B,15B,17B,20B,22B,24B,26B \
        --budget 560 --tag zero3_nvme --strategy-kwargs 'zero3_nvme={"nvme_dir": "/tmp/zero3_nvme"}'
    python benchmarks/bench_offload.py largest --strategies fsdp2_offload --ladder 5.8B,7.5B,8.3B,10B \
        --budget 560 --tag fsdp2_offload

Smoke test (any machine), plot (needs matplotlib only, no torch), size table:

    python benchmarks/bench_offload.py throughput --device cpu --sizes tiny \
        --strategies zero3,zero2_offload,fsdp2_offload,plain --steps 3 --warmup 1
    python benchmarks/bench_offload.py largest --device cpu --strategies zero3,fsdp2_offload --ladder tiny,tiny2
    python benchmarks/bench_offload.py plot RESULT.json [RESULT2.json ...] --out docs/img/offload.png
    python benchmarks/bench_offload.py sizes

``--rounds N`` runs the variants N times, every other round in reverse order, and takes ratios of the medians: lent
machines differ, and one drifts between runs by more than some of the changes measured (docs/benchmarks.md).

Variants ``<name>_dpu`` and ``<name>_early`` run a registered strategy with ``delay_update=True`` or
``step_during_backward=True`` (``zero3_offload_dpu``, ``zero2_offload_early``, ...).

Each (size, variant) runs in a subprocess of its own: a CUDA OOM, a host-OOM kill or a hang is recorded (``oom``,
``killed``, ``timeout``) and the next one starts on a clean GPU and host. Variants: Lightning strategy names (stage 3
built in ``trainer.init_module(empty_init=True)``), ``fsdp2_offload`` (the peer, a plain loop) and ``plain``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

# Only the standard library at module level: `plot` must run under a python with matplotlib and no torch.
HERE = Path(__file__).resolve().parent
MARK = "@@bench_offload "  # prefix of the child's one result line on stdout
MEMORY = "@@host memory "  # prefix of the child's host-memory lines on stderr (kept when a child is killed)
GiB = 2**30
PEERS = ("fsdp2_offload", "plain")  # the variants that are not Lightning strategies
# A variant named <registered name><suffix> runs that strategy with the option on (issue 16's overlaps).
VARIANT_OPTIONS = {"_dpu": "delay_update", "_early": "step_during_backward"}
# name -> (layers, width, heads, batch, seq, vocab): the ANCHORS shapes, then ladder rungs (batch 1) whose names
# are within 3% of their real parameter counts (`sizes` prints them).
SIZES = {
    "tiny": (2, 64, 2, 2, 64, 128), "tiny2": (4, 128, 4, 2, 64, 128),
    "1.3B": (24, 2048, 16, 8, 1024, 50304), "3.8B": (32, 3072, 24, 4, 1024, 50304),
    "5.8B": (28, 4096, 32, 4, 1024, 50304), "7.5B": (36, 4096, 32, 4, 1024, 50304),
    "8.3B": (40, 4096, 32, 1, 1024, 50304), "10B": (48, 4096, 32, 1, 1024, 50304),
    "12B": (37, 5120, 40, 1, 1024, 50304), "15B": (47, 5120, 40, 1, 1024, 50304),
    "17B": (53, 5120, 40, 1, 1024, 50304), "20B": (44, 6144, 48, 1, 1024, 50304),
    "22B": (48, 6144, 48, 1, 1024, 50304), "24B": (52, 6144, 48, 1, 1024, 50304),
    "26B": (57, 6144, 48, 1, 1024, 50304),
}


def size_info(name: str, batch: int | None = None) -> dict:
    layers, width, heads, b, seq, vocab = SIZES[name]
    # Per block 12h² + 13h (qkv, proj, 4h MLP, biases, 2 LayerNorms); tied embedding, positions, final LayerNorm.
    n = layers * (12 * width * width + 13 * width) + vocab * width + seq * width + 2 * width
    return {"size": name, "layers": layers, "width": width, "heads": heads, "batch": batch or b, "seq": seq,
            "vocab": vocab, "n_params": n}


# ================================================================================================ child process


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class HostSampler(threading.Thread):
    """Lowest MemAvailable seen. Pinned host memory and the page cache of NVMe files need not show in this
    process's RSS; the drop in MemAvailable shows them. Every ``report_s`` the use so far goes to stderr: a child
    the kernel kills leaves its trajectory in its saved stderr."""

    def __init__(self, report_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.start_bytes = self.low = mem_available()
        self.report_s = report_s

    def run(self) -> None:
        t0 = last = time.monotonic()
        while True:
            now_available = mem_available()
            self.low = min(self.low, now_available)
            if time.monotonic() - last >= self.report_s:
                last = time.monotonic()
                print(f"{MEMORY}{last - t0:.0f} s: {(self.start_bytes - now_available) / GiB:.2f} GiB used, peak "
                      f"{(self.start_bytes - self.low) / GiB:.2f} GiB, {now_available / GiB:.2f} GiB available",
                      file=sys.stderr, flush=True)
            time.sleep(0.05)


def Recorder(warmup: int, steps: int):
    from types import SimpleNamespace

    return SimpleNamespace(warmup=warmup, total=warmup + steps, t0=None, t1=None, losses=[], extra={})


def checkpoint_blocks(model) -> None:
    """Activation checkpointing by wrapping each block; the demo model stays as it is."""
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    for i, block in enumerate(model.blocks):
        model.blocks[i] = Checkpointed(block)


def init_gpt_(module, n_layer: int) -> None:
    """The GPT's own initialisation (GPT._init_weights, scaled residual projections) of a module built empty."""
    import torch.nn as nn
    from lightning_par.demo.model import GPT

    for name, m in module.named_modules():
        if isinstance(m, nn.LayerNorm):
            m.reset_parameters()
        GPT._init_weights(m)
        if name.endswith("c_proj"):
            nn.init.normal_(m.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


def train_loop(model, make_opt, ds, device, rec, autocast) -> None:
    """bench_dp.run_plain's loop, keeping each step's loss. If the first optimizer step fails (fused AdamW on
    offloaded DTensors), ``make_opt(True)`` builds the fallback once."""
    import bench_dp

    opt, fell_back = make_opt(False), False
    for i, (x, y) in enumerate(bench_dp.make_loader(ds)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if i == rec.warmup:
            bench_dp.sync(device)
            rec.t0 = time.perf_counter()
        with autocast:
            loss = bench_dp.lm_loss(model, x, y)
        loss.backward()
        try:
            opt.step()
        except (RuntimeError, NotImplementedError) as e:
            if fell_back or i:
                raise
            rec.extra["optimizer_fallback_reason"] = str(e).strip().splitlines()[0][:200]
            opt, fell_back = make_opt(True), True
            opt.step()
        opt.zero_grad(set_to_none=True)
        rec.losses.append(loss.detach())
    bench_dp.sync(device)
    rec.t1 = time.perf_counter()


def run_fsdp2(cfg: dict, model, ds, device, rec) -> None:
    import contextlib
    import socket

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    with socket.socket() as s:  # a free port for the world-size-1 rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # CPUOffloadPolicy pins host memory, which needs an accelerator ("Cannot access accelerator device when none is
    # available" on a CPU-only build): on CPU the smoke run shards without offload and records cpu_offload=False.
    offload = device.type == "cuda"
    rec.extra["cpu_offload"] = offload
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    # Built on meta; each block is materialised and initialised on the GPU (a host init of 7.5B normal_ draws takes
    # minutes), then fully_shard copies its shard to pinned host memory and the GPU copy is freed: the GPU never
    # holds more than one block during init.
    n_layer = cfg["layers"]
    for block in model.blocks:
        block.to_empty(device=device)
        with torch.no_grad():
            init_gpt_(block, n_layer)
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=policy)
    for m in (model.wte, model.wpe, model.ln_f):
        m.to_empty(device=device)
        with torch.no_grad():
            init_gpt_(m, n_layer)
    model.lm_head.weight = model.wte.weight  # to_empty replaced the tied Parameter
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)
    rec.extra["params_at_rest_on"] = next(model.parameters()).to_local().device.type

    def make_opt(fallback: bool):
        # ANCHORS: CPU AdamW fused 3.85 G params/s against foreach 0.89: fused first, foreach if it fails.
        rec.extra["optimizer"] = kind = "foreach" if fallback else "fused"
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], **{kind: True})

    try:
        train_loop(model, make_opt, ds, device, rec, contextlib.nullcontext())  # the MP policy casts, no autocast
    finally:
        dist.destroy_process_group()


def run_lightning(cfg: dict, build, ds, device, rec) -> None:
    import lightning.pytorch as pl
    import torch
    import bench_dp

    name, kwargs = cfg["variant"], cfg["strategy_kwargs"]
    for suffix, option in VARIANT_OPTIONS.items():  # the same registered strategy with one option on
        if name.endswith(suffix):
            name, kwargs = name[: -len(suffix)], {**(kwargs or {}), option: True}
    strategy = name
    if kwargs:  # the registered class and settings, the given ones on top
        from lightning.pytorch.strategies import StrategyRegistry

        entry = StrategyRegistry[name]
        strategy = entry["strategy"](**{**entry["init_params"], **kwargs})

    class Timer(bench_dp.WindowTimer):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            rec.losses.append((outputs["loss"] if isinstance(outputs, dict) else outputs).detach())
            host_step = getattr(getattr(trainer.strategy.zero, "engine", None), "host_step", None) \
                if hasattr(trainer.strategy, "zero") and trainer.strategy.zero is not None else None
            if host_step is not None and batch_idx >= rec.warmup:  # the measured window's step components
                rec.extra.setdefault("components", []).append(host_step.components())
            if batch_idx == self.last:  # before teardown, which unshards the model
                rec.t0, rec.t1 = self.t0, self.t1
                engine_info(trainer.strategy, rec)

    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy=strategy,
        precision="bf16-mixed", max_steps=rec.total, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer(rec.warmup, rec.total - rec.warmup)],
    )
    stage3 = getattr(getattr(trainer.strategy, "policy", None), "stage", None) == 3 or name.startswith("zero3")
    rec.extra["empty_init"] = stage3
    # Stage 3: on meta, each chunk materialised on the GPU by the engine with the model's own init (the GPT's
    # `_init_weights`: first loss 4.87 at `tiny`, as built eagerly; before 2026-11-26 modules' reset_parameters() gave
    # 43, and 1171 at 1.3B). Else: on the GPU, GPT init.
    with trainer.init_module(empty_init=stage3):
        torch.manual_seed(cfg["seed"])
        model = build()
    trainer.fit(bench_dp.BenchModule(model, cfg["lr"]), train_dataloaders=bench_dp.make_loader(ds))


def engine_info(strategy, rec) -> None:
    """The chunk placement (bytes on GPU / host / NVMe) and memory report of our ZeRO engine, where it has them."""
    try:
        engine = strategy.engine
        if hasattr(engine, "placement_summary"):
            rec.extra["placement"] = engine.placement_summary()
        if hasattr(strategy, "memory_report"):
            rec.extra["memory_report"] = strategy.memory_report()
    except Exception as e:  # noqa: BLE001  (no engine, or a report that fails, must not fail the run)
        rec.extra["engine_info_error"] = f"{type(e).__name__}: {e}"[:200]


def pcie_bandwidth(device) -> dict:
    """Bytes/s of one 256 MiB copy each way between pinned host memory and the device (after one warm-up copy)."""
    import torch

    host = torch.empty(2**28, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    out = {}
    for way, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        out[way] = host.numel() / (start.elapsed_time(end) / 1e3)
    return out


def overlap_bound(components: list, bandwidth: dict) -> dict:
    """The measured window's mean step components (issue 16): the device's forward and backward, the host optimizer
    step, and the bytes each way as seconds at the measured PCIe bandwidth; ``bound_s`` is the largest, the time a
    step would take were they all overlapped."""
    n = len(components)
    mean = {k: sum(c[k] for c in components) / n for k in components[0]}
    parts = {"compute_s": mean["compute_s"], "cpu_step_s": mean["cpu_step_s"],
             "h2d_s": mean["h2d_bytes"] / bandwidth["h2d"], "d2h_s": mean["d2h_bytes"] / bandwidth["d2h"]}
    return {"components": {**mean, **parts, "h2d_GBps": bandwidth["h2d"] / 1e9, "d2h_GBps": bandwidth["d2h"] / 1e9},
            "bound_s": max(parts.values()), "bound_part": max(parts, key=parts.get)}


def child(cfg: dict) -> None:
    try:  # when the host runs out of memory the kernel should kill this child, not the parent holding the results
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    sampler = HostSampler()
    sampler.start()
    sys.path.insert(0, str(HERE))
    import logging
    import resource

    import torch
    import bench_dp  # the shared harness (it also puts the repository on sys.path)
    from lightning_par.demo.model import GPT, GPTConfig

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda", 0) if cfg["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    gcfg = GPTConfig(vocab_size=cfg["vocab"], block_size=cfg["seq"], n_layer=cfg["layers"], n_head=cfg["heads"],
                     n_embd=cfg["width"])

    def build():
        model = GPT(gcfg)
        if cfg["activation_checkpointing"]:
            checkpoint_blocks(model)
        return model

    rec, res, variant = Recorder(cfg["warmup"], cfg["steps"]), {"status": "ok"}, cfg["variant"]
    t_start = time.perf_counter()
    try:
        ds = bench_dp.Batches(rec.total, cfg["batch"], cfg["seq"], cfg["vocab"], pin=device.type == "cuda",
                              seed=cfg["seed"])
        if variant == "plain":
            torch.manual_seed(cfg["seed"])
            with device:
                model = build()
            rec.extra["optimizer"] = "fused" if device.type == "cuda" else "foreach"
            train_loop(model, lambda _: bench_dp.make_optimizer(model.parameters(), cfg["lr"], device), ds, device,
                       rec, torch.autocast(device.type, torch.bfloat16))
        elif variant == "fsdp2_offload":
            with torch.device("meta"):
                model = build()
            run_fsdp2(cfg, model, ds, device, rec)
        else:
            run_lightning(cfg, build, ds, device, rec)
    except Exception as e:  # noqa: BLE001  (every failure is a result here)
        text = str(e).strip()
        msg = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]
        if len(rec.losses) >= rec.total:  # all steps ran: a failure in teardown does not undo them
            res["after_steps_error"] = msg
        else:
            oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower()
            res.update(status="oom" if oom else "error", error=msg)
    res["wall_s"] = time.perf_counter() - t_start
    components = rec.extra.pop("components", None)
    # Not timed (all zero) where the optimizer step runs in windows (chunks with state on disk, zero/spill.py).
    if components and device.type == "cuda" and any(c["compute_s"] for c in components):
        res.update(overlap_bound(components, pcie_bandwidth(device)))
    losses = [float(x) for x in rec.losses]
    res.update(rec.extra, steps_done=len(losses), loss_first=losses[0] if losses else None,
               loss_last=losses[-1] if losses else None)
    if res["status"] == "ok":
        if not all(map(math.isfinite, losses)):
            res.update(status="nonfinite", error=f"losses {losses}")
        elif rec.t0 is None or rec.t1 is None:
            res.update(status="error", error="the measured window was not reached")
        else:
            window = rec.t1 - rec.t0
            res.update(step_s=window / cfg["steps"], tokens_per_s=cfg["steps"] * cfg["batch"] * cfg["seq"] / window)
            fpt = bench_dp.flops_per_token(argparse.Namespace(**cfg), cfg["n_params"])
            res["mfu"] = res["tokens_per_s"] * fpt / bench_dp.H200_BF16_PEAK
            if res.get("bound_s"):  # the step against its largest measured component (<= 1.15: overlapped)
                res["step_over_bound"] = res["step_s"] / res["bound_s"]
    if device.type == "cuda":
        res["gpu_peak_alloc_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        res["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
    res["host_rss_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # KiB on Linux
    res["host_used_peak_gib"] = (sampler.start_bytes - sampler.low) / GiB
    print(MARK + json.dumps(res, default=str), flush=True)


# =============================================================================================== parent process


def run_child(cfg: dict, timeout: float, log: Optional[Path] = None) -> dict:
    """One variant at one size in a process of its own; a child that failed leaves its whole output in ``log``
    (with its host memory every 5 s)."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    t0 = time.perf_counter()
    # A session of its own: on a timeout its whole process group is killed, helpers included.
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(cfg)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def stop(signum, frame):  # an outer `timeout` or Ctrl-C: the child's own session would outlive this process
        os.killpg(p.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        timed_out = True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    tail = " | ".join([line for line in err.strip().splitlines() if not line.startswith(MEMORY)][-3:])[-400:]
    if lines:  # a result printed before a crash at exit stands
        res = json.loads(lines[-1][len(MARK):])
    elif timed_out:
        res = {"status": "timeout", "error": f"no result after {timeout:.0f} s"}
    elif p.returncode < 0:  # the kernel's OOM killer sends SIGKILL
        res = {"status": "killed", "error": f"{signal.Signals(-p.returncode).name} (host memory?) {tail}"}
    else:
        res = {"status": "error", "error": f"exit {p.returncode}: {tail}"}
    res["child_wall_s"] = time.perf_counter() - t0
    if log is not None and res.get("status") != "ok":  # (a killed child's placement and memory lines are in it)
        log.write_text(f"--- stdout\n{out}\n--- stderr\n{err}")
        res["output_log"] = str(log)
    return res


class Output:
    """The result file, rewritten after every child so that a run cut short keeps what it measured."""

    def __init__(self, args: argparse.Namespace, sub: str) -> None:
        import lightning
        import torch

        with open("/proc/meminfo") as f:
            host = int(f.readline().split()[1]) * 1024  # MemTotal
        name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"  # no CUDA context is created
        self.machine = {"device_name": name, "cpu_count": os.cpu_count(), "host_memory_gib": host / GiB,
                        "torch": torch.__version__, "lightning": lightning.__version__}
        slug = name.lower().replace("nvidia", "").strip().replace(" ", "-") or "gpu"
        date = datetime.now().strftime("%Y-%m-%d")
        out_dir = Path(args.out_dir or os.environ.get("OUT") or HERE / "results")
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"bench_offload_{sub}_{slug}_{date}" + (f"_{args.tag}" if args.tag else "")
        self.path, n = out_dir / f"{stem}.json", 1
        while self.path.exists():  # never overwrite an earlier run
            n += 1
            self.path = out_dir / f"{stem}_{n}.json"
        self.data = {"benchmark": "bench_offload", "subcommand": sub, "date": date, "machine": self.machine,
                     "command": shlex.join([sys.executable, *sys.argv]), "config": vars(args)}
        self.deadline = time.monotonic() + args.budget if args.budget else None
        print(f"{self.machine}\n{self.data['command']}\nresults: {self.path}", flush=True)

    def run(self, args: argparse.Namespace, size: str, variant: str) -> dict:
        kwargs = dict(pair.split("=", 1) for pair in args.strategy_kwargs)
        cfg = {**size_info(size, args.batch), "variant": variant, "device": args.device, "steps": args.steps,
               "warmup": args.warmup, "lr": args.lr, "seed": args.seed,
               "activation_checkpointing": args.activation_checkpointing,
               "strategy_kwargs": json.loads(kwargs[variant]) if variant in kwargs else None}
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left < 30:
            res = {"status": "skipped", "error": "--budget spent"}
        else:
            log = self.path.with_name(f"{self.path.stem}.{size}_{variant}.output.log")
            res = run_child(cfg, args.timeout if left is None else min(args.timeout, left), log)
            if res["status"] == "timeout" and left is not None and left < args.timeout:
                res["status"] = "budget"  # cut by --budget, not a failure of the variant
        r = {"size": size, "variant": variant, "n_params": cfg["n_params"], "batch": cfg["batch"], **res}
        print(row(r), flush=True)
        return r

    def write(self, **fields) -> None:
        self.data.update(fields, time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def human(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


HEAD = (f"{'size':>6} {'variant':<15} {'status':<9} {'tok/s':>9} {'step s':>8} {'GPU al':>7} {'GPU rs':>7} "
        f"{'RSS':>7} {'hostuse':>7} loss first->last   (memory in GiB; al/rs: allocated/reserved peak)")


def row(r: dict) -> str:
    g = r.get
    return (f"{r['size']:>6} {r['variant']:<15} {r['status']:<9} {fmt(g('tokens_per_s'), ',.0f'):>9} "
            f"{fmt(g('step_s'), '.3f'):>8} {fmt(g('gpu_peak_alloc_gib')):>7} {fmt(g('gpu_peak_reserved_gib')):>7} "
            f"{fmt(g('host_rss_peak_gib')):>7} {fmt(g('host_used_peak_gib')):>7} "
            f"{fmt(g('loss_first'), '.3f'):>6}->{fmt(g('loss_last'), '.3f'):<6} {g('error') or ''}"
            + (components_line(r) if g("components") else ""))


def components_line(r: dict) -> str:
    c = r["components"]
    idle = f", {c['cpu_idle_s']:.3f} s of it waiting for the device" if "cpu_idle_s" in c else ""
    return (f"\n{'':>6} components: device {c['compute_s']:.3f} s, host step {c['cpu_step_s']:.3f} s{idle} (the "
            f"step waited {c['wait_s']:.3f} s for it), H2D {c['h2d_bytes'] / 1e9:.2f} GB = {c['h2d_s']:.3f} s at "
            f"{c['h2d_GBps']:.0f} GB/s, D2H {c['d2h_bytes'] / 1e9:.2f} GB = {c['d2h_s']:.3f} s at "
            f"{c['d2h_GBps']:.0f} GB/s; step / largest ({r['bound_part']}) = {fmt(r.get('step_over_bound'), '.2f')}")


def split(s: str) -> list:
    return [x.strip() for x in s.split(",") if x.strip()]


def print_sizes(names) -> None:
    for n in names:
        i = size_info(n)
        print(f"  {n:>5}: {i['layers']:>2} x {i['width']:>4}, {i['heads']:>2} heads, batch {i['batch']}, seq "
              f"{i['seq']}, vocab {i['vocab']}: {human(i['n_params'])} params ({i['n_params']:,})", flush=True)


def median_tokens(runs: list, size: str) -> dict:
    """Each variant's median tokens/s over its ok runs of ``size`` (one per round)."""
    by_variant: dict = {}
    for r in runs:
        if r["size"] == size and r["status"] == "ok":
            by_variant.setdefault(r["variant"], []).append(r["tokens_per_s"])
    return {v: statistics.median(xs) for v, xs in by_variant.items()}


def cmd_throughput(args: argparse.Namespace) -> None:
    """Each size's variants in order; with ``--rounds N``, N times, every other round in reverse order, so that a
    drift of the machine (lent machines differ, and one drifts between runs) falls on every variant alike. Ratios
    are of the variants' medians over the rounds."""
    output, runs, variants = Output(args, "throughput"), [], split(args.strategies)
    print_sizes(split(args.sizes))
    print(HEAD, flush=True)
    for size in split(args.sizes):
        for round_ in range(args.rounds):
            for v in variants if round_ % 2 == 0 else variants[::-1]:
                runs.append({**output.run(args, size, v), "round": round_ + 1})
                medians = median_tokens(runs, size)
                ref = next((x for x in variants if x in medians), None)  # the first variant of this size that ran
                for r in runs:
                    if r["size"] == size and r["status"] == "ok":
                        r.update(reference=ref, ratio_to_ref=medians[r["variant"]] / medians[ref])
                        if "fsdp2_offload" in medians:
                            r["ratio_to_fsdp2"] = medians[r["variant"]] / medians["fsdp2_offload"]
                output.write(runs=runs)
    print(f"\n{'size':>6} {'variant':<15} {'tok/s':>9} {'range':>17} {'MFU':>6} {'vs ref':>7} {'vs fsdp2':>8}"
          + ("  (median of the rounds)" if args.rounds > 1 else ""))
    for size in split(args.sizes):
        medians = median_tokens(runs, size)
        for v in variants:
            mine = [r for r in runs if r["size"] == size and r["variant"] == v and r["status"] == "ok"]
            if not mine:
                continue
            low, high = min(r["tokens_per_s"] for r in mine), max(r["tokens_per_s"] for r in mine)
            r = mine[0]
            print(f"{size:>6} {v:<15} {medians[v]:>9,.0f} {f'{low:,.0f}-{high:,.0f}':>17} "
                  f"{r['mfu'] * medians[v] / r['tokens_per_s']:>6.1%} {fmt(r.get('ratio_to_ref'), '.3f'):>7} "
                  f"{fmt(r.get('ratio_to_fsdp2'), '.3f'):>8}  (ref {r['reference']}, {len(mine)} run(s))")
    print(f"\nwrote {output.path}")


def cmd_largest(args: argparse.Namespace) -> None:
    output, ladders = Output(args, "largest"), {}
    print_sizes(split(args.ladder))
    print(HEAD, flush=True)
    for v in split(args.strategies):
        lad = ladders[v] = {"attempts": [], "largest": None, "largest_params": None, "next_failure": None}
        for size in split(args.ladder):  # up the ladder until the first size that does not train
            r = output.run(args, size, v)
            lad["attempts"].append(r)
            if r["status"] == "ok":
                lad.update(largest=size, largest_params=r["n_params"])
            else:
                lad["next_failure"] = {"size": size, "status": r["status"], "reason": r.get("error")}
            output.write(ladders=ladders)
            if r["status"] != "ok":
                break
    print(f"\n{'strategy':<16} {'largest':>8} {'params':>8}  next size: failure")
    for v, lad in ladders.items():
        nf = lad["next_failure"] or {}
        print(f"{v:<16} {lad['largest'] or '-':>8} {human(lad['largest_params']):>8}  "
              f"{nf.get('size', '(none failed)')}: {nf.get('status', '')} {nf.get('reason') or ''}")
    print(f"\nwrote {output.path}")


# ========================================================================================================= plot


def cmd_plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, ladders = [], {}
    for path in args.results:  # either kind of result, in any mix
        data = json.loads(Path(path).read_text())
        runs += data.get("runs", [])
        ladders.update(data.get("ladders", {}))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    ok = {(r["size"], r["variant"]): r["tokens_per_s"] for r in runs if r["status"] == "ok"}
    status = {(r["size"], r["variant"]): r["status"] for r in runs}
    sizes, variants = list(dict.fromkeys(k[0] for k in status)), list(dict.fromkeys(k[1] for k in status))
    width = 0.8 / max(1, len(variants))
    for j, v in enumerate(variants):  # grouped bars: one group per size, ours plain, the peers hatched
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(sizes))]
        ys = [ok.get((s, v), 0) for s in sizes]
        kind = "ours" if v not in PEERS else "peer" if v.startswith("fsdp2") else "no offload"
        bars = left.bar(xs, ys, width, label=f"{v} ({kind})", hatch="//" if v in PEERS else None)
        for b, s, y in zip(bars, sizes, ys):
            left.annotate(f"{y:,.0f}" if y else status.get((s, v), "n/a"), (b.get_x() + b.get_width() / 2, max(y, 1)),
                          ha="center", va="bottom", fontsize=7)
    if ok and max(ok.values()) / min(ok.values()) > 30:
        left.set_yscale("log")
    left.set_xticks(range(len(sizes)), sizes)
    left.set_ylabel("tokens/s (1 GPU)")
    left.set_title("Throughput" if runs else "Throughput (no data)")
    if variants:
        left.legend(fontsize=8)
    names = list(ladders)
    vals = [(ladders[n]["largest_params"] or 0) / 1e9 for n in names]
    bars = right.bar(names, vals, color=["C7" if n in PEERS else "C0" for n in names])
    for b, n, y in zip(bars, names, vals):
        nf = ladders[n].get("next_failure") or {}
        label = f"{ladders[n]['largest'] or 'none'}" + (f"\n{nf['size']}: {nf['status']}" if nf else "")
        right.annotate(label, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, 1.15 * max(vals, default=1))  # room for the labels above the bars
    right.set_ylabel("largest model trained (billions of parameters)")
    right.set_title("Largest trainable model" if names else "Largest trainable model (no data)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


# ========================================================================================================= main


def main(argv: list | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if there is one")
    add("--batch", type=int, default=None, help="override the sizes' batch (largest: 1)")
    add("--lr", type=float, default=1e-4)
    add("--seed", type=int, default=0)
    add("--timeout", type=float, default=1200, help="seconds per child")
    add("--budget", type=float, default=None, help="seconds for the whole run (no child starts with < 30 s left)")
    add("--strategy-kwargs", action="append", default=[], metavar="NAME=JSON",
        help="settings for a registered strategy, e.g. 'zero3_nvme={\"nvme_dir\": \"/tmp/x\"}'")
    add("--activation-checkpointing", action="store_true", help="checkpoint every GPT block (non-reentrant)")
    add("--out-dir", default=None, help="default: $OUT if set, else benchmarks/results")
    add("--tag", default="", help="suffix of the result file name")
    for cmd, sizes, strategies, steps, warmup in (
        ("throughput", ("--sizes", "1.3B,7.5B"), "zero3,zero3_offload,fsdp2_offload", 10, 2),
        ("largest", ("--ladder", "7.5B,10B,12B,15B,17B,20B,22B"), "zero3_offload,fsdp2_offload", 3, 1),
    ):
        c = sub.add_parser(cmd, parents=[common])
        c.add_argument(sizes[0], default=sizes[1])
        c.add_argument("--strategies", default=strategies)
        c.add_argument("--steps", type=int, default=steps, help="measured steps")
        c.add_argument("--warmup", type=int, default=warmup)
        if cmd == "throughput":
            c.add_argument("--rounds", type=int, default=1,
                           help="run the variants N times, every other round in reverse order; ratios of medians")
    pp = sub.add_parser("plot")
    pp.add_argument("results", nargs="+")
    pp.add_argument("--out", default="docs/img/offload.png")
    sub.add_parser("sizes")
    args = p.parse_args(argv)
    if args.cmd in ("plot", "sizes"):  # neither needs torch
        return cmd_plot(args) if args.cmd == "plot" else print_sizes(SIZES)
    if args.cmd == "largest" and args.batch is None:
        args.batch = 1  # the ladder is about memory, not speed: the smallest batch
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    (cmd_throughput if args.cmd == "throughput" else cmd_largest)(args)


if __name__ == "__main__":
    main()
