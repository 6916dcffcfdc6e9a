"""ZeRO stages 1-3 through Lightning on gloo CPU ranks: parity with one process, bytes held per rank, sharded
checkpoints across world sizes and strategies, consolidation, and the errors for bad input.

Chunks are made small (CHUNK elements) so that the tiny GPT spans many chunks, parameters are cut across ranks and
chunk boundaries, and stage 3's gather / release / prefetch really runs per chunk.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_par  # noqa: F401
from helpers import free_port, run_on_ranks
from lightning_par import ZeroStrategy
from lightning_par.checkpoint import load_full
from lightning_par.checkpoint import main as consolidate_command
from parity import BuildsInConfigureModel, RecordingGPT, Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

CHUNK = 3000  # elements; the tiny GPT has ~27k parameters
TOL, ADAM_TOL = 1e-5, 1e-4

PARITY = {
    "plain": Run(steps=6),
    "accumulate": Run(steps=4, accumulate=2),
    "clip_norm": Run(steps=6, clip_val=0.05),
    "adamw": Run(steps=6, module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3}),
}
# Further Lightning features, each under one stage (they share the code path of every stage).
FEATURES = {
    "scheduler": (1, Run(steps=6, module_kwargs={"scheduler": True})),
    "clip_value": (2, Run(steps=6, clip_val=0.002, clip_algorithm="value")),
    "manual_two_optimizers": (3, Run(steps=6, module_kwargs={"manual": True, "two_optimizers": True})),
    "unfreeze_during_fit": (2, Run(steps=6, module_kwargs={"unfreeze_at": 3})),
}
BF16 = Run(steps=6, precision="bf16-mixed")
# Save/resume across world sizes keeps the global batch (16) fixed: per-rank batch = 16 / world size.
GLOBAL_BATCH = 16


class MemoryAtTrainEnd(Callback):
    """Bytes held per rank after the last step, read before teardown gives the module its whole parameters back."""

    def __init__(self):
        self.report = None

    def on_train_end(self, trainer, pl_module):
        self.report = trainer.strategy.memory_report()


def zero(stage: int, **kwargs) -> ZeroStrategy:
    return ZeroStrategy(stage=stage, chunk_size=CHUNK, **kwargs)


def resume_run(world_size: int) -> Run:
    return Run(steps=4, epochs=2, per_rank_batch=GLOBAL_BATCH // world_size)


def _parity_and_memory(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    out: dict = {"memory": {}}
    for stage in (1, 2, 3):
        for name, run in PARITY.items():
            memory = MemoryAtTrainEnd()
            out[(stage, name)] = fit(run, zero(stage), world_size, world_size, callbacks=[memory])
            if name == "plain":
                out["memory"][stage] = memory.report
    for name, (stage, run) in FEATURES.items():
        out[(stage, name)] = fit(run, zero(stage), world_size, world_size)
    # ZeRO-Offload (masters, gradients, optimizer state and step on the host): on CPU ranks the copies are local,
    # the code path (pinned-host buffers, fused CPU AdamW, norm reduced on the device) is the same.
    for name in ("accumulate", "clip_norm", "adamw"):
        out[("offload", name)] = fit(PARITY[name], zero(2, offload=1.0), world_size, world_size)
    # Stage 3 without resharding after forward and without prefetch: the other code path of gather/release.
    out[(3, "no_reshard")] = fit(PARITY["plain"], zero(3, reshard_after_forward=False, prefetch=False), world_size,
                                 world_size)
    # Gradients reduced in the compute dtype (bf16 under bf16-mixed), as Lightning's fsdp does: half the bytes.
    trainers: list = []
    out[(2, "bf16_reduce")] = fit(BF16, zero(2, reduce_dtype="compute"), world_size, world_size, trainers=trainers)
    out["bf16_reduce_dtype"] = trainers[0].strategy.engine.policy.reduce_dtype
    return out


def _checkpoints(rank: int, world_size: int, port: int, tmpdir: str, resume_from: list[str]) -> dict:
    """Write one-epoch checkpoints at this world size, and resume the ones written at another."""
    _as_external_rank(rank, world_size, port)
    run = resume_run(world_size)
    out = {}
    out["uninterrupted"] = fit(run, zero(3), world_size, world_size)
    for stage in (1, 3):
        path = os.path.join(tmpdir, f"zero{stage}_world{world_size}")
        out[f"first_epoch_zero{stage}"] = fit(run, zero(stage), world_size, world_size, save_to=path, max_epochs=1)
    for path in resume_from:
        # ZeRO-1 shards resume under ZeRO-3 and the reverse, at this world size.
        strategy = zero(3) if "zero1" in path else zero(1)
        out[f"resumed:{os.path.basename(path)}"] = fit(run, strategy, world_size, world_size, ckpt_path=path,
                                                        max_epochs=2)
        # A strategy holding whole parameters reads the shards too.
        out[f"dp_resumed:{os.path.basename(path)}"] = fit(run, "dp", world_size, world_size, ckpt_path=path,
                                                           max_epochs=2)
    # And ZeRO reads a plain Lightning checkpoint written by dp.
    dp_file = os.path.join(tmpdir, f"dp_world{world_size}.ckpt")
    fit(run, "dp", world_size, world_size, save_to=dp_file, max_epochs=1)
    out["zero3_from_dp"] = fit(run, zero(3), world_size, world_size, ckpt_path=dp_file, max_epochs=2)
    return out


class ConfiguredGPT(BuildsInConfigureModel, RecordingGPT):
    pass


def _meta_init(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    """Stage 3 from a model that never existed whole: built on the meta device, weights from a dp checkpoint."""
    _as_external_rank(rank, world_size, port)
    run = resume_run(world_size)
    dp_file = os.path.join(tmpdir, "dp_for_meta.ckpt")
    fit(run, "dp", world_size, world_size, save_to=dp_file, max_epochs=1)
    out = {"dp": fit(run, "dp", world_size, world_size, ckpt_path=dp_file, max_epochs=2)}
    memory = MemoryAtTrainEnd()
    out["init_module"] = fit(run, zero(3), world_size, world_size, ckpt_path=dp_file, max_epochs=2, empty_init=True,
                             callbacks=[memory])
    out["at_rest"] = memory.report["parameters"]
    trainers: list = []
    out["configure_model"] = fit(run, zero(3), world_size, world_size, ckpt_path=dp_file, max_epochs=2,
                                 module_class=ConfiguredGPT, trainers=trainers)
    out["built_on_meta"] = trainers[0].lightning_module.built_on_meta
    return out


def _bad_input(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    errors = {}

    class LBFGSModule(RecordingGPT):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    from lightning.pytorch import Trainer

    def attempt(key, make):
        try:
            make()
        except Exception as error:  # noqa: BLE001 - the test inspects the message
            errors[key] = f"{type(error).__name__}: {error}"

    loader = torch.utils.data.DataLoader(Run(steps=2).dataset(world_size), batch_size=4)
    trainer_kwargs = dict(accelerator="cpu", devices=world_size, max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    attempt("optimizer", lambda: Trainer(strategy=zero(2), **trainer_kwargs).fit(LBFGSModule(), loader))
    attempt("oversize", lambda: Trainer(strategy=ZeroStrategy(stage=2, chunk_size=100, allow_oversize=False),
                                        **trainer_kwargs).fit(RecordingGPT(), loader))
    saved = os.path.join(tmpdir, "zero1_small")
    fit(Run(steps=2), zero(1), world_size, world_size, save_to=saved)
    before = sorted(os.listdir(saved))
    attempt("other_model", lambda: Trainer(strategy=zero(2), **trainer_kwargs).fit(
        RecordingGPT(n_embd=48), loader, ckpt_path=saved))
    errors["checkpoint_untouched"] = sorted(os.listdir(saved)) == before
    return errors


def test_zero_matches_single_process_and_shards_memory(tmp_path):
    for world_size in (2, 4):
        per_rank = run_on_ranks(_parity_and_memory, world_size, free_port(), str(tmp_path))
        for name, run in PARITY.items():
            reference = fit(run, "auto", devices=1, data_parallel=world_size)
            assert reference[-1] < reference[0]
            tol = ADAM_TOL if name == "adamw" else TOL
            for stage in (1, 2, 3):
                ours = global_losses([r[(stage, name)] for r in per_rank], world_size)
                assert relative_gap(ours, reference) <= tol, (world_size, stage, name, ours, reference)
        for name in ("accumulate", "clip_norm", "adamw"):
            reference = fit(PARITY[name], "auto", devices=1, data_parallel=world_size)
            ours = global_losses([r[("offload", name)] for r in per_rank], world_size)
            assert relative_gap(ours, reference) <= (ADAM_TOL if name == "adamw" else TOL), ("offload", name)
        for name, (stage, run) in FEATURES.items():
            reference = fit(run, "auto", devices=1, data_parallel=world_size)
            ours = global_losses([r[(stage, name)] for r in per_rank], world_size)
            assert relative_gap(ours, reference) <= TOL, (world_size, stage, name, ours, reference)
        reference = fit(PARITY["plain"], "auto", devices=1, data_parallel=world_size)
        ours = global_losses([r[(3, "no_reshard")] for r in per_rank], world_size)
        assert relative_gap(ours, reference) <= TOL
        reference = fit(BF16, "auto", devices=1, data_parallel=world_size)
        ours = global_losses([r[(2, "bf16_reduce")] for r in per_rank], world_size)
        assert relative_gap(ours, reference) <= 2e-2 and all(r["bf16_reduce_dtype"] == torch.bfloat16 for r in per_rank)
        _check_memory([r["memory"] for r in per_rank], world_size)


def _check_memory(memory: list[dict], world_size: int) -> None:
    """Bytes per rank after a step (fp32, SGD with momentum), against the full model's size P*4."""
    full = 4 * sum(p.numel() for p in RecordingGPT().parameters())
    slack = 4 * CHUNK  # padding: at most world_size-1 elements per chunk, and chunks of ~CHUNK elements
    shard = full / world_size
    for per_rank in memory:
        s1, s2, s3 = per_rank[1], per_rank[2], per_rank[3]
        for stage in (s1, s2, s3):  # every stage shards the optimizer state (momentum buffers)
            assert abs(stage["optimizer_state"] - shard) <= slack, stage
        assert abs(s1["gradients"] - (full + shard)) <= 2 * slack  # full gradient buffers + shard gradients
        assert abs(s2["gradients"] - shard) <= slack and abs(s3["gradients"] - shard) <= slack
        assert abs(s1["parameters"] - full) <= slack and abs(s2["parameters"] - full) <= slack
        assert abs(s3["parameters"] - shard) <= slack  # at rest: only the fp32 master shard


