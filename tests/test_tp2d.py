"""``tp2d`` through Lightning on gloo ranks: parity with one process (fp32, SGD, clipping by norm, accumulation), the
bytes each rank holds, checkpoints to and from one process, and the module whole again after fit.

On 4 ranks the tensor group is the whole world (q = 2); on 8, q = 2 with data 2 (``hybrid`` with
``tensor_mode="2d"``, the same axis).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from torch import nn

from helpers import error_message, free_port, run_on_ranks
from lightning_par import HybridParallelStrategy, TensorParallel2DStrategy, TensorParallel2p5DStrategy
from lightning_par.checkpoint import consolidate
from parity import BatchLossGPT, Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

TOL = 1e-5
RUN = Run(steps=6, clip_val=0.05, accumulate=2)
TWO_EPOCHS = Run(steps=3, clip_val=0.05)


class HeldGPT(BatchLossGPT):
    """Also records the elements this rank holds once cut, and whether the module is whole after fit."""

    def on_train_start(self):
        self.held = sum(p.numel() for p in self.parameters())

    def on_fit_end(self):
        self.whole_after_fit = not any(type(m).__name__.endswith("2D") for m in self.modules()) and any(
            isinstance(m, nn.Linear) for m in self.modules())


def _train(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    trainers: list = []
    out = {"fit": fit(RUN, TensorParallel2DStrategy(), world, 1, module_class=HeldGPT, trainers=trainers)}
    module = trainers[0].lightning_module
    out["held"], out["whole_after_fit"] = module.held, module.whole_after_fit
    path = os.path.join(tmpdir, "tp2d.ckpt")
    out["first_epoch"] = fit(TWO_EPOCHS, TensorParallel2DStrategy(), world, 1, module_class=BatchLossGPT,
                             save_to=path, max_epochs=1)
    out["resumed"] = fit(TWO_EPOCHS, TensorParallel2DStrategy(), world, 1, module_class=BatchLossGPT,
                         ckpt_path=path, max_epochs=2)
    out["from_one_process"] = fit(TWO_EPOCHS, TensorParallel2DStrategy(), world, 1, module_class=BatchLossGPT,
                                  max_epochs=2, ckpt_path=os.path.join(tmpdir, "one_process.ckpt"))
    return out


def _reference(run: Run, data: int, **kw) -> list[float]:
    return fit(run, "auto", 1, data, module_class=BatchLossGPT, **kw)


@pytest.mark.timeout(600)
def test_tp2d_on_a_2x2_grid_matches_one_process(tmp_path):
    _reference(TWO_EPOCHS, 1, max_epochs=1, save_to=str(tmp_path / "one_process.ckpt"))
    per_rank = run_on_ranks(_train, 4, free_port(), str(tmp_path))
    reference = _reference(RUN, 1)
    for r in per_rank:  # every rank computes the whole loss
        assert relative_gap(r["fit"], reference) <= TOL, (r["fit"], reference)
        assert r["whole_after_fit"]
    # Parity is not proof of parallelism: every weight matrix is 1/4 per rank, the vectors 1/2.
    full = sum(p.numel() for p in BatchLossGPT().parameters())
    assert per_rank[0]["held"] < full / 3, (per_rank[0]["held"], full)

    uninterrupted = _reference(TWO_EPOCHS, 1, max_epochs=2)
    first, resumed = per_rank[0]["first_epoch"], per_rank[0]["resumed"]
    assert relative_gap(first + resumed, uninterrupted) <= TOL, (first, resumed, uninterrupted)
    assert relative_gap(per_rank[0]["from_one_process"], uninterrupted[TWO_EPOCHS.steps:]) <= TOL
    plain = tmp_path / "tp2d_consolidated.ckpt"
    consolidate(tmp_path / "tp2d.ckpt", plain)
    in_one_process = _reference(TWO_EPOCHS, 1, max_epochs=2, ckpt_path=str(plain))
    assert relative_gap(in_one_process, uninterrupted[TWO_EPOCHS.steps:]) <= TOL, in_one_process


# hybrid with the 2D tensor axis on 8 ranks: (arguments, run, data-parallel size)
HYBRID_2D = {
    "d2_t4": (dict(tensor_mode="2d", tensor_size=4), RUN, 2),
    "d2_t4_zero2": (dict(tensor_mode="2d", tensor_size=4, zero_stage=2), RUN, 2),
    "p2_t4": (dict(tensor_mode="2d", tensor_size=4, pipeline_size=2, microbatches=2),
              Run(steps=6, clip_val=0.05, module_kwargs={"n_layer": 4}), 1),
    # 2.5D (Tesseract): two stacked 2 x 2 grids, each with every weight and half of the 4 samples
    "t8_2p5d": (dict(tensor_mode="2.5d", depth=2, tensor_size=8), RUN, 1),
}


def _train_hybrid(rank: int, world: int, port: int) -> dict:
    _as_external_rank(rank, world, port)
    out = {name: fit(run, HybridParallelStrategy(**arguments), world, data, module_class=BatchLossGPT)
           for name, (arguments, run, data) in HYBRID_2D.items()}
    if importlib.util.find_spec("transformers") is not None:
        from test_pipeline_hf import PipelinedHF

        out["hf_llama_2p5d"] = fit(HF_RUN, TensorParallel2p5DStrategy(), world, 1, module_class=PipelinedHF)
    return out


HF_RUN = Run(steps=3, module_kwargs={"arch": "llama"})


@pytest.mark.timeout(600)
def test_tp2d_composed_and_tp2p5d_on_8_ranks_match_one_process():
    """Data 2 x tp2d 4 (buckets, and ZeRO-2 over the data axis), pipeline 2 x tp2d 4, and tp2.5d (2 x 2 x 2) on
    the demo GPT and a Hugging Face Llama."""
    per_rank = run_on_ranks(_train_hybrid, 8, free_port())
    for name, (arguments, run, data) in HYBRID_2D.items():
        replicas = [d * 8 // data for d in range(data)]  # data is the outermost axis
        ours = global_losses([r[name] for r in per_rank], data, ranks=replicas)
        assert relative_gap(ours, _reference(run, data)) <= TOL, (name, ours)
    # A Hugging Face Llama under tp2.5d (two layers of 2 x 2, the preset's defaults)
    pytest.importorskip("transformers")
    from test_pipeline_hf import PipelinedHF

    reference = fit(HF_RUN, "auto", 1, 1, module_class=PipelinedHF)
    for r in per_rank:
        assert relative_gap(r["hf_llama_2p5d"], reference) <= TOL, (r["hf_llama_2p5d"], reference)


def test_sizes_the_grid_cannot_take_are_refused_with_what_would_work():
    assert "square number of tensor ranks (q*q: 1, 4, 9, 16, ...); got tensor=2" in error_message(
        lambda: TensorParallel2DStrategy(tensor_size=2).topology_for(4))
    assert "tensor could be 2, 8, 18, 32" in error_message(
        lambda: TensorParallel2p5DStrategy(tensor_size=4, depth=2).topology_for(4))
    assert TensorParallel2p5DStrategy().topology_for(8).tensor == 8  # 2 layers of 2 x 2
    assert "depth=2 stacks the grids" in error_message(lambda: HybridParallelStrategy(tensor_mode="2d", depth=2))
    assert TensorParallel2DStrategy().topology_for(8).tensor == 4
    assert TensorParallel2DStrategy().topology_for(2).tensor == 1


def _train_hf(rank: int, world: int, port: int) -> dict:
    from test_pipeline_hf import PipelinedHF

    _as_external_rank(rank, world, port)
    return {arch: fit(Run(steps=3, module_kwargs={"arch": arch}), TensorParallel2DStrategy(), world, 1,
                      module_class=PipelinedHF) for arch in HF_ARCHS}


HF_ARCHS = ("llama", "gpt2")


@pytest.mark.timeout(600)
def test_hugging_face_models_under_tp2d_match_one_process():
    pytest.importorskip("transformers")
    from test_pipeline_hf import PipelinedHF

    per_rank = run_on_ranks(_train_hf, 4, free_port())
    for arch in HF_ARCHS:
        reference = fit(Run(steps=3, module_kwargs={"arch": arch}), "auto", 1, 1, module_class=PipelinedHF)
        assert reference[-1] < reference[0]
        for r in per_rank:
            assert relative_gap(r[arch], reference) <= TOL, (arch, r[arch], reference)


@pytest.mark.timeout(400)
def test_the_recipe_trains_through_the_cli(tmp_path):
    """recipes/tp2d.yaml through `lightning-par fit` (popen launcher, 4 ranks), shortened: the plan is logged, the
    loss falls, and the sharded checkpoint written during fit consolidates into the plain demo module."""
    from helpers import run_recipe
    from lightning_par.checkpoint import load_full
    from lightning_par.demo import DemoGPT

    output, losses, root = run_recipe("tp2d", tmp_path)
    assert "tp2d plan on a 2 x 2 grid" in output and "model.lm_head: Output2D" in output
    assert len(losses) >= 5 and losses[-1] < losses[0]
    full = load_full(next(root.rglob("last.ckpt")))
    model = DemoGPT(**{k: v for k, v in full["hyper_parameters"].items() if not k.startswith("_")})
    model.load_state_dict(full["state_dict"], strict=True)


def test_a_linear_the_plan_does_not_name_is_refused_before_anything_is_cut():
    from torch import nn as _nn

    from lightning_par.comm.summa import Grid2D
    from lightning_par.tensor.plan_2d import parallelize_2d

    module = BatchLossGPT()
    module.extra = _nn.Linear(32, 32)  # a head of its own, outside any block the plan knows
    before = {name: type(m) for name, m in module.named_modules()}
    message = error_message(lambda: parallelize_2d(module, Grid2D(row_group=None, col_group=None)))
    assert "the linear layer 'extra' is not part of an attention or MLP block" in message and "'1d'" in message
    assert {name: type(m) for name, m in module.named_modules()} == before  # untouched
