"""`dp` through Lightning's Trainer on gloo CPU ranks: parity with one process, accumulation, clipping, manual
optimization, several optimizers, save and resume, and the errors raised before any collective.

Most runs share one launch per world size: the ranks are started by the test harness and Lightning's launcher sees
an environment that created its processes (``LOCAL_RANK`` set), the same path as torchrun or SLURM. Starting
processes is the expensive part on 2 cores, so one launch trains several configurations in a row. A separate test
goes through Lightning's spawn launcher end to end.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import free_port, run_on_ranks
from lightning_par import DataParallelStrategy
from lightning_par.comm.data_axis import grouped_buckets
from parity import RecordingGPT, Run, fit, global_losses, relative_gap

TOL = 1e-5

CONFIGS = {
    "plain": Run(),
    "accumulate": Run(accumulate=2),
    "clip_norm": Run(clip_val=0.05),
    "accumulate_clip_norm": Run(accumulate=2, clip_val=0.05),
    "clip_value": Run(clip_val=0.002, clip_algorithm="value"),
    "manual": Run(module_kwargs={"manual": True}),
    "manual_two_optimizers": Run(module_kwargs={"manual": True, "two_optimizers": True}),
    "unfreeze_during_fit": Run(module_kwargs={"unfreeze_at": 4}),
    "two_epochs": Run(steps=5, epochs=2),
    "flat_accumulate_clip_norm": Run(accumulate=2, clip_val=0.05),
}
# Half precision: the same oracle with a tolerance for bf16 rounding (8 mantissa bits; the reduction order of the
# all-reduce differs from one process's sum).
HALF = {
    "bf16_mixed": Run(precision="bf16-mixed"),
    "bf16_true": Run(precision="bf16-true", accumulate=2),
    "bf16_mixed_reduce_in_bf16": Run(precision="bf16-mixed"),
}
STRATEGIES = {
    "bf16_mixed_reduce_in_bf16": lambda: DataParallelStrategy(reduce_dtype="compute"),
    "flat_accumulate_clip_norm": lambda: DataParallelStrategy(bucket_mode="flat"),
}
HALF_TOL = 2e-2


def _as_external_rank(rank: int, world_size: int, port: int) -> None:
    # What torchrun/SLURM would set; Lightning's launcher then starts nothing and joins the existing group.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _train_all(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    out = {}
    for name, run in {**CONFIGS, **HALF}.items():
        strategy = STRATEGIES.get(name, lambda: "dp")()
        out[name] = fit(run, strategy, devices=world_size, data_parallel=world_size)
    # Save after one epoch, resume for the second: must continue exactly like "two_epochs".
    ckpt = os.path.join(tmpdir, "one_epoch.ckpt")
    resume_run = CONFIGS["two_epochs"]
    out["first_epoch"] = fit(resume_run, "dp", world_size, world_size, save_to=ckpt, max_epochs=1)
    out["resumed"] = fit(resume_run, "dp", world_size, world_size, ckpt_path=ckpt, max_epochs=2)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_dp_matches_single_process(world_size, tmp_path):
    per_rank = run_on_ranks(_train_all, world_size, free_port(), str(tmp_path))
    for name, run in CONFIGS.items():
        reference = fit(run, "auto", devices=1, data_parallel=world_size)
        assert len(reference) == run.steps * run.accumulate * run.epochs
        ours = global_losses([r[name] for r in per_rank], world_size)
        assert relative_gap(ours, reference) <= TOL, (name, ours, reference)
        assert reference[-1] < reference[0]  # the run trains: a gap of zero is not a frozen model
    for name, run in HALF.items():
        reference = fit(run, "auto", devices=1, data_parallel=world_size)
        ours = global_losses([r[name] for r in per_rank], world_size)
        assert relative_gap(ours, reference) <= HALF_TOL, (name, ours, reference)
        assert reference[-1] < reference[0]
    uninterrupted = global_losses([r["two_epochs"] for r in per_rank], world_size)
    first = global_losses([r["first_epoch"] for r in per_rank], world_size)
    resumed = global_losses([r["resumed"] for r in per_rank], world_size)
    assert first + resumed == pytest.approx(uninterrupted, rel=TOL, abs=0)
    assert len(resumed) == CONFIGS["two_epochs"].steps


class SaveLosses(Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        torch.save(pl_module.recorded, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def test_dp_through_lightning_spawn_launcher(tmp_path):
    """Lightning's own `_MultiProcessingLauncher`: ranks spawned from the running interpreter."""
    run = Run(steps=6, accumulate=2, clip_val=0.05)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="dp_spawn", max_epochs=1,
                      accumulate_grad_batches=2, gradient_clip_val=0.05, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[SaveLosses(str(tmp_path))])
    seed_everything(0, verbose=False)
    trainer.fit(RecordingGPT(), DataLoader(run.dataset(2), batch_size=run.per_rank_batch))
    ours = global_losses([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], 2)
    reference = fit(run, "auto", devices=1, data_parallel=2)
    assert relative_gap(ours, reference) <= TOL


