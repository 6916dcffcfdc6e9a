"""Correctness on a GPU (NCCL, CUDA tensors): ZeRO stages against dp under bf16-mixed and 16-mixed.

    python benchmarks/gpu_checks.py

Trains the demo GPT (small) for a few steps per strategy and precision at world size 1 and prints each run's losses
and its largest relative gap to dp's under the same precision. Not a timing: a check that the GPU code paths run
(fp16 loss scaling with the sharded scaler, bf16 compute with fp32 masters) and agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning.pytorch as pl  # noqa: E402

import lightning_par  # noqa: E402,F401
from lightning_par.demo.model import DemoGPT  # noqa: E402


class Recording(DemoGPT):
    def __init__(self) -> None:
        super().__init__(vocab_size=256, block_size=128, n_layer=4, n_head=4, n_embd=256, learning_rate=3e-4)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.losses.append(loss.item())
        return loss


def run(strategy: str, precision: str, steps: int = 30) -> tuple[list[float], float]:
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
    for precision in ("bf16-mixed", "16-mixed"):
        reference, _ = run("dp", precision)
        print(f"{precision:>10} dp     first {reference[0]:.4f} last {reference[-1]:.4f}")
        for strategy in ("zero1", "zero2", "zero3", "zero2_offload"):
            losses, scale = run(strategy, precision)
            gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            print(f"{precision:>10} {strategy:<6} first {losses[0]:.4f} last {losses[-1]:.4f} "
                  f"max rel. gap to dp {gap:.2e} loss scale {scale}")


if __name__ == "__main__":
    main()
