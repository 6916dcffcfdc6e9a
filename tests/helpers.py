"""Run a function on N gloo ranks in fresh processes: the harness for communication tests.

Strategy tests go through Lightning's own Trainer and launchers instead; this helper is for primitives that need
a process group and nothing else.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def error_message(make: Callable[[], Any], none: str = "") -> str:
    """``"Type: message"`` of what ``make()`` raised, or ``none`` when it raised nothing (tests read the message)."""
    try:
        make()
    except Exception as error:  # noqa: BLE001 - the test inspects the message
        return f"{type(error).__name__}: {error}"
    return none


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One thread per rank: 4-8 ranks share 2 cores in CI.
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is with the manager already. Leave as the strategies' workers do: a worker that finished cleanly
    # can abort in the interpreter's own teardown on torch 2.13 (test_zero_engine's fp16 test, CI of 2026-11-27;
    # see [Note: workers skip interpreter teardown] in lightning_par/strategies/base.py).
    from lightning_par.strategies.base import leave_without_teardown

    leave_without_teardown()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on every rank of a fresh gloo group; return the results by rank.

    ``fn`` must be a module-level function (it is pickled into spawned processes). An exception on any rank fails
    the call with that rank's traceback.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(fn, world_size, free_port(), args, results), nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]


def run_recipe(recipe: str, tmp_path: Any, max_steps: int = 30) -> tuple[str, list[float], Any]:
    """`lightning-par fit --config recipes/<recipe>.yaml`, shortened to ``max_steps`` and writing under
    ``tmp_path/run``: returns its output, the logged training losses and the run's folder. Skips when the console
    script is not installed; fails with the output's tail when the command fails."""
    import csv
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    script = shutil.which("lightning-par", path=os.path.dirname(sys.executable)) or shutil.which("lightning-par")
    if script is None:
        pytest.skip("the lightning-par console script is not installed (pip install -e .)")
    config = Path(__file__).resolve().parents[1] / "recipes" / f"{recipe}.yaml"
    root = Path(tmp_path) / "run"
    args = ["fit", "--config", str(config), f"--trainer.max_steps={max_steps}",
            f"--trainer.val_check_interval={max_steps // 2}", "--trainer.limit_val_batches=2",
            "--trainer.log_every_n_steps=5", f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false"]
    result = subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = next(root.rglob("metrics.csv"))
    losses = [float(row["train_loss"]) for row in csv.DictReader(metrics.open()) if row.get("train_loss")]
    return result.stdout + result.stderr, losses, root
