"""What ``on_after_backward`` sees: the gradients the optimizer will step with, as under Lightning's ``ddp`` (whose
reducer finishes inside backward). Our strategies finish their gradient communication in ``post_backward``; the
base strategy runs it before Lightning's ``on_after_backward`` hooks, so a callback that inspects or logs the
gradients there (a common place for NaN checks and gradient norms) reads averaged, complete gradients, not buckets
still on the wire (``dp``), weight gradients still deferred (``tp1d``) or tied weights' gradients not yet summed over
the stages (pipelines)."""

from __future__ import annotations

import os

import torch
from lightning.pytorch.callbacks import Callback

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import free_port, run_on_ranks
from parity import Run, fit


class GradientsAtBothHooks(Callback):
    """Records every gradient in ``on_after_backward`` and compares with ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self.after_backward: dict[str, torch.Tensor] = {}
        self.mismatches: list[str] = []
        self.compared = 0

    def on_after_backward(self, trainer, pl_module) -> None:
        self.after_backward = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                               if p.grad is not None}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for n, p in pl_module.named_parameters():
            if p.grad is None:
                continue
            self.compared += 1
            seen = self.after_backward.get(n)
            if seen is None or not torch.equal(seen, p.grad):
                self.mismatches.append(n)


def _train(rank: int, world_size: int, port: int) -> dict:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    out = {}
    for strategy in ("dp", "tp1d", "pipeline"):
        callback = GradientsAtBothHooks()
        fit(Run(steps=3), strategy, devices=world_size, data_parallel=world_size if strategy == "dp" else 1,
            callbacks=[callback])
        out[strategy] = (callback.compared, sorted(set(callback.mismatches)))
    return out


def test_on_after_backward_sees_the_final_gradients():
    for per_rank in run_on_ranks(_train, 2, free_port()):
        for strategy, (compared, mismatches) in per_rank.items():
            assert compared > 0, strategy
            assert mismatches == [], (strategy, mismatches)
