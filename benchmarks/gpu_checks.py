"""Correctness on a GPU (NCCL, CUDA tensors): ZeRO stages and offload against dp under bf16-mixed and 16-mixed.

    python benchmarks/gpu_checks.py [PRECISION ...]   # default: bf16-mixed 16-mixed; 32-true also works

Trains the demo GPT (small) for a few steps per strategy and precision at world size 1 and prints each run's losses
and its largest relative gap to dp's under the same precision. Not a timing: a check that the GPU code paths run
(fp16 loss scaling with the sharded scaler, bf16 compute with fp32 masters) and agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402

import lightning_par  # noqa: E402,F401
from lightning_par.demo.model import DemoGPT  # noqa: E402
from lightning_par.strategies.zero import ZeroStrategy  # noqa: E402

# Offload variants: pinned host chunks, copies on their own streams, fused CPU AdamW for the host part. Small chunks
# (the model has ~3.5M parameters) so that a fraction really splits it.
OFFLOAD = {
    "zero3_offload": lambda: "zero3_offload",  # "auto": this small model stays on the GPU
    "zero3 half on host": lambda: ZeroStrategy(stage=3, chunk_size=2**18, offload=0.5),
    "zero3 all on host": lambda: ZeroStrategy(stage=3, chunk_size=2**18, offload=1.0),
    "zero2 all on host": lambda: ZeroStrategy(stage=2, chunk_size=2**18, offload=1.0),
}


class Recording(DemoGPT):
    def __init__(self) -> None:
        super().__init__(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256, learning_rate=3e-4)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.losses.append(loss.item())
        return loss


def run(strategy: Any, precision: str, steps: int = 30) -> tuple[list[float], float]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (steps * 16, 1), generator=g)
    tokens = (start + torch.arange(129)) % 256  # learnable sequences
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=16)
    module = Recording()
    trainer = pl.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, loader)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return module.losses, (scaler.get_scale() if scaler is not None else float("nan"))


def main() -> None:
    # 32-true: the host chunks' fused CPU AdamW against dp's on the GPU, no rounding to hide a stale parameter read
    for precision in sys.argv[1:] or ("bf16-mixed", "16-mixed"):
        reference, _ = run("dp", precision)
        print(f"{precision:>10} dp     first {reference[0]:.4f} last {reference[-1]:.4f}")
        zero3 = None
        for label, make in [(name, lambda name=name: name) for name in ("zero1", "zero2", "zero3", "zero2_offload")] + \
                list(OFFLOAD.items()):
            losses, scale = run(make(), precision)
            gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            zero3 = losses if label == "zero3" else zero3
            to_zero3 = max(abs(a - b) / abs(b) for a, b in zip(losses, zero3)) if zero3 else float("nan")
            print(f"{precision:>10} {label:<18} first {losses[0]:.4f} last {losses[-1]:.4f} "
                  f"max rel. gap to dp {gap:.2e} to zero3 {to_zero3:.2e} loss scale {scale}")


if __name__ == "__main__":
    main()
