"""What Lightning's own strategy tests check, for every registered name, on 2 gloo CPU ranks.

Each preset of ``lightning_par/strategies/registry.py`` trains the demo GPT as a standard LightningModule and must
give what one process gives, or refuse clearly:

- fit with gradient accumulation and clipping by norm, then validate, test and predict on the same Trainer;
- ``self.log(..., sync_dist=True)`` reduced over the ranks;
- clipping by value;
- save after one epoch and resume: the losses continue exactly as without the interruption, also for a module
  built in ``Trainer.init_module(empty_init=True)`` and one built in ``configure_model``;
- the strategy as a registered name and as an instance;
- manual optimization with two optimizers: the single process's losses, or an error that names the problem;
- several optimizers under automatic optimization: Lightning's error, not masked by the strategy;
- no thread and no spill file left behind after the fits; validate, test and predict after fit create no process
  group (the strategy's groups live until the process ends, as Lightning's own strategies' do).

Losses are compared with a single process on the same global batch (fp32, SGD), relative gap at most 1e-5. One
launch per preset runs every check (starting processes is the expensive part).
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the names)
from helpers import free_port, run_on_ranks
from lightning_par.strategies import PRESETS, HybridParallelStrategy
from parity import BuildsInConfigureModel, RecordingGPT, Run, fit, global_losses, relative_gap, token_dataset
from test_dp import _as_external_rank

TOL = 1e-5
WORLD = 2
MODULE = {"n_layer": 4}  # 4 blocks: interleaved pipelines need 2 per stage at 2 stages
RUNS = {
    "accumulate_clip_norm": Run(steps=3, accumulate=2, clip_val=0.05, module_kwargs=MODULE),
    "clip_value": Run(steps=3, clip_val=0.002, clip_algorithm="value", module_kwargs=MODULE),
    "manual_two_optimizers": Run(steps=3, module_kwargs={**MODULE, "manual": True, "two_optimizers": True}),
    "automatic_two_optimizers": Run(steps=1, module_kwargs={**MODULE, "two_optimizers": True}),
}
RESUME = Run(steps=2, epochs=2, module_kwargs=MODULE)
EVAL_SAMPLES = 16


# `hybrid`'s compositions beyond its preset (tensor over the whole world): each axis's own paths under Lightning's
# contract, at WORLD ranks.
COMPOSITIONS = {
    "hybrid:pipeline2": dict(pipeline_size=2, microbatches=2),
    "hybrid:pipeline2_zero1": dict(pipeline_size=2, tensor_size=1, zero_stage=1, microbatches=2),
    "hybrid:data2_zero3": dict(tensor_size=1, zero_stage=3),
}
CASES = [p.name for p in PRESETS] + list(COMPOSITIONS)


def _instance(name: str):
    """The strategy as a user builds it in Python."""
    if name in COMPOSITIONS:
        return HybridParallelStrategy(**COMPOSITIONS[name])
    preset = next(p for p in PRESETS if p.name == name)
    return preset.strategy(**preset.arguments)


def _as_given(name: str):
    """The strategy as the Trainer receives it: a registered name, or a composition's instance."""
    return _instance(name) if name in COMPOSITIONS else name


def _topology(name: str):
    """The degrees the case runs with on WORLD ranks (tensor-parallel presets: the whole world, as for this
    module, whose heads divide by 2)."""
    return _instance(name).topology_for(WORLD)


def _is_pipeline(name: str) -> bool:
    return _topology(name).pipeline > 1


def _data_parallel(name: str) -> int:
    return _topology(name).data


