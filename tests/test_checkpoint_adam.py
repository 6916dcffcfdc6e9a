"""AdamW's state through the one checkpoint path, saved while fit runs (the module sharded or split): a resumed run
continues the uninterrupted one exactly, for a tensor-parallel shard (``tp1d``), a pipeline stage and ZeRO pieces
of tensor shards (``hybrid`` tensor 2 with ZeRO-2). Its 0-d ``step`` must come back where torch keeps it (the host)
and its moments must land in the right boxes; SGD's momentum alone (the other tests) would not catch a wrong step."""

from __future__ import annotations

import os

import lightning.pytorch as pl

from helpers import free_port, run_on_ranks
from lightning_par import HybridParallelStrategy, PipelineStrategy, TensorParallel1DStrategy
from parity import BatchLossGPT, Run, fit, relative_gap
from test_dp import _as_external_rank

WORLD = 2
RUN = Run(steps=3, per_rank_batch=4, module_kwargs={"n_layer": 4, "optimizer": "adamw", "learning_rate": 1e-2})
STRATEGIES = {
    "tp1d": lambda: TensorParallel1DStrategy(tensor_size=2),
    "pipeline": lambda: PipelineStrategy(microbatches=2),
    "hybrid_t2_zero2": lambda: HybridParallelStrategy(tensor_size=2, zero_stage=2),
}


class _SaveAtEpochEnd(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)  # while fit runs: shards, stages and ZeRO pieces as they train


def _train(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {}
    for name, make in STRATEGIES.items():
        path = os.path.join(tmpdir, f"{name}.ckpt")
        out[f"{name}_uninterrupted"] = fit(RUN, make(), world, 1, module_class=BatchLossGPT, max_epochs=2)
        out[f"{name}_first"] = fit(RUN, make(), world, 1, module_class=BatchLossGPT, max_epochs=1,
                                   callbacks=[_SaveAtEpochEnd(path)])
        out[f"{name}_is_dir"] = os.path.isdir(path)
        out[f"{name}_resumed"] = fit(RUN, make(), world, 1, module_class=BatchLossGPT, max_epochs=2, ckpt_path=path)
    return out


def test_adamw_state_resumes_exactly(tmp_path):
    per_rank = run_on_ranks(_train, WORLD, free_port(), str(tmp_path))
    for name in STRATEGIES:
        r = per_rank[-1]  # the last rank holds the loss under a pipeline; the others replicate it
        assert r[f"{name}_is_dir"], name
        uninterrupted, chained = r[f"{name}_uninterrupted"], r[f"{name}_first"] + r[f"{name}_resumed"]
        assert len(uninterrupted) == 2 * RUN.steps and len(chained) == len(uninterrupted), (name, chained)
        assert relative_gap(chained, uninterrupted) <= 1e-6, (name, chained, uninterrupted)