def test_zero_checkpoints_across_world_sizes_and_strategies(tmp_path):
    run_on_ranks(_checkpoints, 2, free_port(), str(tmp_path), [])  # writes the world-2 checkpoints
    four = run_on_ranks(_checkpoints, 4, free_port(), str(tmp_path),
                        [str(tmp_path / "zero1_world2"), str(tmp_path / "zero3_world2")])
    back = run_on_ranks(_checkpoints, 2, free_port(), str(tmp_path),
                        [str(tmp_path / "zero1_world4"), str(tmp_path / "zero3_world4")])
    steps = resume_run(2).steps
    for results, world_size, source in ((four, 4, "world2"), (back, 2, "world4")):
        uninterrupted = global_losses([r["uninterrupted"] for r in results], world_size)
        for stage in (1, 3):
            first = global_losses([r[f"first_epoch_zero{stage}"] for r in results], world_size)
            assert relative_gap(first, uninterrupted[:steps]) <= TOL
            for prefix in ("resumed", "dp_resumed"):
                resumed = global_losses([r[f"{prefix}:zero{stage}_{source}"] for r in results], world_size)
                assert len(resumed) == steps
                assert relative_gap(resumed, uninterrupted[steps:]) <= TOL, (prefix, stage, source)
        from_dp = global_losses([r["zero3_from_dp"] for r in results], world_size)
        assert relative_gap(from_dp, uninterrupted[steps:]) <= TOL

    # Consolidation: one plain file that a fresh module loads strictly, without lightning_par.
    out = tmp_path / "consolidated.ckpt"
    consolidate_command([str(tmp_path / "zero3_world4"), str(out)])  # lightning-par-consolidate DIR OUT
    module = RecordingGPT()
    state = torch.load(out, weights_only=False)
    module.load_state_dict(state["state_dict"], strict=True)
    assert module.model.wte.weight is module.model.lm_head.weight  # tied weights stay tied
    assert state["epoch"] == 1 and state["global_step"] == steps  # saved after the first epoch
    full = load_full(tmp_path / "zero1_world2")
    assert set(full["state_dict"]) == set(RecordingGPT().state_dict())