class ConformanceGPT(RecordingGPT):
    """The demo GPT as a user writes it: losses come back through Lightning's outputs, metrics through
    ``self.log``; one metric is the rank itself, so its synced value is the mean of the ranks."""

    def training_step(self, batch, batch_idx):
        if self.manual:
            return super().training_step(batch, batch_idx)
        self.log("rank_mean", float(self.global_rank), sync_dist=True)
        return self._loss(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if not self.manual:  # Lightning divides the returned loss by the accumulation factor
            self.recorded.append(outputs["loss"].item() * self.trainer.accumulate_grad_batches)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), sync_dist=True)
        self.log("val_rank_mean", float(self.global_rank), sync_dist=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class ConfiguredConformanceGPT(BuildsInConfigureModel, ConformanceGPT):
    pass


def _eval_loader() -> DataLoader:
    return DataLoader(token_dataset(EVAL_SAMPLES, seed=99), batch_size=4)


def _fit_and_evaluate(run: Run, strategy, devices: int, data_parallel: int) -> dict:
    trainers: list = []
    losses = fit(run, strategy, devices, data_parallel, trainers=trainers, module_class=ConformanceGPT)
    trainer = trainers[0]
    module = trainer.lightning_module
    out = {"losses": losses, "rank_mean": trainer.callback_metrics["rank_mean"].item()}
    groups_after_fit = _process_groups()
    validated = trainer.validate(module, _eval_loader(), verbose=False)[0]
    out["val_loss"], out["val_rank_mean"] = validated["val_loss"], validated["val_rank_mean"]
    out["test_loss"] = trainer.test(module, _eval_loader(), verbose=False)[0]["test_loss"]
    predictions = trainer.predict(module, _eval_loader())
    out["predictions"] = [tuple(p.shape) for p in predictions]
    out["groups_added_after_fit"] = _process_groups() - groups_after_fit
    return out


def _process_groups() -> int:
    """Process groups alive in this process (the default one included)."""
    from torch.distributed import distributed_c10d

    return len(distributed_c10d._world.pg_map)


def _conformance(rank: int, world_size: int, port: int, name: str, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    data_parallel = _data_parallel(name)
    threads = {t.ident for t in threading.enumerate()}
    out = {"fit": _fit_and_evaluate(RUNS["accumulate_clip_norm"], _as_given(name), world_size, data_parallel)}
    # The strategy as an instance, as a user builds it in Python, instead of the registered name.
    out["clip_value"] = fit(RUNS["clip_value"], _instance(name), world_size, data_parallel,
                            module_class=ConformanceGPT)
    try:
        out["manual_two_optimizers"] = fit(RUNS["manual_two_optimizers"], _as_given(name), world_size,
                                           data_parallel, module_class=ConformanceGPT)
    except Exception as error:  # noqa: BLE001 - the refusal is part of the result
        out["manual_error"] = f"{type(error).__name__}: {error}"
    try:  # Lightning trains several optimizers only under manual optimization; the strategy must not mask that
        fit(RUNS["automatic_two_optimizers"], _as_given(name), world_size, data_parallel,
            module_class=ConformanceGPT)
        out["automatic_two_optimizers_error"] = None
    except Exception as error:  # noqa: BLE001
        out["automatic_two_optimizers_error"] = f"{type(error).__name__}: {error}"
    ckpt = os.path.join(tmpdir, "one_epoch.ckpt")
    out["uninterrupted"] = fit(RESUME, _as_given(name), world_size, data_parallel, module_class=ConformanceGPT)
    out["first_epoch"] = fit(RESUME, _as_given(name), world_size, data_parallel, save_to=ckpt, max_epochs=1,
                             module_class=ConformanceGPT)
    out["resumed"] = fit(RESUME, _as_given(name), world_size, data_parallel, ckpt_path=ckpt,
                         module_class=ConformanceGPT)
    # A module built inside Trainer.init_module(empty_init=True), and one built in configure_model: the weights
    # come from the checkpoint, so both continue as the resumed run does.
    out["init_module"] = fit(RESUME, _as_given(name), world_size, data_parallel, ckpt_path=ckpt, empty_init=True,
                             module_class=ConformanceGPT)
    out["configure_model"] = fit(RESUME, _as_given(name), world_size, data_parallel, ckpt_path=ckpt,
                                 module_class=ConfiguredConformanceGPT)
    out["threads_left"] = [t.name for t in threading.enumerate() if t.ident not in threads and t.is_alive()]
    out["files_left"] = _spill_dirs_of_this_process()
    return out


def _spill_dirs_of_this_process() -> list[str]:
    """The NVMe spill directories this process left under the temp dir (where zero3_nvme spills)."""
    try:
        names = os.listdir(Path(tempfile.gettempdir()) / "lightning_par_nvme")
    except FileNotFoundError:  # the root goes with its last run directory, possibly removed by another rank now
        return []
    return [n for n in names if f"-{os.getpid()}-rank" in n]


@functools.lru_cache(maxsize=None)
def _reference(run_name: str, data_parallel: int) -> dict:
    if run_name == "fit":
        return _fit_and_evaluate(RUNS["accumulate_clip_norm"], "auto", 1, data_parallel)
    run = RESUME if run_name == "resume" else RUNS[run_name]
    return {"losses": fit(run, "auto", 1, data_parallel, module_class=ConformanceGPT)}


@pytest.mark.parametrize("name", CASES)
def test_preset_behaves_as_lightning_expects(name, tmp_path):
    results = run_on_ranks(_conformance, WORLD, free_port(), name, str(tmp_path))
    data_parallel = _data_parallel(name)

    def losses(key):
        per_rank = [r[key]["losses"] if isinstance(r[key], dict) else r[key] for r in results]
        return global_losses(per_rank, data_parallel)

    reference = _reference("fit", data_parallel)
    assert relative_gap(losses("fit"), reference["losses"]) <= TOL
    assert relative_gap(losses("clip_value"), _reference("clip_value", data_parallel)["losses"]) <= TOL
    # A value logged with sync_dist=True is the mean over the ranks. Under a pipeline every rank logs what the
    # stage that computes the loss logged (see docs/pipeline.md), here its rank: the last stage, or for Chimera,
    # whose two pipelines run in opposite directions, both ends.
    synced_rank = sum(range(WORLD)) / WORLD
    if _is_pipeline(name):
        synced_rank = (0 + WORLD - 1) / 2 if name == "pipeline_chimera" else float(WORLD - 1)
    for r in results:
        assert r["fit"]["rank_mean"] == pytest.approx(synced_rank)
        assert r["fit"]["val_rank_mean"] == pytest.approx(synced_rank)
        for key in ("val_loss", "test_loss"):
            assert r["fit"][key] == pytest.approx(reference[key], rel=TOL), key
        batches = EVAL_SAMPLES // 4 // data_parallel
        assert r["fit"]["predictions"] == [(4, 16, 32)] * batches
        assert r["threads_left"] == [] and r["files_left"] == []
        # validate, test and predict on the fitted Trainer reuse its process groups (each is a communicator on NCCL)
        assert r["fit"]["groups_added_after_fit"] == 0
        assert "manual optimization" in (r["automatic_two_optimizers_error"] or ""), r["automatic_two_optimizers_error"]

    if "manual_error" in results[0]:
        assert all("manual" in r["manual_error"].lower() for r in results), results[0]["manual_error"]
    else:
        manual = _reference("manual_two_optimizers", data_parallel)["losses"]
        assert relative_gap(losses("manual_two_optimizers"), manual) <= TOL

    uninterrupted = losses("uninterrupted")
    assert relative_gap(uninterrupted, _reference("resume", data_parallel)["losses"]) <= TOL
    assert relative_gap(losses("first_epoch"), uninterrupted[: RESUME.steps]) <= TOL
    assert relative_gap(losses("resumed"), uninterrupted[RESUME.steps :]) <= TOL
    for key in ("init_module", "configure_model"):
        assert relative_gap(losses(key), uninterrupted[RESUME.steps :]) <= TOL, key
