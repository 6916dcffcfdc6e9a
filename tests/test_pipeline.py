"""Pipeline strategies through Lightning's Trainer on gloo CPU ranks: every schedule matches one process step by
step (fp32, SGD), validation and predict return a single process's outputs, accumulation and clipping over stages,
data x pipeline, checkpoints that load under ``dp`` and the reverse, and the errors.

As in test_dp.py, one launch per world size runs many fits in a row (starting processes is the expensive part).
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import free_port, run_on_ranks
from lightning_par import PipelineStrategy
from lightning_par.checkpoint import consolidate, load_any
from lightning_par.pipeline import ScheduleError
from parity import RecordingGPT, Run, fit, global_losses, relative_gap, token_dataset

TOL = 1e-5
HALF_TOL = 2e-2
SCHEDULES = ("1f1b", "gpipe", "interleaved", "zero_bubble", "chimera")


class PipelinedGPT(RecordingGPT):
    """A standard LightningModule: training_step calls forward and logs. Records, on every rank, the step loss the
    strategy returns and the value `self.log` reached Lightning with."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.logged: list[float] = []
        self.example_input_array = torch.zeros(2, 16, dtype=torch.long)  # for balance="time"

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Lightning divides the returned loss by the accumulation factor.
        self.recorded.append(outputs["loss"].item() * self.trainer.accumulate_grad_batches)
        self.logged.append(self.trainer.callback_metrics["train_loss"].item())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def _eval_loader():
    # 10 samples in batches of 4: the last batch (2) does not divide into the training microbatches.
    return DataLoader(token_dataset(10, seed=99), batch_size=4)


def _configs(world_size):
    layers = 4 if world_size == 2 else 8  # interleaved at 4 ranks x 2 chunks needs 8 blocks
    kwargs = {"n_layer": layers}
    m = 4
    configs = {s: (PipelineStrategy(schedule=s, microbatches=m), Run(steps=4, module_kwargs=kwargs)) for s in SCHEDULES}
    # Replicas and tied weights counted once in the global norm; accumulation skips communication.
    configs["chimera_accumulate_clip"] = (PipelineStrategy(schedule="chimera", microbatches=m),
                                          Run(steps=3, accumulate=2, clip_val=0.05, module_kwargs=kwargs))
    configs["zero_bubble_clip"] = (PipelineStrategy(schedule="zero_bubble", microbatches=m),
                                   Run(steps=3, clip_val=0.05, module_kwargs=kwargs))
    if world_size == 2:
        # User split points (1 block, then 3), balance by measured time, bf16 autocast.
        configs["split_points"] = (PipelineStrategy(schedule="1f1b", microbatches=m, split_points=[1]),
                                   Run(steps=3, module_kwargs=kwargs))
        configs["time_balanced"] = (PipelineStrategy(schedule="gpipe", microbatches=m, balance="time"),
                                    Run(steps=3, module_kwargs=kwargs))
        configs["bf16_mixed"] = (PipelineStrategy(schedule="zero_bubble", microbatches=m),
                                 Run(steps=3, precision="bf16-mixed", module_kwargs=kwargs))
        # The other schedules' weight casts (hooks on the linear layers, not zero bubble's function mode).
        configs["bf16_mixed_1f1b"] = (PipelineStrategy(schedule="1f1b", microbatches=m),
                                      Run(steps=3, precision="bf16-mixed", module_kwargs=kwargs))
        configs["deferred_weight_grads"] = (PipelineStrategy(schedule="1f1b", microbatches=m, defer_weight_grads=True),
                                            Run(steps=3, clip_val=0.05, module_kwargs=kwargs))
    if world_size == 4:
        configs["data2_x_pipeline2"] = (PipelineStrategy(schedule="interleaved", stages=2, microbatches=2),
                                        Run(steps=3, accumulate=2, clip_val=0.05, module_kwargs=kwargs))
        # Zero bubble under data parallelism: parameters with bucket hooks get their gradients in I, the rest in W.
        configs["data2_x_zero_bubble2"] = (PipelineStrategy(schedule="zero_bubble", stages=2, microbatches=2),
                                           Run(steps=3, accumulate=2, module_kwargs=kwargs))
    return configs