def test_zero_bad_input_gets_clear_errors(tmp_path):
    errors = run_on_ranks(_bad_input, 2, free_port(), str(tmp_path))
    for e in errors:
        assert "cannot shard the optimizer LBFGS" in e["optimizer"] and "AdamW" in e["optimizer"]
        assert "more than chunk_numel=100" in e["oversize"] and "chunk_numel >=" in e["oversize"]
        assert "different model" in e["other_model"]
        assert e["checkpoint_untouched"]


def test_zero_strategy_constructs_without_arguments():
    from lightning.pytorch.strategies import StrategyRegistry

    assert ZeroStrategy().policy.stage == 2
    assert {"zero1", "zero2", "zero3", "zero2_offload"} <= set(StrategyRegistry)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        ZeroStrategy(stage=4)
    with pytest.raises(RuntimeError, match="exists once"):
        ZeroStrategy().engine
    from lightning.pytorch import Trainer

    for stage, empty_init, meta in ((3, True, True), (3, None, False), (2, True, False)):
        trainer = Trainer(strategy=ZeroStrategy(stage=stage), accelerator="cpu", devices=2, logger=False)
        with trainer.init_module(empty_init=empty_init):
            module = RecordingGPT()
        assert module.model.wte.weight.is_meta is meta, (stage, empty_init)


