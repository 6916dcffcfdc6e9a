"""Checkpoints cross strategies and world sizes: save under one, resume under another, and the run continues as one
process continues it (fp32, SGD). zero3@4 -> tp1d@2 -> pipeline@2, and pipeline@4 -> zero2_offload@2 (hybrid@8 <->
one process is in test_hybrid.py). Every checkpoint also becomes one plain state dict (lightning-par-consolidate's
path) that a fresh module loads strictly.

The global batch is 8 samples under every strategy (per-rank batch 8 / data-parallel size), so that the runs differ
only in how the samples are dealt: the single-process reference follows, epoch by epoch, the order of the strategy
that trained that epoch (``GlobalBatchOrder`` for its data-parallel size), resuming its own checkpoints in between.
"""

from __future__ import annotations

import os

import torch

from helpers import free_port, run_on_ranks
from lightning_par import PipelineStrategy, TensorParallel1DStrategy, ZeroStrategy
from lightning_par.checkpoint import load_any
from parity import BatchLossGPT, Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

TOL = 1e-5
GLOBAL_BATCH = 8
MODULE = {"n_layer": 4}


def _run(data: int) -> Run:
    return Run(steps=3, per_rank_batch=GLOBAL_BATCH // data, module_kwargs=MODULE)


# name -> (strategy factory, world size, data-parallel size)
LEGS = {
    "zero3@4": (lambda: "zero3", 4, 4),
    "pipeline@4": (lambda: PipelineStrategy(microbatches=4), 4, 1),
    "tp1d@2": (lambda: TensorParallel1DStrategy(tensor_size=2), 2, 1),
    "pipeline@2": (lambda: PipelineStrategy(microbatches=4), 2, 1),
    "zero2_offload@2": (lambda: ZeroStrategy(stage=2, offload=1.0), 2, 2),
}
# leg -> (the checkpoint it resumes, the epochs it ends at); a leg without a source trains the first epoch
CHAINS = {
    "zero3@4": (None, 1), "tp1d@2": ("zero3@4", 2), "pipeline@2": ("tp1d@2", 3),
    "pipeline@4": (None, 1), "zero2_offload@2": ("pipeline@4", 2),
}


def _path(tmpdir: str, leg: str) -> str:
    return os.path.join(tmpdir, leg.replace("@", "_") + ".ckpt")


def _train(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {}
    for leg, (make, leg_world, data) in LEGS.items():  # in order: every source leg runs before its resumer
        if leg_world != world:
            continue
        source, epochs = CHAINS[leg]
        out[leg] = fit(_run(data), make(), world, data, module_class=BatchLossGPT, max_epochs=epochs,
                       ckpt_path=_path(tmpdir, source) if source else None, save_to=_path(tmpdir, leg))
    return out


def _reference_chain(tmpdir: str, last: str) -> list[float]:
    """One process through the chain ending at ``last``: each epoch in the order of the strategy that trained it."""
    legs = [last]
    while CHAINS[legs[0]][0] is not None:
        legs.insert(0, CHAINS[legs[0]][0])
    path, losses = None, []
    for leg in legs:
        data, epochs = LEGS[leg][2], CHAINS[leg][1]
        save = os.path.join(tmpdir, f"reference_{leg.replace('@', '_')}.ckpt")
        losses = fit(_run(data), "auto", 1, data, module_class=BatchLossGPT, max_epochs=epochs, ckpt_path=path,
                     save_to=save)
        path = save
    return losses  # the last leg's epoch


def test_checkpoints_cross_strategies_and_world_sizes(tmp_path):
    per_rank = {4: run_on_ranks(_train, 4, free_port(), str(tmp_path))}
    per_rank[2] = run_on_ranks(_train, 2, free_port(), str(tmp_path))
    for leg, (_, world, data) in LEGS.items():
        ranks = [0] if data == 1 else list(range(data))  # one rank per replica: every rank reports its replica's
        ours = global_losses([r[leg] for r in per_rank[world]], data, ranks=ranks)
        reference = _reference_chain(str(tmp_path), leg)
        assert len(ours) == _run(data).steps, (leg, ours)
        assert relative_gap(ours, reference) <= TOL, (leg, ours, reference)
        # consolidation: one plain state dict, loaded strictly by a fresh module
        state = load_any(_path(str(tmp_path), leg))["state_dict"]
        fresh = BatchLossGPT(**MODULE)
        fresh.load_state_dict(state, strict=True)
        assert all(torch.equal(a, state[n]) for n, a in fresh.state_dict().items())

