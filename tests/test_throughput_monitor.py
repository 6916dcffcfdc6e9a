"""lightning_par.callbacks.ThroughputMonitor counts the tokens of the data-parallel replicas (not of every rank:
tensor ranks read the same batch) and logs every rank's peak memory, under dp and tp1d on 2 CPU ranks."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from helpers import error_message, free_port, run_on_ranks
from lightning_par.callbacks import ThroughputMonitor, _first_tensor_numel
from parity import BatchLossGPT, token_dataset
from test_dp import _as_external_rank

STEPS, BATCH, SEQ = 4, 4, 16


def _train(rank: int, world: int, port: int) -> dict:
    _as_external_rank(rank, world, port)
    out = {}
    for name in ("dp", "tp1d"):
        seed_everything(0, verbose=False)
        monitor = ThroughputMonitor()
        trainer = Trainer(accelerator="cpu", devices=world, strategy=name, max_steps=STEPS, log_every_n_steps=2,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[monitor])
        trainer.fit(BatchLossGPT(), DataLoader(token_dataset(64, seq=SEQ), batch_size=BATCH))
        out[name] = monitor.last
    return out


def test_tokens_count_the_replicas_and_every_rank_reports_its_peak():
    results = run_on_ranks(_train, 2, free_port())
    for name, replicas in (("dp", 2), ("tp1d", 1)):
        for last in (r[name] for r in results):
            assert last["throughput/tokens"] == STEPS * BATCH * SEQ * replicas, (name, last)
            assert last["throughput/tokens_per_sec"] > 0
            assert last["throughput/tokens_per_sec_per_gpu"] == pytest.approx(last["throughput/tokens_per_sec"] / 2)
            assert last["memory/peak_gib_rank0"] > 0 and last["memory/peak_gib_rank1"] > 0
            assert "throughput/mfu" not in last  # no known peak FLOPs on a CPU


def test_batches_without_a_tensor_need_a_tokens_fn():
    assert _first_tensor_numel({"ids": [__import__("torch").zeros(2, 8)]}) == 16
    assert "tokens_fn" in error_message(lambda: _first_tensor_numel(["text"]))