def _as_external_rank(rank, world_size, port):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def _train_all(rank, world_size, port, tmpdir):
    _as_external_rank(rank, world_size, port)
    out = {}
    for name, (strategy, run) in _configs(world_size).items():
        trainers = []
        data = strategy.topology_for(world_size).data
        losses = fit(run, strategy, world_size, data_parallel=data, trainers=trainers, module_class=PipelinedGPT)
        trainer = trainers[0]
        entry = {"losses": losses, "logged": trainer.lightning_module.logged}
        if data == 1:
            entry["validate"] = trainer.validate(trainer.lightning_module, _eval_loader(), verbose=False)
            entry["predict"] = trainer.predict(trainer.lightning_module, _eval_loader())
        out[name] = entry
    if world_size == 4:
        kwargs = {"n_layer": 8}
        run = Run(steps=3, epochs=2, module_kwargs=kwargs)
        pp_ckpt, dp_ckpt = os.path.join(tmpdir, "pp.ckpt"), os.path.join(tmpdir, "dp.ckpt")
        fit(run, PipelineStrategy(schedule="zero_bubble", microbatches=4), 4, 1, save_to=pp_ckpt, max_epochs=1,
            module_class=PipelinedGPT)
        out["dp_resumes_pipeline"] = fit(run, "dp", 4, 4, ckpt_path=pp_ckpt, max_epochs=2)
        fit(run, "dp", 4, 4, save_to=dp_ckpt, max_epochs=1)
        out["pipeline_resumes_dp"] = fit(run, PipelineStrategy(schedule="chimera", microbatches=4), 4, 1,
                                         ckpt_path=dp_ckpt, max_epochs=2, module_class=PipelinedGPT)
    return out


