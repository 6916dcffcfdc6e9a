"""Chunk placement across device and host (``zero3_offload``, fixed fractions, the automatic plan) on gloo CPU ranks.

On CPU the host and the device are the same memory, but the code paths are the ones a GPU takes: each chunk's
master, gradient shard and optimizer state are separate host tensors for offloaded chunks, the fused CPU AdamW is
set, the automatic plan re-plans after the first backward and moves chunks (with their optimizer state when a
checkpoint was loaded first), and a plan that needs more host memory than allowed is refused on every rank.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from lightning.pytorch.callbacks import Callback

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import error_message, free_port, run_on_ranks, run_recipe
from lightning_par import ZeroStrategy
from lightning_par.zero.placement import Plan, host_shortfall_message, plan_budget, plan_fraction, spill_to_disk
from parity import Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

from test_zero import ADAM_TOL, CHUNK, PARITY, TOL  # the ZeRO tests' runs: plain, accumulation, clipping, AdamW
# "auto" on CPU needs a device budget to plan against: with this one the first step runs with about half of each
# rank's chunks on the host (half the budget, Adam's 16 bytes per element assumed), and the measured plan moves
# chunks back (SGD with momentum needs 12 bytes per element, AdamW 16: some stay on the host).
AUTO_LIMIT = 200_000
GLOBAL_BATCH = 16


class Placement(Callback):
    """The engine's placement after the last step (before teardown makes the module whole again)."""

    def __init__(self):
        self.summary = None

    def on_train_end(self, trainer, pl_module):
        self.summary = trainer.strategy.engine.placement_summary()


def offload(stage: int = 3, **kwargs) -> ZeroStrategy:
    return ZeroStrategy(stage=stage, chunk_size=CHUNK, **kwargs)


def _train(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    out: dict = {}
    for name, run in PARITY.items():
        placement = Placement()
        out[("half", name)] = fit(run, offload(offload=0.5), world_size, world_size, callbacks=[placement])
        out[("half", name, "summary")] = placement.summary
        placement = Placement()
        out[("auto", name)] = fit(run, offload(offload="auto", device_memory_limit=AUTO_LIMIT), world_size,
                                  world_size, callbacks=[placement])
        out[("auto", name, "summary")] = placement.summary
    out[("stage2_half", "accumulate")] = fit(PARITY["accumulate"], offload(2, offload=0.5), world_size, world_size)

    # Checkpoints: offloaded shards resume without offload, and a zero3 checkpoint resumes under "auto", whose
    # re-plan then moves chunks together with the optimizer state just loaded.
    run = Run(steps=4, epochs=2, per_rank_batch=GLOBAL_BATCH // world_size,
              module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3})
    out["uninterrupted"] = fit(run, offload(), world_size, world_size)
    half_path = os.path.join(tmpdir, "offload_half")
    out["first_epoch"] = fit(run, offload(offload=0.5), world_size, world_size, save_to=half_path, max_epochs=1)
    out["resumed_without_offload"] = fit(run, offload(), world_size, world_size, ckpt_path=half_path, max_epochs=2)
    plain_path = os.path.join(tmpdir, "zero3")
    fit(run, offload(), world_size, world_size, save_to=plain_path, max_epochs=1)
    out["resumed_auto"] = fit(run, offload(offload="auto", device_memory_limit=AUTO_LIMIT), world_size, world_size,
                              ckpt_path=plain_path, max_epochs=2)

    # A host-memory limit that cannot hold the plan: a clear error on every rank, the checkpoint untouched.
    before = sorted(os.listdir(half_path))
    try:
        fit(run, offload(offload=1.0, host_memory_limit=10_000), world_size, world_size, ckpt_path=half_path,
            max_epochs=2)
        out["host_error"] = None
    except Exception as error:  # noqa: BLE001 - the test inspects the message
        out["host_error"] = f"{type(error).__name__}: {error}"
    out["checkpoint_untouched"] = sorted(os.listdir(half_path)) == before

    # The same at the automatic plan's re-plan: its first step holds no optimizer state on the host (8 bytes per
    # element), and a limit of 12 fits that but not AdamW's 16 once measured (no device budget: all on the host).
    summary = out[("auto", "adamw", "summary")]
    per_rank = (summary["host_bytes"] + summary["device_bytes"]) // 16  # elements
    try:
        fit(PARITY["adamw"], offload(offload="auto", device_memory_limit=1, host_memory_limit=12 * per_rank),
            world_size, world_size)
        out["replan_error"] = None
    except Exception as error:  # noqa: BLE001 - the test inspects the message
        out["replan_error"] = f"{type(error).__name__}: {error}"
    return out


