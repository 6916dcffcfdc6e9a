"""`hybrid` on 8 gloo CPU ranks: data x pipeline x tensor (also with ZeRO-1), pipeline x tensor, and data x tensor with
ZeRO-1, ZeRO-2 (also offloaded) and ZeRO-3, each matching one process step by step (fp32, SGD, clipping by the global
norm over every axis); its checkpoints resume under hybrid, load in one process, and one process's load under it.
One launch trains every configuration in a row (see test_dp.py)."""

from __future__ import annotations

import os

import pytest

from helpers import error_message, free_port, run_on_ranks
from lightning_par import HybridParallelStrategy
from lightning_par.checkpoint import consolidate
from parity import BatchLossGPT, Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

WORLD = 8
TOL = 1e-5


class HeldGPT(BatchLossGPT):
    """Also records what this rank holds when training starts."""

    def on_train_start(self):
        # What this rank holds once every axis has cut the module: parameter elements, or ZeRO's master shards.
        zero = self.trainer.strategy.zero
        engine = zero.engine if zero is not None else None
        held = sum(c.master.numel() for c in engine.chunks) if engine is not None else sum(
            p.numel() for p in self.parameters())
        self.held = held


def _configs() -> dict[str, tuple[dict, Run]]:
    """name -> (strategy arguments, run). The demo GPT's auto plan has a sequence-parallel region: every tensor
    configuration runs with sequence parallelism (its replicated gradients summed over the tensor group)."""
    clip = dict(clip_val=0.05, steps=6)
    return {
        "d2_p2_t2": (dict(pipeline_size=2, tensor_size=2, microbatches=2), Run(**clip, module_kwargs={"n_layer": 4})),
        "d2_p2_t2_zero1": (dict(pipeline_size=2, tensor_size=2, microbatches=2, zero_stage=1),
                           Run(**clip, accumulate=2, module_kwargs={"n_layer": 4})),
        "p2_t4": (dict(pipeline_size=2, tensor_size=4, microbatches=2, schedule="gpipe"),
                  Run(**clip, module_kwargs={"n_layer": 4, "n_head": 4})),
        "d4_t2_zero2": (dict(tensor_size=2, zero_stage=2), Run(**clip, accumulate=2)),
        "d4_t2_zero3": (dict(tensor_size=2, zero_stage=3), Run(**clip)),
        # every chunk on the host (ZeRO-Offload): the replicated gradients' pieces live there too
        "d4_t2_zero2_offload": (dict(tensor_size=2, zero_stage=2, offload=1.0), Run(**clip)),
        "d4_t2_zero1_no_sp": (dict(tensor_size=2, zero_stage=1, sequence_parallel=False), Run(**clip, accumulate=2)),
    }


def _data(arguments: dict) -> int:
    return HybridParallelStrategy(**arguments).topology_for(WORLD).data