def _reference(run, data_parallel, **kwargs):
    trainers = []
    losses = fit(run, "auto", 1, data_parallel=data_parallel, trainers=trainers, module_class=PipelinedGPT, **kwargs)
    return losses, trainers[0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_schedule_matches_a_single_process(world_size, tmp_path):
    per_rank = run_on_ranks(_train_all, world_size, free_port(), str(tmp_path))
    for name, (strategy, run) in _configs(world_size).items():
        data = strategy.topology_for(world_size).data
        reference, trainer = _reference(run, data)
        assert len(reference) == run.steps * run.accumulate and reference[-1] < reference[0]
        # Every rank reports the batch loss, the one its data-parallel replica computed.
        replicas = [per_rank[r][name]["losses"] for r in range(world_size)]
        pipeline = world_size // data
        ours = global_losses(replicas, data, ranks=[d * pipeline for d in range(data)])
        # bf16: the same oracle with a tolerance for rounding (8 mantissa bits), as in test_dp.py.
        tol = TOL if run.precision == "32-true" else HALF_TOL
        assert relative_gap(ours, reference) <= tol, (name, ours, reference)
        for r in range(world_size):
            replica = r // pipeline
            assert replicas[r] == replicas[replica * pipeline], (name, r)  # the same on every stage
            logged = per_rank[r][name]["logged"]
            assert relative_gap(logged, per_rank[r][name]["losses"]) <= 1e-6, (name, r)  # self.log saw it too
        if data == 1:
            expected_val = trainer.validate(trainer.lightning_module, _eval_loader(), verbose=False)
            expected_pred = trainer.predict(trainer.lightning_module, _eval_loader())
            for r in range(world_size):
                got = per_rank[r][name]
                assert got["validate"][0]["val_loss"] == pytest.approx(expected_val[0]["val_loss"], rel=tol), name
                assert len(got["predict"]) == len(expected_pred) == 3
                for a, b in zip(got["predict"], expected_pred):
                    torch.testing.assert_close(a, b, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    if world_size == 4:
        run = Run(steps=3, epochs=2, module_kwargs={"n_layer": 8})
        # The pipeline checkpoint equals the one a single process writes after the same epoch ...
        single_ckpt = str(tmp_path / "single.ckpt")
        _reference(run, 1, save_to=single_ckpt, max_epochs=1)
        assert (tmp_path / "pp.ckpt").is_dir()  # each stage wrote its own pieces
        ours, theirs = load_any(tmp_path / "pp.ckpt", weights_only=False), torch.load(single_ckpt, weights_only=False)
        assert ours["state_dict"].keys() == theirs["state_dict"].keys()
        for key, value in theirs["state_dict"].items():
            torch.testing.assert_close(ours["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        (opt_ours,), (opt_theirs,) = ours["optimizer_states"], theirs["optimizer_states"]
        assert opt_ours["param_groups"] == opt_theirs["param_groups"]
        assert opt_ours["state"].keys() == opt_theirs["state"].keys()
        for index, entry in opt_theirs["state"].items():
            torch.testing.assert_close(opt_ours["state"][index]["momentum_buffer"], entry["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)
        # ... dp resumes from it exactly as one process does, and a dp checkpoint resumes under a pipeline.
        dp_resumed = global_losses([per_rank[r]["dp_resumes_pipeline"] for r in range(4)], 4)
        consolidate(tmp_path / "pp.ckpt", tmp_path / "pp_plain.ckpt")  # for Lightning's own strategy
        expected, _ = _reference(run, 4, ckpt_path=str(tmp_path / "pp_plain.ckpt"), max_epochs=2)
        assert len(dp_resumed) == 3 and relative_gap(dp_resumed, expected) <= TOL
        pp_resumed = per_rank[0]["pipeline_resumes_dp"]
        expected, _ = _reference(run, 1, ckpt_path=str(tmp_path / "dp.ckpt"), max_epochs=2)
        assert len(pp_resumed) == 3 and relative_gap(pp_resumed, expected) <= TOL


def test_strategies_are_registered_and_constructible_without_arguments():
    from lightning.pytorch.strategies import StrategyRegistry

    assert PipelineStrategy().schedule_name == "1f1b"
    for name, schedule in (("pipeline", "1f1b"), ("pipeline_gpipe", "gpipe"), ("pipeline_interleaved", "interleaved"),
                           ("pipeline_zero_bubble", "zero_bubble"), ("pipeline_chimera", "chimera")):
        assert name in StrategyRegistry
        trainer = Trainer(strategy=name, accelerator="cpu", devices=4, logger=False)
        assert isinstance(trainer.strategy, PipelineStrategy) and trainer.strategy.schedule_name == schedule
    trainer = Trainer(strategy=PipelineStrategy(stages=2), accelerator="cpu", devices=4, logger=False)
    # Ranks of one pipeline read the same batches: the sampler splits over the data axis only.
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    assert PipelineStrategy(schedule="interleaved").chunks == 2


@pytest.mark.parametrize(
    ("kwargs", "devices", "error", "message"),
    [
        ({"schedule": "interleaved", "microbatches": 6}, 4, ScheduleError, "multiple of 4; got 6"),
        ({"schedule": "zero_bubble", "microbatches": 2}, 4, ScheduleError, ">= the pipeline size 4; got 2"),
        ({"schedule": "chimera"}, 3, ScheduleError, "must be even; got 3"),
        ({"stages": 3}, 4, ValueError, "does not divide the world size 4"),
    ],
)
def test_sizes_that_cannot_run_fail_before_any_process_group(kwargs, devices, error, message):
    import torch.distributed as dist

    trainer = Trainer(strategy=PipelineStrategy(**kwargs), accelerator="cpu", devices=devices, logger=False)
    with pytest.raises(error, match=message):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()


def test_arguments_are_checked_when_the_strategy_is_built():
    with pytest.raises(ValueError, match="only applies to schedule='interleaved'"):
        PipelineStrategy(schedule="1f1b", chunks=2)
    with pytest.raises(ValueError, match="Unknown schedule 'pipedream'"):
        PipelineStrategy(schedule="pipedream")
    with pytest.raises(ValueError, match="does not support precision='16-true'"):
        Trainer(strategy="pipeline", accelerator="cpu", devices=2, precision="16-true", logger=False)


def _errors_on_two_ranks(rank, world_size, port):
    _as_external_rank(rank, world_size, port)
    cases = {
        "indivisible": (PipelineStrategy(microbatches=3), Run(steps=1), PipelinedGPT),  # 4 samples, 3 microbatches
        "more_stages_than_layers": (PipelineStrategy(schedule="interleaved", microbatches=2),  # 2 blocks, 4 parts
                                    Run(steps=1, module_kwargs={"n_layer": 2}), PipelinedGPT),
        "manual": (PipelineStrategy(microbatches=2), Run(steps=1, module_kwargs={"manual": True}), RecordingGPT),
    }
    errors = {}
    for name, (strategy, run, module_class) in cases.items():
        try:
            fit(run, strategy, world_size, 1, module_class=module_class)
        except Exception as error:  # noqa: BLE001 (the test reads the message)
            errors[name] = f"{type(error).__name__}: {error}"
    return errors


def test_clear_errors_for_batches_layers_and_manual_optimization():
    errors = run_on_ranks(_errors_on_two_ranks, 2, free_port())[0]
    assert "microbatches=3 does not divide" in errors["indivisible"]
    assert "Cannot split 2 blocks into 4 pipeline parts" in errors["more_stages_than_layers"]
    assert "manual optimization" in errors["manual"]


def test_recipe_trains_through_the_cli_and_the_popen_launcher(tmp_path):
    """`lightning-par fit --config recipes/pipeline.yaml`, shortened: the strategy's class_path form, Lightning's
    default launcher (the script re-run per rank), validation, CSV logs of rank 0, ModelCheckpoint files."""
    import csv
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = shutil.which("lightning-par", path=os.path.dirname(sys.executable)) or shutil.which("lightning-par")
    if script is None:
        pytest.skip("the lightning-par console script is not installed (pip install -e .)")
    repo, root = Path(__file__).resolve().parents[1], tmp_path / "run"
    args = ["fit", "--config", str(repo / "recipes" / "pipeline.yaml"), "--trainer.strategy.schedule=zero_bubble",
            "--trainer.max_steps=20", "--trainer.val_check_interval=10", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=5", f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false"]
    result = subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert any(c.name == "last.ckpt" for c in root.rglob("*.ckpt"))
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    assert len(losses) == 4 and losses[-1] < losses[0] and any(r.get("val_loss") for r in rows)
