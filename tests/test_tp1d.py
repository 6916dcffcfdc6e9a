"""`tp1d` through Lightning's Trainer on gloo CPU ranks: step-by-step parity with one process for three standard
modules (the demo GPT, a LLaMA-shaped decoder, an nn.TransformerEncoder), with and without sequence parallelism, on
tensor 2, tensor 4 and tensor 2 x data 2; accumulation, clipping by global norm, manual optimization, bf16,
the gathered-logits path, validation, and checkpoints that cross between tp1d, dp, one process and tensor sizes.

As in test_dp.py, one launch per world size trains every configuration in a row (the ranks are started by the test
harness and Lightning's launcher joins them, as under torchrun). Every rank of a tensor group computes the same
loss; the global loss of a step is the mean over the data-parallel replicas.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import free_port, run_on_ranks, run_recipe
from lightning_par import TensorParallel1DStrategy
from parity import RecordingGPT, Run, fit, global_losses, relative_gap, token_dataset
from test_dp import _as_external_rank
from tp1d_models import CUSTOM_PLAN, RecordingEncoder, RecordingLlama, RecordingNet

TOL = 1e-5
HALF_TOL = 2e-2


@dataclass(frozen=True)
class Case:
    tensor: int
    module: type = RecordingGPT
    kwargs: tuple = ()  # module kwargs, as pairs (hashable: cases share references)
    sp: bool = False
    run: Run = field(default_factory=Run)
    strategy: tuple = ()  # extra strategy kwargs, as pairs

    def fit(self, world: int, **kw: Any) -> list[float]:
        strategy = TensorParallel1DStrategy(tensor_size=self.tensor, sequence_parallel=self.sp, **dict(self.strategy))
        return fit(self._run(), strategy, world, world // self.tensor, module_class=self.module, **kw)

    def _run(self) -> Run:
        return Run(**{**self.run.__dict__, "module_kwargs": dict(self.kwargs)})

    def reference(self, data_parallel: int, **kw: Any) -> list[float]:
        return fit(self._run(), "auto", 1, data_parallel, module_class=self.module, **kw)


GPT4 = (("n_head", 4),)  # the tiny demo GPT has 2 heads; tensor 4 needs 4
ENC_SEQ_FIRST = (("batch_first", False), ("norm_first", True))
ENC_BATCH_FIRST = (("batch_first", True), ("norm_first", False))

# The "Done when" matrix (GPT-style and nn.TransformerEncoder, with and without SP) plus the LLaMA-shaped decoder.
MATRIX = {
    2: [("gpt", RecordingGPT, ()), ("llama", RecordingLlama, (("n_kv_heads", 2),)),
        ("encoder", RecordingEncoder, ENC_SEQ_FIRST)],
    4: [("gpt", RecordingGPT, GPT4), ("llama", RecordingLlama, (("n_kv_heads", 4),)),
        ("encoder", RecordingEncoder, ENC_BATCH_FIRST)],
}


def cases(world: int) -> dict[str, Case]:
    out = {}
    for tensor in (world, 2) if world == 4 else (2,):
        for name, module, kwargs in MATRIX[tensor]:
            for sp in (False, True):
                out[f"t{tensor}_{name}{'_sp' if sp else ''}"] = Case(tensor, module, kwargs, sp)
    if world == 2:
        out["t2_gpt_sp_accumulate_clip"] = Case(2, sp=True, run=Run(accumulate=2, clip_val=0.05))
        out["t2_llama_clip"] = Case(2, RecordingLlama, (("n_kv_heads", 2),), run=Run(clip_val=0.05))
        out["t2_gpt_manual_clip"] = Case(2, kwargs=(("manual", True),), sp=True)
        # Two manual_backward calls per step: each sums the replicated gradients over the tensor group.
        out["t2_gpt_manual_two_backwards"] = Case(2, kwargs=(("manual", True), ("backwards", 2)), sp=True)
        out["t2_gpt_gathered_logits"] = Case(2, strategy=(("vocab_parallel_loss", False),))
        out["t2_gpt_two_epochs"] = Case(2, run=Run(steps=5, epochs=2))
        out["t2_custom_plan_sp"] = Case(2, RecordingNet, sp=True, strategy=(("plan", tuple(CUSTOM_PLAN.items())),))
    else:
        out["t2d2_gpt_sp_accumulate_clip"] = Case(2, sp=True, run=Run(accumulate=2, clip_val=0.05))
        out["t2d2_encoder_sp_clip"] = Case(2, RecordingEncoder, ENC_SEQ_FIRST, sp=True, run=Run(clip_val=0.05))
    return out


HALF = {
    2: {"t2_gpt_sp_bf16_mixed": Case(2, sp=True, run=Run(precision="bf16-mixed"))},
    4: {"t4_llama_sp_bf16_true": Case(4, RecordingLlama, (("n_kv_heads", 4),), sp=True,
                                      run=Run(precision="bf16-true"))},
}
# Checkpoints: two epochs of five steps, saved after the first.
TWO_EPOCHS = Run(steps=5, epochs=2)


def _ckpt_runs(world: int, tmpdir: str) -> dict[str, list[float]]:
    out = {}
    ckpt = lambda name: os.path.join(tmpdir, f"{name}.ckpt")  # noqa: E731
    tp = Case(2, sp=True, run=TWO_EPOCHS)
    if world == 2:
        out["tp_first"] = tp.fit(world, save_to=ckpt("tp"), max_epochs=1)
        # dp resumes from the tp1d file; tp1d resumes from dp's.
        out["dp_from_tp"] = fit(TWO_EPOCHS, "dp", world, world, ckpt_path=ckpt("tp"), max_epochs=2)
        fit(TWO_EPOCHS, "dp", world, world, save_to=ckpt("dp"), max_epochs=1)
        out["tp_from_dp"] = tp.fit(world, ckpt_path=ckpt("dp"), max_epochs=2)
    else:
        # Written by tensor 2 x data 2, resumed by tensor 4.
        tp.fit(world, save_to=ckpt("t2d2"), max_epochs=1)
        out["t4_from_t2d2"] = Case(4, kwargs=GPT4, run=TWO_EPOCHS).fit(world, ckpt_path=ckpt("t2d2"), max_epochs=2)
    return out


def _validate(module_class: type, kwargs: dict, strategy: Any, devices: int) -> float:
    seed_everything(0, verbose=False)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)
    loader = DataLoader(token_dataset(16, seed=7), batch_size=8)
    return trainer.validate(module_class(**kwargs), loader, verbose=False)[0]["val_loss"]


VALIDATE = {"gpt": (RecordingGPT, {}), "encoder": (RecordingEncoder, dict(ENC_BATCH_FIRST))}


def _train_all(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {name: case.fit(world) for name, case in {**cases(world), **HALF[world]}.items()}
    out.update(_ckpt_runs(world, tmpdir))
    if world == 2:
        for name, (module, kwargs) in VALIDATE.items():
            out[f"validate_{name}"] = _validate(module, kwargs, TensorParallel1DStrategy(sequence_parallel=True), world)
    return out


def _compare(name: str, case: Case, per_rank: list, world: int, tol: float, references: dict) -> None:
    data = world // case.tensor
    losses = [r[name] for r in per_rank]
    for group_start in range(0, world, case.tensor):  # every rank of a tensor group computes the same loss
        for r in range(group_start, group_start + case.tensor):
            assert losses[r] == pytest.approx(losses[group_start], rel=1e-6), (name, r)
    ours = global_losses(losses, data, ranks=list(range(0, world, case.tensor)))
    key = (case.module, case.kwargs, repr(case.run), data)
    if key not in references:
        references[key] = case.reference(data)
    reference = references[key]
    assert len(ours) == case.run.steps * case.run.accumulate * case.run.epochs, (name, len(ours))
    assert relative_gap(ours, reference) <= tol, (name, ours, reference)
    assert reference[-1] < reference[0]  # the run trains: a gap of zero is not a frozen model


@pytest.mark.parametrize("world", [2, 4])
def test_tp1d_matches_single_process(world, tmp_path):
    per_rank = run_on_ranks(_train_all, world, free_port(), str(tmp_path))
    references: dict = {}
    for name, case in cases(world).items():
        _compare(name, case, per_rank, world, TOL, references)
    for name, case in HALF[world].items():
        _compare(name, case, per_rank, world, HALF_TOL, references)

    ckpt = lambda name: str(tmp_path / f"{name}.ckpt")  # noqa: E731
    if world == 2:
        # The tp1d file holds exactly the single-process state: resuming it in one process continues the
        # uninterrupted single-process run.
        uninterrupted = fit(TWO_EPOCHS, "auto", 1, 1)
        assert relative_gap(per_rank[0]["tp_first"], uninterrupted[:5]) <= TOL
        assert relative_gap(fit(TWO_EPOCHS, "auto", 1, 1, ckpt_path=ckpt("tp"), max_epochs=2),
                            uninterrupted[5:]) <= TOL
        # dp (data 2) from the tp1d file, tp1d from dp's file: each equals one process resuming the same file.
        dp_from_tp = global_losses([r["dp_from_tp"] for r in per_rank], 2)
        assert relative_gap(dp_from_tp, fit(TWO_EPOCHS, "auto", 1, 2, ckpt_path=ckpt("tp"), max_epochs=2)) <= TOL
        assert relative_gap(per_rank[0]["tp_from_dp"],
                            fit(TWO_EPOCHS, "auto", 1, 1, ckpt_path=ckpt("dp"), max_epochs=2)) <= TOL
        for name, (module, kwargs) in VALIDATE.items():
            reference = _validate(module, kwargs, "auto", 1)
            for r in per_rank:
                assert r[f"validate_{name}"] == pytest.approx(reference, rel=TOL), name
    else:
        resumed = per_rank[0]["t4_from_t2d2"]
        reference = fit(Run(**{**TWO_EPOCHS.__dict__, "module_kwargs": dict(GPT4)}), "auto", 1, 1,
                        ckpt_path=ckpt("t2d2"), max_epochs=2)
        assert len(resumed) == TWO_EPOCHS.steps and relative_gap(resumed, reference) <= TOL


def test_recipe_trains_through_the_cli_and_its_checkpoint_loads_in_one_process(tmp_path):
    """recipes/tp1d.yaml through `lightning-par fit` (popen launcher, 2 ranks), shortened; the checkpoint it writes
    is a directory of pieces that, consolidated, the unsharded module loads."""
    from lightning_par.checkpoint import consolidate
    from lightning_par.demo import DemoGPT

    output, losses, root = run_recipe("tp1d", tmp_path)
    assert "tensor-parallel plan, tensor size 2, with sequence parallelism" in output
    assert len(losses) >= 5 and losses[-1] < losses[0]
    last = next(c for c in root.rglob("last.ckpt"))
    assert last.is_dir()
    consolidate(last, tmp_path / "plain.ckpt")
    model = DemoGPT.load_from_checkpoint(tmp_path / "plain.ckpt", map_location="cpu")  # strict: every tensor whole
    assert model.model.lm_head.weight.shape == (65, 128) and model.model.wte.weight is model.model.lm_head.weight