def _train_all(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {}
    for name, (arguments, run) in _configs().items():
        trainers = []
        out[name] = fit(run, HybridParallelStrategy(**arguments), world, _data(arguments), module_class=HeldGPT,
                        trainers=trainers)
        out[f"{name}_held"] = trainers[0].lightning_module.held
    # Checkpoints: hybrid -> hybrid and -> one process (in the test); one process (saved by the test) -> hybrid.
    for name in CHECKPOINTED:
        arguments, run = _configs()[name]
        two_epochs = _two_epochs(run)
        path = os.path.join(tmpdir, f"{name}.ckpt")
        out[f"{name}_first_epoch"] = fit(two_epochs, HybridParallelStrategy(**arguments), world, _data(arguments),
                                         module_class=BatchLossGPT, save_to=path, max_epochs=1)
        out[f"{name}_resumed"] = fit(two_epochs, HybridParallelStrategy(**arguments), world, _data(arguments),
                                     module_class=BatchLossGPT, ckpt_path=path, max_epochs=2)
        out[f"{name}_from_one_process"] = fit(two_epochs, HybridParallelStrategy(**arguments), world,
                                              _data(arguments), module_class=BatchLossGPT, max_epochs=2,
                                              ckpt_path=os.path.join(tmpdir, f"{name}_one_process.ckpt"))
    return out


CHECKPOINTED = ("d2_p2_t2", "d2_p2_t2_zero1", "d4_t2_zero3")


def _two_epochs(run: Run) -> Run:
    return Run(steps=3, clip_val=run.clip_val, module_kwargs=run.module_kwargs)


def _reference(run: Run, data: int, **kw) -> list[float]:
    return fit(run, "auto", 1, data, module_class=BatchLossGPT, **kw)


def _replicas(arguments: dict) -> list[int]:
    """One rank per data-parallel replica: data coordinate d, pipeline and tensor coordinates 0."""
    topology = HybridParallelStrategy(**arguments).topology_for(WORLD)
    return [d * topology.pipeline * topology.tensor for d in range(topology.data)]


def test_hybrid_matches_single_process(tmp_path):
    for name in CHECKPOINTED:  # one process's checkpoint, for the ranks to resume
        arguments, run = _configs()[name]
        _reference(_two_epochs(run), _data(arguments), max_epochs=1,
                   save_to=str(tmp_path / f"{name}_one_process.ckpt"))
    per_rank = run_on_ranks(_train_all, WORLD, free_port(), str(tmp_path))
    for name, (arguments, run) in _configs().items():
        losses = [r[name] for r in per_rank]
        for r in range(WORLD):  # every rank reports its replica's batch loss
            topology = HybridParallelStrategy(**arguments).topology_for(WORLD)
            replica = topology.coordinates(r)["data"]
            assert losses[r] == pytest.approx(losses[_replicas(arguments)[replica]], rel=1e-6), (name, r)
        ours = global_losses(losses, _data(arguments), ranks=_replicas(arguments))
        reference = _reference(run, _data(arguments))
        assert len(ours) == run.steps * run.accumulate and reference[-1] < reference[0]
        assert relative_gap(ours, reference) <= TOL, (name, ours, reference)
        # Parity is not proof of parallelism: each rank holds about 1/8 of the model (1/4 leaves room for what
        # stays replicated: norms, position embeddings, the tied embedding on both pipeline ends).
        full = sum(p.numel() for p in BatchLossGPT(**run.module_kwargs).parameters())
        if name in ("p2_t4", "d4_t2_zero3"):
            assert per_rank[0][f"{name}_held"] < full / 4, (name, per_rank[0][f"{name}_held"], full)

    for name in CHECKPOINTED:
        arguments, run = _configs()[name]
        data, replicas = _data(arguments), _replicas(arguments)
        two_epochs = _two_epochs(run)
        uninterrupted = _reference(two_epochs, data, max_epochs=2)
        steps = two_epochs.steps
        first = global_losses([r[f"{name}_first_epoch"] for r in per_rank], data, ranks=replicas)
        resumed = global_losses([r[f"{name}_resumed"] for r in per_rank], data, ranks=replicas)
        assert relative_gap(first + resumed, uninterrupted) <= TOL, (name, first, resumed, uninterrupted)
        # hybrid's checkpoint (a directory: consolidated for Lightning's own strategy) in one process, and one
        # process's file under hybrid, continue the same run
        plain = tmp_path / f"{name}_consolidated.ckpt"
        consolidate(tmp_path / f"{name}.ckpt", plain)
        in_one_process = _reference(two_epochs, data, max_epochs=2, ckpt_path=str(plain))
        assert relative_gap(in_one_process, uninterrupted[steps:]) <= TOL, (name, in_one_process)
        from_one = global_losses([r[f"{name}_from_one_process"] for r in per_rank], data, ranks=replicas)
        assert relative_gap(from_one, uninterrupted[steps:]) <= TOL, (name, from_one)


def test_strategy_arguments_and_errors():
    assert HybridParallelStrategy(pipeline_size=2, tensor_size=2).topology_for(8).data == 2
    assert "pipeline_size=1 with ZeRO-2/3" in error_message(lambda: HybridParallelStrategy(pipeline_size=2,
                                                                                           zero_stage=2))
    assert "offload with a pipeline" in error_message(lambda: HybridParallelStrategy(pipeline_size=2, zero_stage=1,
                                                                                      offload=1.0))
    assert "Unknown tensor_mode" in error_message(lambda: HybridParallelStrategy(tensor_mode="4d"))
    assert "1D options" in error_message(lambda: HybridParallelStrategy(tensor_mode="2d", sequence_parallel=True))
    assert "needs zero_stage" in error_message(lambda: HybridParallelStrategy(offload=1.0))
    assert "does not divide" in error_message(lambda: HybridParallelStrategy(pipeline_size=3).topology_for(8))
