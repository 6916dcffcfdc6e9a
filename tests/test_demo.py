"""Single-process checks of the demo model, data and CLI (the multi-process quickstart is exercised elsewhere)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_par.demo import GPT, CharDataModule, DemoGPT, GPTConfig

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
TINY = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_forward_shape():
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 65, (3, 17))
    assert model(idx).shape == (3, 17, 65)


def test_forward_rejects_too_long_sequence():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_weights_tied():
    model = GPT(GPTConfig(**TINY))
    assert model.lm_head.weight is model.wte.weight
    # Shared, so counted once.
    names = [n for n, _ in model.named_parameters()]
    assert ("wte.weight" in names) != ("lm_head.weight" in names)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2
    assert model.blocks[0].attn.n_head == 2


def test_initial_loss_near_uniform():
    module = DemoGPT(**TINY)
    x = torch.randint(0, 65, (8, 32))
    loss = module._loss((x, torch.randint(0, 65, (8, 32))))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_sgd_steps_lower_loss():
    module = DemoGPT(**TINY, optimizer="sgd", learning_rate=0.1)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    dm = CharDataModule(block_size=32, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(8):
        loss = module._loss(batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.3, losses


def test_adamw_decays_only_matrices():
    opt = DemoGPT(**TINY).configure_optimizers()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0 and all(p.dim() < 2 for p in no_decay["params"])


def test_datamodule_vocab_and_shift():
    dm = CharDataModule(block_size=16, batch_size=4)
    assert dm.vocab_size == DemoGPT().hparams.vocab_size == 65
    dm.setup("fit")
    x, y = dm.train_set[5]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    # y continues the text one character past x's window.
    text = dm.decode(x) + dm.decode(y[-1:])
    assert text in dm.decode(dm.train_data)
    vx, vy = dm.val_set[0]
    assert torch.equal(vx[1:], vy[:-1])


def test_datamodule_deterministic_per_index():
    a, b = CharDataModule(block_size=16), CharDataModule(block_size=16)
    a.setup("fit")
    torch.manual_seed(123)  # global RNG state must not matter
    b.setup("fit")
    for i in (0, 1, 100, len(a.train_set) - 1):
        assert torch.equal(a.train_set[i][0], b.train_set[i][0])
        assert torch.equal(a.train_set[i][0], a.train_set[i][0])
    assert not torch.equal(a.train_set[0][0], a.train_set[1][0])


def test_cli_runs_quickstart_recipe(tmp_path, monkeypatch):
    from lightning_par.cli import build_cli

    monkeypatch.chdir(tmp_path)  # whatever the recipe writes lands in the temporary directory
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPE),
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.fast_dev_run=2",
        ]
    )
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size
    assert cli.model.hparams.block_size == cli.datamodule.hparams.block_size
    assert cli.trainer.global_step == 2


def test_recipe_strategy_is_registered():
    import yaml
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_par  # noqa: F401

    strategy = yaml.safe_load(RECIPE.read_text())["trainer"]["strategy"]
    assert strategy in StrategyRegistry