def test_zero3_builds_from_the_meta_device(tmp_path):
    results = run_on_ranks(_meta_init, 2, free_port(), str(tmp_path))
    reference = global_losses([r["dp"] for r in results], 2)
    for key in ("init_module", "configure_model"):
        assert relative_gap(global_losses([r[key] for r in results], 2), reference) <= TOL, key
    full = 4 * sum(p.numel() for p in RecordingGPT().parameters())
    for r in results:
        assert r["built_on_meta"] is True
        assert abs(r["at_rest"] - full / 2) <= 4 * CHUNK  # only the fp32 master shard at rest


def test_zero3_through_spawn_launcher_leaves_a_whole_module(tmp_path):
    """Lightning's spawn launcher copies rank 0's weights back after fit: the module must be whole by then."""
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from test_dp import SaveLosses

    run = Run(steps=4)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=ZeroStrategy(stage=3, chunk_size=CHUNK,
                                                                          start_method="spawn"),
                      max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[SaveLosses(str(tmp_path))])
    seed_everything(0, verbose=False)
    module = RecordingGPT()
    trainer.fit(module, DataLoader(run.dataset(2), batch_size=run.per_rank_batch))
    ours = global_losses([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], 2)
    assert relative_gap(ours, fit(run, "auto", devices=1, data_parallel=2)) <= TOL
    x = torch.randint(0, 32, (2, 16))
    assert torch.isfinite(module(x)).all()  # trained weights, readable, in the main process
    assert module.model.wte.weight.dtype == torch.float32 and module.model.wte.weight is module.model.lm_head.weight


def test_zero3_at_world_size_one_leaves_the_trained_module_on_the_masters():
    # At world size 1 each master is a whole chunk: teardown makes the parameters its views (no second copy of the
    # model, which at 10B on one GPU took ~20 GiB of host memory) and they hold exactly the trained weights.
    run = Run(steps=4)
    reference_trainers: list = []  # dp at world size 1 is plain training, with the same sampler as ZeRO gets
    fit(run, "dp", devices=1, data_parallel=1, trainers=reference_trainers)
    expected = reference_trainers[0].lightning_module.state_dict()
    for strategy in (zero(3), zero(3, offload=0.5)):
        trainers: list = []
        fit(run, strategy, devices=1, data_parallel=1, trainers=trainers)
        module, engine = trainers[0].lightning_module, trainers[0].strategy.engine
        got = module.state_dict()
        assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
        masters = {c.master.untyped_storage().data_ptr() for c in engine.chunks}
        assert all(p.untyped_storage().data_ptr() in masters for p in module.parameters())
    # What teardown would allocate on the host for an engine on another device (the check before it, which refuses
    # a teardown the host cannot hold): nothing where the masters lie there already, else every chunk in fp32.
    engine.device = torch.device("meta")
    assert engine.unshard_bytes(torch.device("cpu")) == 0
    engine.world_size = 2
    assert engine.unshard_bytes(torch.device("cpu")) == 4 * sum(c.padded for c in engine.chunks)
