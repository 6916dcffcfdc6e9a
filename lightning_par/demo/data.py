"""Character-level language modelling over a small corpus shipped inside the package (no download at run time)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset


def load_corpus(path: str | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return files("lightning_par.demo").joinpath("corpus.txt").read_text(encoding="utf-8")


class RandomWindows(Dataset):
    """``length`` windows at offsets drawn once from a seeded generator.

    The offsets are a pure function of (seed, data length, length), so every rank and every run maps an index to
    the same sample; the distributed sampler then only decides which indices a rank visits.
    """

    def __init__(self, data: torch.Tensor, block_size: int, length: int, seed: int = 1234) -> None:
        if data.numel() <= block_size + 1:
            raise ValueError(f"text of {data.numel()} characters is too short for block_size={block_size}")
        self.data = data
        self.block_size = block_size
        g = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, data.numel() - block_size - 1, (length,), generator=g)

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = int(self.offsets[i])
        chunk = self.data[o : o + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ConsecutiveWindows(Dataset):
    """Non-overlapping windows covering the held-out text once: a fixed, comparable validation set."""

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if data.numel() <= block_size + 1:
            raise ValueError(f"text of {data.numel()} characters is too short for block_size={block_size}")
        self.data = data
        self.block_size = block_size

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = i * self.block_size
        chunk = self.data[o : o + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(LightningDataModule):
    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        samples_per_epoch: int = 4096,
        corpus_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Built eagerly (the corpus is small) so that ``vocab_size`` is known when the CLI links it into the model.
        text = load_corpus(corpus_path)
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_val = int(len(data) * val_fraction)
        self.train_data, self.val_data = data[: len(data) - n_val], data[len(data) - n_val :]

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        self.train_set = RandomWindows(self.train_data, hp.block_size, hp.samples_per_epoch)
        self.val_set = ConsecutiveWindows(self.val_data, hp.block_size) if len(self.val_data) > hp.block_size + 1 else None

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(
            ds,
            batch_size=hp.batch_size,
            shuffle=shuffle,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        # Offsets are already random; shuffling only reorders them (Lightning's DistributedSampler keeps the flag).
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []
