"""Lightning's own weight-averaging test with its ``ddp`` strategy routed to ours (issue 12).

Ported from ``test_swa_callback_ddp_cpu`` in ``tests/tests_pytorch/callbacks/test_stochastic_weight_avg.py`` of the
Lightning repository (not shipped in the ``lightning`` wheel): the same model (``SwaTestModel``: Linear 32-32,
BatchNorm1d, ReLU, Linear 32-2 on ``RandomDataset(32, 64)`` in batches of 2; SGD lr 0.1 with ``StepLR`` per epoch),
the same callback arguments (``swa_epoch_start=2, swa_lrs=0.1``), the same Trainer arguments (5 epochs, 5 batches
each, no validation, ``accumulate_grad_batches=2``, CPU, 2 processes) and the same end-of-training checks (the call
counts of ``update_parameters`` / ``transfer_weights`` and the SWALR swap). The original runs ``ddp_spawn``:

- ``dp_spawn`` (our data parallel, Lightning's spawn launcher) passes it as ``ddp_spawn`` does: the control;
- ``zero3_spawn``, ``zero3_offload_spawn`` and ``tp1d_spawn`` refuse ``StochasticWeightAveraging`` at setup, before
  anything is built, with an error naming the callback (``_refuse_weight_averaging`` in
  lightning_par/strategies/base.py).

The checks of the original's callback run inside the spawned ranks: a failed one fails the launch.
"""

from __future__ import annotations

import re
from typing import Optional

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.optim.swa_utils import SWALR
from torch.utils.data import DataLoader

import lightning_par  # noqa: F401  (registers the strategy names)

SWA_START, MAX_EPOCHS = 2, 5


class SwaTestModel(BoringModel):
    """The original's model (with batch norm, map-style dataset, epoch-interval scheduler)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 2))

    def train_dataloader(self):
        return DataLoader(RandomDataset(32, 64), batch_size=2)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class SwaTestCallback(StochasticWeightAveraging):
    """Counts the averaging calls and checks, per epoch and at the end, what the original's callback checks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.update_parameters_calls = 0
        self.transfer_weights_calls = 0
        self.first_epoch: Optional[int] = None

    def update_parameters(self, *args, **kwargs):
        self.update_parameters_calls += 1
        return StochasticWeightAveraging.update_parameters(*args, **kwargs)

    def transfer_weights(self, *args, **kwargs):
        self.transfer_weights_calls += 1
        return StochasticWeightAveraging.transfer_weights(*args, **kwargs)

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        if self.first_epoch is None and not trainer.fit_loop.restarting:
            self.first_epoch = trainer.current_epoch
        # The extra epoch that recomputes the batch-norm statistics of the average skips backward.
        assert trainer.fit_loop._skip_backward == (trainer.current_epoch > self.swa_end)
        if trainer.current_epoch >= self.swa_start:
            config = trainer.lr_scheduler_configs[0]
            assert isinstance(config.scheduler, SWALR) and config.interval == "epoch" and config.frequency == 1

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        epoch = trainer.current_epoch
        if self.swa_start <= epoch <= self.swa_end:
            assert self.n_averaged == epoch - self.swa_start + 1
            # SWALR is stepped once when built, then at the end of every averaging epoch.
            assert self._swa_scheduler is not None and self._swa_scheduler._step_count == epoch - self.swa_start + 2
        elif epoch > self.swa_end:
            assert self.n_averaged == self._max_epochs - self.swa_start

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        assert not trainer.fit_loop._skip_backward
        assert trainer.accumulate_grad_batches == 2 and trainer.num_training_batches == 5
        assert self.update_parameters_calls == trainer.max_epochs - max(self.first_epoch, self.swa_start)
        assert self.transfer_weights_calls == 1


def train_with_swa(tmp_path, strategy: str) -> None:
    """The original's ``train_with_swa(tmpdir, strategy=..., accelerator="cpu", devices=2)``."""
    model = SwaTestModel()
    swa_callback = SwaTestCallback(swa_epoch_start=SWA_START, swa_lrs=0.1)
    trainer = Trainer(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      max_epochs=MAX_EPOCHS, limit_train_batches=5, limit_val_batches=0, callbacks=[swa_callback],
                      accumulate_grad_batches=2, strategy=strategy, accelerator="cpu", devices=2)
    trainer.fit(model)
    assert trainer.lightning_module == model


def test_swa_callback_dp_cpu(tmp_path):
    """The control: Lightning's test passes under our data parallel as under ``ddp_spawn``."""
    train_with_swa(tmp_path, "dp_spawn")


@pytest.mark.parametrize("strategy", ["zero3_spawn", "zero3_offload_spawn", "tp1d_spawn"])
def test_swa_callback_zero3_cpu_is_refused(tmp_path, strategy):
    # Raised at setup in the spawned ranks; Lightning's launcher re-raises it in this process with the rank's
    # traceback in the message.
    owner = "TensorParallel1DStrategy:" if strategy.startswith("tp1d") else "ZeroStrategy (ZeRO stage 3)"
    message = f"The SwaTestCallback callback does not work with {owner}"
    with pytest.raises(Exception, match=re.escape(message)) as error:
        train_with_swa(tmp_path, strategy)
    assert "Remove the callback" in str(error.value)
