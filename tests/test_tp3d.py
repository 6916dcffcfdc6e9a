"""``tp3d`` through Lightning on 8 gloo ranks (one 2 x 2 x 2 cube): parity with one process (fp32, SGD, clipping by
norm, accumulation) on the demo GPT and Hugging Face Llama and GPT-2, the bytes each rank holds, checkpoints to and
from one process and across to ``tp2.5d``, ``hybrid`` with ``tensor_mode="3d"``, and the module whole after fit.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

from helpers import error_message, free_port, run_on_ranks
from lightning_par import HybridParallelStrategy, TensorParallel2p5DStrategy, TensorParallel3DStrategy
from lightning_par.checkpoint import consolidate
from parity import BatchLossGPT, Run, fit, relative_gap
from test_dp import _as_external_rank

TOL = 1e-5
RUN = Run(steps=6, clip_val=0.05, accumulate=2)
TWO_EPOCHS = Run(steps=3, clip_val=0.05)
HF_ARCHS = ("llama", "gpt2")


class HeldGPT(BatchLossGPT):
    """Also records the elements this rank holds once cut, and whether the module is whole after fit."""

    def on_train_start(self):
        self.held = sum(p.numel() for p in self.parameters())

    def on_fit_end(self):
        self.whole_after_fit = not any(type(m).__name__.endswith("3D") for m in self.modules()) and any(
            isinstance(m, nn.Linear) for m in self.modules())


def _train(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    trainers: list = []
    out = {"fit": fit(RUN, TensorParallel3DStrategy(), world, 1, module_class=HeldGPT, trainers=trainers)}
    module = trainers[0].lightning_module
    out["held"], out["whole_after_fit"] = module.held, module.whole_after_fit
    out["hybrid"] = fit(RUN, HybridParallelStrategy(tensor_mode="3d", tensor_size=8), world, 1,
                        module_class=BatchLossGPT)
    path = os.path.join(tmpdir, "tp3d.ckpt")
    out["first_epoch"] = fit(TWO_EPOCHS, TensorParallel3DStrategy(), world, 1, module_class=BatchLossGPT,
                             save_to=path, max_epochs=1)
    out["resumed"] = fit(TWO_EPOCHS, TensorParallel3DStrategy(), world, 1, module_class=BatchLossGPT,
                         ckpt_path=path, max_epochs=2)
    # Across to tp2.5d (two layers of 2 x 2, each holding every weight block) and back: a save where every piece
    # is held by two ranks.
    stacked = os.path.join(tmpdir, "tp2p5d.ckpt")
    out["resumed_under_2p5d"] = fit(TWO_EPOCHS, TensorParallel2p5DStrategy(), world, 1, module_class=BatchLossGPT,
                                    ckpt_path=path, max_epochs=2, save_to=stacked)
    out["back_from_2p5d"] = fit(TWO_EPOCHS, TensorParallel3DStrategy(), world, 1, module_class=BatchLossGPT,
                                ckpt_path=stacked, max_epochs=3)
    out["from_one_process"] = fit(TWO_EPOCHS, TensorParallel3DStrategy(), world, 1, module_class=BatchLossGPT,
                                  max_epochs=2, ckpt_path=os.path.join(tmpdir, "one_process.ckpt"))
    if importlib.util.find_spec("transformers") is not None:
        from test_pipeline_hf import PipelinedHF

        for arch in HF_ARCHS:
            out[arch] = fit(Run(steps=3, module_kwargs={"arch": arch}), TensorParallel3DStrategy(), world, 1,
                            module_class=PipelinedHF)
    return out


def _reference(run: Run, **kw) -> list[float]:
    return fit(run, "auto", 1, 1, module_class=BatchLossGPT, **kw)


@pytest.mark.timeout(900)
def test_tp3d_on_a_2x2x2_cube_matches_one_process(tmp_path):
    _reference(TWO_EPOCHS, max_epochs=1, save_to=str(tmp_path / "one_process.ckpt"))
    per_rank = run_on_ranks(_train, 8, free_port(), str(tmp_path))
    reference = _reference(RUN)
    for r in per_rank:  # every rank computes the whole loss
        assert relative_gap(r["fit"], reference) <= TOL, (r["fit"], reference)
        assert relative_gap(r["hybrid"], reference) <= TOL, (r["hybrid"], reference)
        assert r["whole_after_fit"]
    # Parity is not proof of parallelism: every weight matrix and position table is 1/8 per rank, the vectors 1/2.
    full = BatchLossGPT()
    matrices = sum(p.numel() for p in full.parameters() if p.dim() == 2)
    vectors = sum(p.numel() for p in full.parameters() if p.dim() == 1)
    assert per_rank[0]["held"] == matrices // 8 + vectors // 2, (per_rank[0]["held"], matrices, vectors)

    uninterrupted = _reference(TWO_EPOCHS, max_epochs=3)
    first = per_rank[0]["first_epoch"]
    for name in ("resumed", "resumed_under_2p5d"):
        assert relative_gap(first + per_rank[0][name], uninterrupted[:6]) <= TOL, (name, first, per_rank[0][name])
    chain = first + per_rank[0]["resumed_under_2p5d"] + per_rank[0]["back_from_2p5d"]
    assert relative_gap(chain, uninterrupted) <= TOL, chain
    assert relative_gap(per_rank[0]["from_one_process"], uninterrupted[3:6]) <= TOL
    plain = tmp_path / "tp3d_consolidated.ckpt"
    consolidate(tmp_path / "tp3d.ckpt", plain)
    in_one_process = _reference(TWO_EPOCHS, max_epochs=2, ckpt_path=str(plain))
    assert relative_gap(in_one_process, uninterrupted[3:6]) <= TOL, in_one_process

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: the Hugging Face models were not run")
    from test_pipeline_hf import PipelinedHF

    for arch in HF_ARCHS:
        hf_reference = fit(Run(steps=3, module_kwargs={"arch": arch}), "auto", 1, 1, module_class=PipelinedHF)
        assert hf_reference[-1] < hf_reference[0]
        for r in per_rank:
            assert relative_gap(r[arch], hf_reference) <= TOL, (arch, r[arch], hf_reference)


def test_sizes_the_cube_cannot_take_are_refused_with_what_would_work():
    assert "cube number of tensor ranks (q*q*q: 1, 8, 27, 64, ...); got tensor=4" in error_message(
        lambda: TensorParallel3DStrategy(tensor_size=4).topology_for(8))
    assert TensorParallel3DStrategy().topology_for(8).tensor == 8
    assert TensorParallel3DStrategy().topology_for(16).tensor == 8  # the cube, and data 2
    assert TensorParallel3DStrategy().topology_for(4).tensor == 1
    assert HybridParallelStrategy(tensor_mode="3d", pipeline_size=2).topology_for(16).tensor == 8
    # 2.5D with one grid in the stack is 2D: refused with the way out
    assert "use tp2d" in error_message(lambda: TensorParallel2p5DStrategy(depth=1))
    assert "tensor_mode='2d' for one grid" in error_message(lambda: HybridParallelStrategy(tensor_mode="2.5d"))


def test_widths_the_cube_does_not_divide_are_refused_before_anything_is_cut():
    from lightning_par.comm.cube import Grid3D
    from lightning_par.tensor.plan_2d import parallelize_2d

    class CubeOf2(Grid3D):
        q = 2  # the sizes of a 2 x 2 x 2 cube: the plan's width check runs before any collective

    module = BatchLossGPT(n_embd=36, n_head=2)  # 36: q*q divides it, q*q*q (the position table's cut) does not
    before = {name: p.clone() for name, p in module.named_parameters()}
    message = error_message(lambda: parallelize_2d(module, CubeOf2(None, None, None, None, None)))
    assert "model.wpe (embedding_dim=36, by q*q*q=8)" in message, message
    assert not any(type(m).__name__.endswith("3D") for m in module.modules())
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]), name


def test_the_default_cube_is_one_the_model_fits():
    # n_embd 36: heads (2) and widths divide by q = 2, but the position table (36) does not divide by q^3 = 8.
    strategy = TensorParallel3DStrategy()
    strategy._lightning_module = BatchLossGPT(n_embd=36, n_head=2)
    assert strategy.topology_for(8).tensor == 1
    strategy = TensorParallel3DStrategy()
    strategy._lightning_module = BatchLossGPT()
    assert strategy.topology_for(8).tensor == 8
