"""ZeRO-Offload's delayed parameter update (``delay_update=True``, [Note: the delayed host step]) against the same
one-step delay computed in one process; the host step during backward (``step_during_backward=True``, [Note: the
early host step]) against one process, and only where it may run; the step components an offloading engine measures.

With every chunk on the host (``offload=1.0``), forward k reads the parameters as updated through step k - 2. One
process computes the same with an optimizer that, at each step, first makes the model what the previous update
produced and then applies this step's gradient to masters of its own (``OneStepLate``). SGD with momentum: the
momentum buffers live in the user optimizer's state, which the background step updates.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import error_message, free_port, run_on_ranks
from lightning_par import ZeroStrategy
from lightning_par.checkpoint import consolidate
from parity import BatchLossGPT, Run, fit, global_losses, relative_gap
from test_dp import _as_external_rank

TOL = 1e-5
RUN = Run(steps=8, accumulate=2)
CLIPPED = Run(steps=6, clip_val=0.05)


class OneStepLate(torch.optim.Optimizer):
    """``inner``'s update applied one step late: the model's parameters show the masters before this step's update
    (see the module docstring); ``inner`` steps fp32 masters of its own."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.visible = [p for g in inner.param_groups for p in g["params"]]
        self.masters = [p.detach().clone().requires_grad_(True) for p in self.visible]
        master_of = {id(p): m for p, m in zip(self.visible, self.masters)}
        for group in inner.param_groups:
            group["params"] = [master_of[id(p)] for p in group["params"]]
        self.inner = inner
        super().__init__(self.visible, {})  # clipping sees the visible parameters' gradients

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for p in self.visible]
        for p, m in zip(self.visible, self.masters):
            p.copy_(m)  # the update of the last step becomes visible
        for m, g in zip(self.masters, grads):
            m.grad = None if g is None else g.clone()
        self.inner.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.visible:
            p.grad = None


class DelayedGPT(BatchLossGPT):
    def configure_optimizers(self):
        return OneStepLate(super().configure_optimizers())


CASES = {  # name -> (strategy arguments, run)
    "zero2_delayed": (dict(stage=2, offload=1.0, delay_update=True), RUN),
    "zero3_delayed": (dict(stage=3, offload=1.0, delay_update=True, chunk_size=2**14), RUN),
    "zero2_delayed_clipped": (dict(stage=2, offload=1.0, delay_update=True), CLIPPED),
    # AdamW with two parameter groups (decay and none), stepped by torch's fused CPU kernel on the worker
    "zero3_delayed_adamw": (dict(stage=3, offload=1.0, delay_update=True),
                            Run(steps=6, module_kwargs={"optimizer": "adamw", "learning_rate": 3e-3})),
}


# step_during_backward: (run, asked for); it runs only where nothing touches the gradients before the step
EARLY = {"early": (Run(steps=4), True), "clipped": (Run(steps=4, clip_val=0.05), True),
         "accumulated": (Run(steps=4, accumulate=2), True), "off": (Run(steps=4), False)}


def _train(rank: int, world: int, port: int, tmpdir: str) -> dict:
    _as_external_rank(rank, world, port)
    out = {name: fit(run, ZeroStrategy(**arguments), world, world, module_class=BatchLossGPT)
           for name, (arguments, run) in CASES.items()}
    # Not delayed: the host chunks step during backward when nothing touches the gradients before the step (early),
    # and not when clipping or accumulation does; the components are measured either way.
    for name, (run, early) in EARLY.items():
        trainers: list = []
        out[name] = fit(run, ZeroStrategy(stage=3, offload=1.0, step_during_backward=early), world, world,
                        module_class=BatchLossGPT, trainers=trainers)
        host_step = trainers[0].strategy.zero.engine.host_step
        out[f"{name}_early_steps"] = host_step.early_steps
        out[f"{name}_cpu_step_s"] = host_step.last_cpu_step_s
    # The checkpoint saved after fit (the last host step was in flight when fit ended) holds every update.
    out["saved"] = fit(Run(steps=3), ZeroStrategy(stage=3, offload=1.0, delay_update=True), world, world,
                       module_class=BatchLossGPT, save_to=os.path.join(tmpdir, "delayed.ckpt"))
    return out


@pytest.mark.timeout(600)
def test_delayed_update_matches_the_same_delay_in_one_process(tmp_path):
    per_rank = run_on_ranks(_train, 2, free_port(), str(tmp_path))
    for name, (_, run) in CASES.items():
        ours = global_losses([r[name] for r in per_rank], 2)
        delayed = fit(run, "auto", 1, 2, module_class=DelayedGPT)
        assert relative_gap(ours, delayed) <= TOL, (name, ours, delayed)
        # The delay is real: the same run without it differs after the first steps.
        undelayed = fit(run, "auto", 1, 2, module_class=BatchLossGPT)
        assert relative_gap(ours, undelayed) > 1e-4, (name, ours, undelayed)
    # The early host step ([Note: the early host step]) is exact, and runs only where nothing touches the gradients.
    for name, (run, _) in EARLY.items():
        ours = global_losses([r[name] for r in per_rank], 2)
        assert relative_gap(ours, fit(run, "auto", 1, 2, module_class=BatchLossGPT)) <= TOL, (name, ours)
        assert per_rank[0][f"{name}_cpu_step_s"] > 0
    assert per_rank[0]["early_early_steps"] >= 4  # every step, at least one chunk
    for name in ("clipped", "accumulated", "off"):
        assert per_rank[0][f"{name}_early_steps"] == 0, name

    # The checkpoint holds the masters after all 3 updates, as the one-process optimizer's masters.
    trainers: list = []
    fit(Run(steps=3), "auto", 1, 2, module_class=DelayedGPT, trainers=trainers)
    late = trainers[0].optimizers[0]
    expected = {name: m for (name, _), m in zip(trainers[0].lightning_module.named_parameters(), late.masters)}
    consolidate(tmp_path / "delayed.ckpt", tmp_path / "plain.ckpt")
    saved = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    for name, master in expected.items():
        assert torch.allclose(saved[name], master, atol=1e-6), name


def test_delay_update_needs_offload_in_memory():
    assert "without offload there is no host chunk" in error_message(lambda: ZeroStrategy(delay_update=True))
    assert "does not combine with nvme_dir" in error_message(
        lambda: ZeroStrategy(stage=3, offload=1.0, nvme_dir="/tmp", delay_update=True))


def test_the_worker_leaves_a_core_to_the_main_thread():
    """The host step's worker runs one intra-op thread fewer than the process (``_worker_pool``); the process's
    count, and what threads started later inherit, stay as they were."""
    import threading

    from lightning_par.zero.host_step import HostStep

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        host_step = HostStep(lambda: [], torch.device("cpu"), delayed=True, h2d=None, bytes_moved={"h2d": 0, "d2h": 0})
        assert host_step._submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
        host_step.close()
    finally:
        torch.set_num_threads(before)
