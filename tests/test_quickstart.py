"""The main job end to end: `lightning-par fit` with the quickstart recipe, 2 CPU ranks through Lightning's default
(popen) launcher, a checkpoint on disk. Shortened to a few steps; README's command runs the full recipe."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _command() -> list[str]:
    script = shutil.which("lightning-par", path=os.path.dirname(sys.executable)) or shutil.which("lightning-par")
    if script is None:
        pytest.skip("the lightning-par console script is not installed (pip install -e .)")
    return [script]


@pytest.mark.parametrize(
    "strategy_args",
    [
        ["--trainer.strategy=dp"],
        # The class_path form, as LightningCLI users write it in YAML.
        ["--trainer.strategy=lightning_par.strategies.DataParallelStrategy",
         "--trainer.strategy.bucket_size_mb=1"],
    ],
    ids=["short_name", "class_path"],
)
def test_quickstart_recipe_trains_and_checkpoints(tmp_path, strategy_args):
    root = tmp_path / "run"
    args = [
        "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), *strategy_args,
        "--trainer.max_steps=30", "--trainer.val_check_interval=15", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=5", f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}", "--trainer.enable_progress_bar=false",
    ]
    result = subprocess.run(_command() + args, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoints = list(root.rglob("*.ckpt"))
    assert any(c.name == "last.ckpt" for c in checkpoints), checkpoints
    metrics = next(root.rglob("metrics.csv"))
    losses = [float(row["train_loss"]) for row in csv.DictReader(metrics.open()) if row.get("train_loss")]
    assert len(losses) >= 5 and losses[-1] < losses[0]
