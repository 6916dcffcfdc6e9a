"""Parity oracle: train the demo GPT under a strategy and in one process on the same global batch, compare losses.

Every rank records the loss of each training step it ran; a data-parallel step's global loss is the mean over
data-parallel ranks (equal per-rank batches), which must equal the single process's loss on the union batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset

from lightning_par.demo.model import DemoGPT

TINY = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


def token_dataset(samples: int, seq: int = 16, vocab: int = 32, seed: int = 1234) -> TensorDataset:
    # Arithmetic progressions mod vocab with a random start and stride: learnable, so the loss really falls.
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (samples, 1), generator=g)
    stride = torch.randint(1, 4, (samples, 1), generator=g)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class GlobalBatchOrder(Sampler):
    """The single-process order whose k-th batch is the union of the data-parallel ranks' k-th batches.

    Lightning always shuffles the training set with a ``DistributedSampler`` built from the strategy's
    ``distributed_sampler_kwargs`` (seeded by ``seed_everything``, 0 in these tests, reshuffled per epoch); this
    sampler reproduces that order for the reference run.
    """

    def __init__(self, samples: int, data_parallel: int, per_rank_batch: int) -> None:
        self.samples, self.data_parallel, self.per_rank_batch = samples, data_parallel, per_rank_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples

    def __iter__(self):
        per_rank = []
        for rank in range(self.data_parallel):
            sampler = DistributedSampler(range(self.samples), num_replicas=self.data_parallel, rank=rank, shuffle=True)
            sampler.set_epoch(self.epoch)
            per_rank.append(list(sampler))
        b = self.per_rank_batch
        for start in range(0, len(per_rank[0]), b):
            for indices in per_rank:
                yield from indices[start : start + b]


class RecordingGPT(DemoGPT):
    """The demo GPT with SGD by default, recording every training loss it computes."""

    def __init__(self, manual: bool = False, two_optimizers: bool = False, unfreeze_at: Optional[int] = None,
                 scheduler: bool = False, backwards: int = 1, **kwargs: Any) -> None:
        kwargs = {**TINY, "optimizer": "sgd", "learning_rate": 0.1, **kwargs}
        super().__init__(**kwargs)
        self.recorded: list[float] = []
        self.manual = manual
        self.two_optimizers = two_optimizers
        self.automatic_optimization = not manual
        self.backwards = backwards  # manual: backward calls per step, each on its share of the batch
        # Fine-tuning pattern: the last block starts frozen and is unfrozen during fit.
        self.unfreeze_at = unfreeze_at
        self.scheduler = scheduler  # halve the learning rate every 2 steps: the scheduler must reach the optimizer
        if unfreeze_at is not None:
            self.model.blocks[-1].requires_grad_(False)

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx == self.unfreeze_at:
            self.model.blocks[-1].requires_grad_(True)

    def training_step(self, batch, batch_idx):
        if not self.manual:
            loss = self._loss(batch)
            self.recorded.append(loss.item())
            return loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        loss = 0.0
        for part in zip(*(t.chunk(self.backwards) for t in batch)):
            part_loss = self._loss(part) / self.backwards
            self.manual_backward(part_loss)
            loss = loss + part_loss.detach()
        self.recorded.append(loss.item())
        self.clip_gradients(optimizers[0], gradient_clip_val=0.05, gradient_clip_algorithm="norm")
        for opt in optimizers:
            opt.step()
        return loss

    def configure_optimizers(self):
        if self.unfreeze_at is not None:  # frozen parameters too: they train once unfrozen
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if self.scheduler:
            optimizer = super().configure_optimizers()
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5), "interval": "step"}}
        if not self.two_optimizers:
            return super().configure_optimizers()
        blocks = list(self.model.blocks.parameters())
        block_ids = {id(p) for p in blocks}
        rest = [p for p in self.parameters() if id(p) not in block_ids]
        return [torch.optim.SGD(blocks, lr=0.1, momentum=0.9), torch.optim.SGD(rest, lr=0.05, momentum=0.5)]


class BatchLossGPT(RecordingGPT):
    """Records the step loss the strategy returns (under a pipeline: the batch's, on every rank), so that every
    strategy is read alike."""

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.recorded.append(outputs["loss"].item() * self.trainer.accumulate_grad_batches)


class BuildsInConfigureModel:
    """Mixin for a RecordingGPT subclass: the network is built in ``configure_model``, the Lightning hook for sharded
    construction, not in ``__init__``; ``built_on_meta`` records whether it was built on the meta device."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.built_on_meta = None
        del self.model

    def configure_model(self) -> None:
        if hasattr(self, "model"):
            return
        from lightning_par.demo.model import GPT, GPTConfig

        self.model = GPT(GPTConfig(**{k: self.hparams[k] for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                                                   "n_embd")}))
        self.built_on_meta = self.model.wte.weight.is_meta


@dataclass
class Run:
    """One training run: how the module is built and how the Trainer steps."""

    steps: int = 10
    per_rank_batch: int = 4
    accumulate: int = 1
    clip_val: Optional[float] = None
    clip_algorithm: str = "norm"
    epochs: int = 1
    precision: str = "32-true"
    module_kwargs: dict = field(default_factory=dict)

    def dataset(self, data_parallel: int) -> TensorDataset:
        return token_dataset(self.steps * self.accumulate * self.per_rank_batch * data_parallel)


def fit(run: Run, strategy: Any, devices: int, data_parallel: int, ckpt_path: Optional[str] = None,
        save_to: Optional[str] = None, max_epochs: Optional[int] = None, trainers: Optional[list] = None,
        module_class: type = None, empty_init: Optional[bool] = None, callbacks: Optional[list] = None) -> list[float]:
    """Train and return the losses this rank recorded. ``devices=1, strategy='auto'`` is the reference.

    ``empty_init``: build the module inside ``Trainer.init_module(empty_init=...)``.
    """
    seed_everything(0, verbose=False)
    dataset = run.dataset(data_parallel)
    if devices == 1:
        order = GlobalBatchOrder(len(dataset), data_parallel, run.per_rank_batch)
        loader = DataLoader(dataset, batch_size=run.per_rank_batch * data_parallel, sampler=order)
    else:
        loader = DataLoader(dataset, batch_size=run.per_rank_batch)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=max_epochs or run.epochs,
        accumulate_grad_batches=run.accumulate if not run.module_kwargs.get("manual") else 1,
        gradient_clip_val=run.clip_val,
        gradient_clip_algorithm=run.clip_algorithm if run.clip_val is not None else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision=run.precision,
        default_root_dir=os.path.dirname(save_to) if save_to else None,
        callbacks=callbacks,
    )
    module_class = module_class or RecordingGPT
    if empty_init is None:
        module = module_class(**run.module_kwargs)
    else:
        with trainer.init_module(empty_init=empty_init):
            module = module_class(**run.module_kwargs)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    if trainers is not None:  # for tests that inspect the strategy after fit (memory, state)
        trainers.append(trainer)
    return module.recorded


def global_losses(per_rank: list[list[float]], data_parallel: int, ranks: Optional[list[int]] = None) -> list[float]:
    """Mean over data-parallel ranks of each step's loss: ``ranks`` (one per data-parallel replica, e.g. ``[0, 2]``
    for tensor 2 x data 2), by default the first ``data_parallel`` ranks."""
    ranks = list(range(data_parallel)) if ranks is None else ranks
    assert len(ranks) == data_parallel, (ranks, data_parallel)
    steps = zip(*(per_rank[r] for r in ranks))
    return [sum(step) / data_parallel for step in steps]


def relative_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
