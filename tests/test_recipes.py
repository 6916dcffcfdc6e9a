"""A LightningCLI recipe for every registered name (``recipes/<name>.yaml``; ``dp``'s is the quickstart), whose
strategy is that preset, and each recipe trains for two steps through ``lightning-par fit``. Recipes that other
tests already run for longer are not run again here (listed in ``RUN_ELSEWHERE``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.strategies import StrategyRegistry

import lightning_par  # noqa: F401  (registers the names)
from helpers import run_recipe
from lightning_par.strategies.registry import PRESETS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE_OF = {"dp": "quickstart"}
RUN_ELSEWHERE = {  # recipe -> the test that runs it
    "quickstart": "test_quickstart.py", "tp1d": "test_tp1d.py", "tp2d": "test_tp2d.py", "pipeline": "test_pipeline.py",
    "zero2_offload": "test_offload.py", "zero3_offload": "test_offload.py", "zero3_nvme": "test_offload.py",
}
NAMES = [p.name for p in PRESETS]
# Preset arguments a recipe may set to another value of the same meaning: which fraction of the chunks goes to
# the host ("auto" in the preset), where spilled state goes (the temp dir in the preset).
TUNED = {"offload", "nvme_dir"}


def _recipe(name: str) -> str:
    return RECIPE_OF.get(name, name)


def _strategy_of(recipe: str) -> tuple[type, dict]:
    """The class and arguments a recipe's ``trainer.strategy`` builds: a registered name or a class_path."""
    spec = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())["trainer"]["strategy"]
    if isinstance(spec, str):
        entry = StrategyRegistry[spec]
        return entry["strategy"], {k: v for k, v in entry["init_params"].items() if k != "start_method"}
    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls), spec.get("init_args", {})


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_name_has_a_recipe_of_its_preset(name):
    preset = next(p for p in PRESETS if p.name == name)
    strategy, arguments = _strategy_of(_recipe(name))
    assert strategy is preset.strategy
    for key, value in preset.arguments.items():  # a recipe may add arguments, not contradict the preset's
        if key in TUNED:  # on, but sized for the demo model so that its placement shows on a laptop
            assert arguments.get(key, value) is not None, key
        else:
            assert arguments.get(key, value) == value, (key, arguments.get(key), value)


@pytest.mark.parametrize("name", [n for n in NAMES if _recipe(n) not in RUN_ELSEWHERE])
def test_recipe_trains_two_steps(name, tmp_path):
    output, _, root = run_recipe(_recipe(name), tmp_path, max_steps=2)
    assert any(c.name == "last.ckpt" for c in root.rglob("*.ckpt")), output[-2000:]
