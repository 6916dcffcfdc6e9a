"""Every registered name comes from the one table (``lightning_par/strategies/registry.py``): each preset under each
start method, built with its arguments, and no lightning_par name registered outside the table."""

from __future__ import annotations

import inspect

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry

import lightning_par  # noqa: F401  (registers the names)
from lightning_par.strategies import LightningParStrategy
from lightning_par.strategies.registry import PRESETS, START_METHODS

NAMES = [(preset, suffix) for preset in PRESETS for suffix in START_METHODS]


@pytest.mark.parametrize(("preset", "suffix"), NAMES, ids=[p.name + s for p, s in NAMES])
def test_every_preset_is_registered_under_every_start_method(preset, suffix):
    entry = StrategyRegistry[preset.name + suffix]
    assert entry["strategy"] is preset.strategy
    assert entry["init_params"] == {**preset.arguments, "start_method": START_METHODS[suffix]}
    strategy = StrategyRegistry.get(preset.name + suffix)
    assert strategy._start_method == START_METHODS[suffix]
    signature = inspect.signature(preset.strategy.__init__)
    assert set(preset.arguments) <= set(signature.parameters)  # arguments the class takes, nothing else


def test_no_name_is_registered_outside_the_table():
    ours = {name for name, entry in StrategyRegistry.items()
            if isinstance(entry["strategy"], type) and issubclass(entry["strategy"], LightningParStrategy)}
    assert ours == {preset.name + suffix for preset, suffix in NAMES}


def test_a_name_builds_a_trainer():
    trainer = Trainer(strategy="zero3_offload_fork", accelerator="cpu", devices=1, logger=False)
    assert trainer.strategy.policy.stage == 3 and trainer.strategy.policy.offload == "auto"