def test_strategy_is_constructible_without_arguments_and_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = DataParallelStrategy()
    assert strategy.bucket_size_mb > 0 and strategy.reduce_dtype == "fp32"
    with pytest.raises(ValueError, match="reduce_dtype must be 'fp32' or 'compute'"):
        DataParallelStrategy(reduce_dtype="bf16")
    with pytest.raises(ValueError, match="bucket_mode must be 'auto', 'flat' or 'grouped'"):
        DataParallelStrategy(bucket_mode="inplace")
    with pytest.raises(ValueError, match="cannot be combined with reduce_dtype='compute'"):
        DataParallelStrategy(bucket_mode="grouped", reduce_dtype="compute")
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert strategy.bucket_mode == "auto"
    assert grouped_buckets("auto", "fp32", "nccl", gpu) and grouped_buckets("auto", "fp32", "gloo", cpu)
    assert not grouped_buckets("auto", "compute", "nccl", gpu)  # a bf16 copy on the wire: flat
    assert not grouped_buckets("auto", "fp32", "gloo", gpu)  # gloo coalesces CPU tensors only
    assert grouped_buckets("grouped", "fp32", "gloo", cpu) and not grouped_buckets("flat", "fp32", "nccl", gpu)
    assert {"dp", "dp_spawn", "dp_fork"} <= set(StrategyRegistry)
    # Import twice: registration is idempotent.
    import importlib

    importlib.reload(lightning_par)
    trainer = Trainer(strategy="dp", accelerator="cpu", devices=3, logger=False)
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 3, "rank": 0}


@pytest.mark.parametrize("precision", ["64-true", "16-true", "transformer-engine"])
def test_unsupported_precision_is_refused_when_the_trainer_is_built(precision):
    with pytest.raises((ValueError, ImportError), match="(does not support precision|transformer)"):
        Trainer(strategy="dp", accelerator="cpu", devices=2, precision=precision, logger=False)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="Precision"):
        Trainer(strategy="dp", accelerator="cpu", devices=2, precision="bf15-mixed", logger=False)


def test_wrong_world_size_fails_before_any_collective():
    """A topology that does not fit the world raises in setup_environment, before init_process_group."""
    import torch.distributed as dist

    from lightning_par.topology import Topology

    class FourRankOnly(DataParallelStrategy):
        def topology_for(self, world_size):
            return Topology(data=2, tensor=2)

    trainer = Trainer(strategy=FourRankOnly(), accelerator="cpu", devices=3, logger=False)
    with pytest.raises(ValueError, match="= 4 ranks, but the world size is 3"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()


def test_mesh_read_too_early_says_when_it_exists():
    with pytest.raises(RuntimeError, match="built when the processes start"):
        DataParallelStrategy().mesh


class _StubEpochLoop:
    """Stands in for Lightning's training-epoch loop: the method the check replaces, and the trainer it reads."""

    def __init__(self, received_sigterm: bool) -> None:
        self.trainer = types.SimpleNamespace(received_sigterm=received_sigterm)

    def _broadcast_sigterm_tensor(self) -> None:
        raise AssertionError("Lightning's device check ran instead of the host one")


def _sigterm_on_ranks(rank: int, world_size: int) -> list[str]:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_par.strategies.sigterm import host_sigterm_check

    group = dist.new_group(backend="gloo")
    seen = []
    for rank0_flag in (False, True):
        # Only rank 0's flag counts, as in Lightning: the other ranks say False.
        loop = _StubEpochLoop(received_sigterm=rank0_flag and rank == 0)
        trainer = types.SimpleNamespace(fit_loop=types.SimpleNamespace(epoch_loop=loop))
        assert host_sigterm_check(trainer, group)
        try:
            loop._broadcast_sigterm_tensor()
            seen.append("went on")
        except SIGTERMException:
            seen.append("stopped")
    assert not host_sigterm_check(trainer, None)  # a CPU run keeps Lightning's own check
    return seen


def test_sigterm_check_runs_on_the_host_group_and_stops_every_rank():
    # Lightning's per-step check syncs the GPU twice (a device tensor and .item()); ours asks over gloo.
    assert run_on_ranks(_sigterm_on_ranks, 2) == [["went on", "stopped"]] * 2