def _resume_at_four(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    """The world-2 offloaded checkpoint at world size 4: under the automatic plan and with NVMe spilling."""
    _as_external_rank(rank, world_size, port)
    run = Run(steps=4, epochs=2, per_rank_batch=GLOBAL_BATCH // world_size,
              module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3})
    half_path = os.path.join(tmpdir, "offload_half")
    return {
        "auto": fit(run, offload(offload="auto", device_memory_limit=AUTO_LIMIT // 2), world_size, world_size,
                    ckpt_path=half_path, max_epochs=2),
        "nvme": fit(run, offload(offload=1.0, nvme_dir=os.path.join(tmpdir, "nvme4"), host_memory_limit=100_000),
                    world_size, world_size, ckpt_path=half_path, max_epochs=2),
    }


def test_offload_matches_single_process_and_places_chunks(tmp_path):
    world_size = 2
    per_rank = run_on_ranks(_train, world_size, free_port(), str(tmp_path))
    for name, run in PARITY.items():
        reference = fit(run, "auto", devices=1, data_parallel=world_size)
        tol = ADAM_TOL if name == "adamw" else TOL
        for placement in ("half", "auto"):
            ours = global_losses([r[(placement, name)] for r in per_rank], world_size)
            assert relative_gap(ours, reference) <= tol, (placement, name, ours, reference)
    reference = fit(PARITY["accumulate"], "auto", devices=1, data_parallel=world_size)
    ours = global_losses([r[("stage2_half", "accumulate")] for r in per_rank], world_size)
    assert relative_gap(ours, reference) <= TOL

    for r in per_rank:
        half = r[("half", "plain", "summary")]
        # At least half of the bytes (masters, gradients, momentum) on the host, less than all of them.
        assert 0.5 <= half["host_bytes"] / (half["host_bytes"] + half["device_bytes"]) < 0.8, half
        # "auto" measured the SGD run (12 bytes per element) as fitting whole, the AdamW run (16) not quite.
        assert r[("auto", "plain", "summary")]["host_chunks"] == 0, r[("auto", "plain", "summary")]
        adamw = r[("auto", "adamw", "summary")]
        assert 0 < adamw["host_chunks"] < adamw["chunks"] and adamw["device_bytes"] <= AUTO_LIMIT, adamw

    steps = 4
    uninterrupted = global_losses([r["uninterrupted"] for r in per_rank], world_size)
    first = global_losses([r["first_epoch"] for r in per_rank], world_size)
    assert relative_gap(first, uninterrupted[:steps]) <= ADAM_TOL
    for key in ("resumed_without_offload", "resumed_auto"):
        resumed = global_losses([r[key] for r in per_rank], world_size)
        assert relative_gap(resumed, uninterrupted[steps:]) <= ADAM_TOL, key
    # The same checkpoint at another world size (the global batch kept at 16).
    four = run_on_ranks(_resume_at_four, 4, free_port(), str(tmp_path))
    for key in ("auto", "nvme"):
        resumed = global_losses([r[key] for r in four], 4)
        assert relative_gap(resumed, uninterrupted[steps:]) <= ADAM_TOL, key

    for r in per_rank:
        assert r["host_error"] is not None and "HostMemoryError" in r["host_error"], r["host_error"]
        assert "GiB of host memory" in r["host_error"] and "zero3_nvme" in r["host_error"]
        assert r["checkpoint_untouched"]
        assert r["replan_error"] is not None and "The automatic placement" in r["replan_error"], r["replan_error"]
        assert "first forward and backward ran" in r["replan_error"]
        assert "Nothing was allocated" not in r["replan_error"]


# zero3_nvme on CPU: every chunk on the host, and a host budget that holds the optimizer state of only a few of them:
# the others spill it to files (16 bytes per element planned: masters, gradients, AdamW's two moments; and the step in
# windows holds up to four chunks' state). At world 2: 10 of the 13 chunks spill.
NVME_HOST_LIMIT = 200_000


class SaveAtEpochEnd(Callback):
    """Save during fit (the spilled optimizer state is removed when fit ends)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def nvme(path: str, **kwargs) -> ZeroStrategy:
    return offload(offload=1.0, nvme_dir=path, host_memory_limit=NVME_HOST_LIMIT, **kwargs)


def _train_nvme(rank: int, world_size: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world_size, port)
    out: dict = {}
    disk = os.path.join(tmpdir, "nvme")
    for name, run in PARITY.items():
        placement = Placement()
        out[name] = fit(run, nvme(disk), world_size, world_size, callbacks=[placement])
        out[(name, "summary")] = placement.summary
    root = os.path.join(disk, "lightning_par_nvme")  # this process's files are gone after each fit
    out["files_left"] = [e for e in os.listdir(root) if f"-{os.getpid()}-" in e] if os.path.isdir(root) else []

    run = Run(steps=4, epochs=2, per_rank_batch=GLOBAL_BATCH // world_size,
              module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3})
    out["uninterrupted"] = fit(run, offload(), world_size, world_size)
    saved = os.path.join(tmpdir, "nvme_epoch1")
    out["with_save"] = fit(run, nvme(disk), world_size, world_size, callbacks=[SaveAtEpochEnd(saved)])
    out["resumed_without_offload"] = fit(run, offload(), world_size, world_size, ckpt_path=saved)
    out["resumed_nvme"] = fit(run, nvme(disk), world_size, world_size, ckpt_path=saved)

    # 16-bit host gradient shards (bf16 compute): cast to fp32 per chunk for the step, with and without spilling.
    bf16 = Run(steps=6, precision="bf16-true", module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3})
    out["bf16_zero3"] = fit(bf16, offload(), world_size, world_size)
    out["bf16_half"] = fit(bf16, offload(offload=1.0, host_grads="compute"), world_size, world_size)
    out["bf16_half_nvme"] = fit(bf16, nvme(disk, host_grads="compute"), world_size, world_size)
    out["bf16_half_accumulate"] = fit(Run(**{**bf16.__dict__, "steps": 3, "accumulate": 2}),
                                      offload(offload=1.0, host_grads="compute"), world_size, world_size)
    out["bf16_zero3_accumulate"] = fit(Run(**{**bf16.__dict__, "steps": 3, "accumulate": 2}), offload(), world_size,
                                       world_size)

    trainers: list = []
    fit(Run(steps=2), nvme(disk), world_size, world_size, trainers=trainers)
    out["save_after_fit"] = error_message(lambda: trainers[0].save_checkpoint(os.path.join(tmpdir, "after_fit")))
    before = sorted(os.listdir(saved))
    a_file = os.path.join(tmpdir, "not_a_directory")
    open(a_file, "w").close()
    out["bad_dir"] = error_message(lambda: fit(run, nvme(a_file), world_size, world_size, ckpt_path=saved))
    import shutil as real_shutil

    import lightning_par.zero.nvme as nvme_module

    class TinyDisk:  # a disk with 1 KB free (only the size check sees it)
        def disk_usage(self, path):
            return real_shutil.disk_usage(path)._replace(free=1000)

        def __getattr__(self, name):
            return getattr(real_shutil, name)

    nvme_module.shutil = TinyDisk()
    try:
        out["full_disk"] = error_message(lambda: fit(run, nvme(disk), world_size, world_size, ckpt_path=saved))
    finally:
        nvme_module.shutil = real_shutil
    out["checkpoint_untouched"] = sorted(os.listdir(saved)) == before
    return out


def test_nvme_spills_optimizer_state_and_matches_single_process(tmp_path):
    world_size = 2
    per_rank = run_on_ranks(_train_nvme, world_size, free_port(), str(tmp_path))
    for name, run in PARITY.items():
        reference = fit(run, "auto", devices=1, data_parallel=world_size)
        ours = global_losses([r[name] for r in per_rank], world_size)
        assert relative_gap(ours, reference) <= (ADAM_TOL if name == "adamw" else TOL), (name, ours, reference)
    for r in per_rank:
        summary = r[("adamw", "summary")]
        assert 0 < summary["nvme_chunks"] < summary["host_chunks"] == summary["chunks"], summary
        assert summary["host_bytes"] <= NVME_HOST_LIMIT and summary["nvme_bytes"] > 0, summary
        assert r["files_left"] == [], r["files_left"]

    steps = 4
    uninterrupted = global_losses([r["uninterrupted"] for r in per_rank], world_size)
    assert relative_gap(global_losses([r["with_save"] for r in per_rank], world_size), uninterrupted) <= ADAM_TOL
    for key in ("resumed_without_offload", "resumed_nvme"):
        resumed = global_losses([r[key] for r in per_rank], world_size)
        assert relative_gap(resumed, uninterrupted[steps:]) <= ADAM_TOL, key

    bf16_zero3 = global_losses([r["bf16_zero3"] for r in per_rank], world_size)
    bf16_half = global_losses([r["bf16_half"] for r in per_rank], world_size)
    # The reduced gradient rounded to bf16 on the host (zero3 keeps it in fp32): close, not equal.
    assert 0 < relative_gap(bf16_half, bf16_zero3) <= 2e-2, (bf16_half, bf16_zero3)
    # Spilling the state to disk changes nothing in the arithmetic.
    assert relative_gap(global_losses([r["bf16_half_nvme"] for r in per_rank], world_size), bf16_half) <= 1e-7
    accumulated = global_losses([r["bf16_half_accumulate"] for r in per_rank], world_size)
    assert relative_gap(accumulated, global_losses([r["bf16_zero3_accumulate"] for r in per_rank], world_size)) <= 2e-2
    for r in per_rank:
        assert "removed when fit ended" in r["save_after_fit"], r["save_after_fit"]
        assert "NvmeDirectoryError" in r["bad_dir"] and "not_a_directory" in r["bad_dir"], r["bad_dir"]
        assert "NvmeSpaceError" in r["full_disk"] and "free" in r["full_disk"], r["full_disk"]
        assert r["checkpoint_untouched"]


def test_placement_plans():
    numels = [100, 100, 100, 50]
    assert plan_fraction(numels, 0.0, 16).on_host == (False,) * 4
    assert plan_fraction(numels, 1.0, 16).on_host == (True,) * 4
    # The last chunks go first, until at least the fraction of the elements is on the host.
    assert plan_fraction(numels, 0.3, 16).on_host == (False, False, True, True)
    # As many leading chunks as the budget holds stay on the device, the rest (contiguous) on the host.
    plan = plan_budget(numels, 3000, 10)
    assert plan.on_host == (False, False, False, True) and plan.device_bytes() == 3000 and plan.host_bytes() == 500
    assert plan_budget(numels, 10**9, 10).on_host == (False,) * 4
    assert isinstance(plan, Plan) and plan.describe("cuda:0").startswith("3 of 4 chunks")
    # Spilling: the last host chunks keep their state on disk (8 bytes per element stay on the host: master and
    # gradient) until the host part fits. The step in windows holds the state of up to four of them in host memory
    # at once (the one read ahead, the one stepping, two writes in flight): spilling four chunks frees nothing.
    host = Plan((False,) + (True,) * 8, 16, (100,) + (10,) * 8)
    assert host.host_bytes() == 80 * 16 == 1280 and host.window_bytes() == 0
    assert spill_to_disk(host, 1279).on_nvme == (False,) * 4 + (True,) * 5  # 4 spilled: 1280, 5: 1200
    spilled = spill_to_disk(host, 1100)
    assert spilled.on_nvme == (False,) * 2 + (True,) * 7
    assert spilled.window_bytes() == 4 * 10 * 8
    assert spilled.host_bytes() == 10 * 16 + 70 * 8 + 4 * 10 * 8 == 1040 and spilled.nvme_bytes() == 70 * 8
    assert spill_to_disk(host, 10**6).on_nvme == (False,) * 9
    assert spill_to_disk(host, 0).on_nvme == (False,) + (True,) * 8  # all spill, and it still does not fit
    half = replace(spilled, host_grad_bytes=2)  # bf16 host gradients: 14 bytes in memory, 6 with state on disk,
    assert half.host_bytes() == 10 * 14 + 70 * 6 + 4 * 10 * 8 + 10 * 4  # and one chunk's fp32 copy for its step
    # The window holds the largest chunks' state, whichever order they step in.
    mixed = replace(host, shard_numels=(100, 10, 50, 10, 10, 30, 10, 20, 10), on_nvme=(False,) + (True,) * 8)
    assert mixed.window_bytes() == (50 + 30 + 20 + 10) * 8
    assert "GiB of it for the step of the chunks on disk" in host_shortfall_message(spilled, 0, 0, "The placement")
    assert "of it for the step" not in host_shortfall_message(host, 0, 0, "The placement")
    assert "Nothing was allocated or written." in host_shortfall_message(host, 0, 0, "The placement")
    assert "Nothing was allocated" not in host_shortfall_message(host, 0, 0, "The placement", "The first step ran.")
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\]"):
        plan_fraction(numels, 1.5, 16)
    with pytest.raises(ValueError, match="offload must be None, 'auto' or a fraction"):
        ZeroStrategy(stage=3, offload=2.0)
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["zero3_offload"]["init_params"]["offload"] == "auto"
    assert StrategyRegistry["zero2_offload"]["init_params"]["offload"] == 1.0


@pytest.mark.parametrize("recipe_name, logged", [
    ("zero2_offload", "ZeRO placement (1.0)"),
    ("zero3_offload", "ZeRO placement (0.5)"),
    ("zero3_nvme", "keep their optimizer state on disk"),
])
def test_recipe_trains_through_the_cli_and_logs_its_plan(tmp_path, recipe_name, logged):
    """recipes/zero2_offload.yaml, zero3_offload.yaml and zero3_nvme.yaml through `lightning-par fit` (popen
    launcher, 2 ranks), shortened: the plan is logged, the loss falls, and the sharded checkpoint (written by ModelCheckpoint during
    fit, spilled state included) consolidates into a plain module."""
    from lightning_par.checkpoint import load_full
    from lightning_par.demo import DemoGPT

    output, losses, root = run_recipe(recipe_name, tmp_path)
    assert logged in output and "on the host" in output
    assert len(losses) >= 5 and losses[-1] < losses[0]
    last = next(c for c in root.rglob("last.ckpt"))
    full = load_full(last)
    model = DemoGPT(**{k: v for k, v in full["hyper_parameters"].items() if not k.startswith("_")})
    model.load_state_dict(full["state_dict"], strict=True)
