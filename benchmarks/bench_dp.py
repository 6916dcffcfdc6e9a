"""Tokens/s of a GPT under Lightning strategies against a plain PyTorch loop, in one process on one device.

    python benchmarks/bench_dp.py                                   # ~1.3B GPT on one GPU, strategies dp,auto
    python benchmarks/bench_dp.py --device cpu --layers 2 --width 64 --heads 2 --vocab 128 --seq 64 --batch 4 \
        --steps 5 --strategies auto,dp                              # smoke test

Every variant trains the same model (same seed, built directly on the device) on the same pre-generated random
token batches, delivered by the same DataLoader, so only the training loop differs. Needs torch + lightning only
(no jsonargparse).

Expect every Lightning variant to peak higher than plain by about the size of the fp32 gradients: Lightning's
automatic optimization zeroes gradients inside its closure, after the forward, so the previous step's gradients are
still alive during the forward (measured: 39.5 vs 35.4 GiB for the 1.3B model; the same loop order in plain PyTorch
gives the same 39.5).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

import lightning.pytorch as pl  # noqa: E402

import lightning_par  # noqa: E402,F401  (registers "dp" and friends)
from lightning_par.demo.model import GPT, GPTConfig  # noqa: E402

H200_BF16_PEAK = 791e12  # dense bf16 FLOP/s, as used for MFU


def parse_args(argv: list[str] | None = None, description: str = __doc__,
               default_strategies: str = "dp,auto") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="rounds over all variants, in alternating order")
    p.add_argument("--strategies", default=default_strategies, help="comma-separated Lightning strategy names")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-flops", type=float, default=H200_BF16_PEAK)
    return p.parse_args(argv)


class Batches(Dataset):
    """Pre-generated (x, y) batches; with ``batch_size=None`` the DataLoader hands them out as they are."""

    def __init__(self, n: int, batch: int, seq: int, vocab: int, pin: bool, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (n, batch, seq + 1), generator=g)
        # Inputs and targets stored apart and contiguous: a non-contiguous view of pinned memory is made contiguous
        # in pageable memory before its copy to the GPU, which synchronises the host (seen as 2 syncs a step).
        self.x, self.y = tokens[:, :, :-1].contiguous(), tokens[:, :, 1:].contiguous()
        if pin:
            self.x, self.y = self.x.pin_memory(), self.y.pin_memory()

    def __len__(self) -> int:
        return self.x.size(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def make_loader(ds: Batches) -> DataLoader:
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=0)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")


def config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.width
    )


def build_model(args: argparse.Namespace, device: torch.device) -> GPT:
    torch.manual_seed(args.seed)
    with device:  # initialise on the device: a 1.3B init on the host would take longer than the benchmark
        return GPT(config(args))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- plain PyTorch


def run_plain(args: argparse.Namespace, device: torch.device, ds: Batches) -> float:
    model = build_model(args, device)
    opt = make_optimizer(model.parameters(), args.lr, device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    model.train()
    t0 = 0.0
    for i, (x, y) in enumerate(make_loader(ds)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if i == args.warmup:  # after the transfer, like Lightning's on_train_batch_start
            sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    t1 = time.perf_counter()
    del model, opt
    return t1 - t0


# --------------------------------------------------------------------------------------------------- Lightning


class BenchModule(pl.LightningModule):
    def __init__(self, model: GPT, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return lm_loss(self.model, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.lr, self.device)


class WindowTimer(pl.Callback):
    """Wall time from the start of the first measured batch to the end of the last one."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.first, self.last = warmup, warmup + steps - 1
        self.t0 = self.t1 = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.first:
            sync(pl_module.device)
            self.t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.last:
            sync(pl_module.device)
            self.t1 = time.perf_counter()


def run_lightning(args: argparse.Namespace, device: torch.device, ds: Batches, strategy: Any) -> float:
    module = BenchModule(build_model(args, device), args.lr)
    timer = WindowTimer(args.warmup, args.steps)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.warmup + args.steps,
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=make_loader(ds))
    if timer.t0 is None or timer.t1 is None:
        raise RuntimeError(f"strategy {strategy!r}: the measured window was not reached")
    del trainer, module
    return timer.t1 - timer.t0


# ------------------------------------------------------------------------------------------------------ driver


def flops_per_token(args: argparse.Namespace, n_params: int) -> float:
    # 6N for the dense matmuls (forward + backward) plus the attention score/value products.
    return 6 * n_params + 12 * args.layers * args.width * args.seq


def fmt_gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None, *, benchmark: str = "bench_dp", description: str = __doc__,
         default_strategies: str = "dp,auto", factories: dict[str, Callable[[], Any]] | None = None) -> dict:
    """Run the benchmark. ``factories`` maps variant names that are not registered strategy names (a strategy with
    arguments) to a function building the strategy; other names go to the Trainer as they are."""
    args = parse_args(argv, description, default_strategies)
    factories = factories or {}
    # An explicit index: torch.cuda.set_device and the memory counters reject a bare "cuda".
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    for name in ("lightning.pytorch", "lightning.fabric"):  # Trainer banners would bury the per-run lines
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_float32_matmul_precision("high")  # identical for every variant; silences Lightning's tensor-core hint
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    variants = ["plain"] + [f"lightning:{s}" for s in strategies]

    ds = Batches(args.warmup + args.steps, args.batch, args.seq, args.vocab, pin=device.type == "cuda", seed=args.seed)
    with torch.device("meta"):
        n_params = GPT(config(args)).num_params()  # tied embedding counted once
    fpt = flops_per_token(args, n_params)
    tokens = args.steps * args.batch * args.seq
    print(
        f"GPT {n_params / 1e9:.3f}B params ({args.layers}x{args.width}, {args.heads} heads, vocab {args.vocab}), "
        f"batch {args.batch} x seq {args.seq}, {args.warmup} warm-up + {args.steps} measured steps, "
        f"{args.precision}, device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        flush=True,
    )

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            free(device)
            if v == "plain":
                seconds = run_plain(args, device, ds)
            else:
                name = v.split(":", 1)[1]
                seconds = run_lightning(args, device, ds, factories[name]() if name in factories else name)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            tps = tokens / seconds
            runs[v].append({"seconds": seconds, "tokens_per_s": tps, "peak_gib": peak})
            print(f"  round {r + 1} {v:<20} {tps:>12,.0f} tok/s  {seconds:8.3f} s  peak {fmt_gib(peak)} GiB", flush=True)
            free(device)

    summary = {}
    plain_tps = statistics.median(x["tokens_per_s"] for x in runs["plain"])
    for v in variants:
        tps = statistics.median(x["tokens_per_s"] for x in runs[v])
        summary[v] = {
            "tokens_per_s": tps,
            "ratio_to_plain": tps / plain_tps,
            "mfu": tps * fpt / args.peak_flops,
            "peak_gib": None if device.type != "cuda" else max(x["peak_gib"] for x in runs[v]),
            "runs": runs[v],
        }

    print(f"\n{'variant':<22}{'tokens/s':>14}{'vs plain':>10}{'MFU':>8}{'peak GiB':>10}")
    for v, s in summary.items():
        print(f"{v:<22}{s['tokens_per_s']:>14,.0f}{s['ratio_to_plain']:>10.3f}{s['mfu']:>8.1%}{fmt_gib(s['peak_gib']):>10}")

    result = {
        "benchmark": benchmark,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": vars(args),
        "n_params": n_params,
        "flops_per_token": fpt,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "summary": summary,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
