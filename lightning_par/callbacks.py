"""Throughput, MFU and every rank's peak memory, logged like any Lightning metric and counted right under every
strategy."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.strategies.base import COMPUTE_DTYPES



def _first_tensor_numel(batch: Any) -> int:
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return _first_tensor_numel(next(iter(batch.values())))
    if not isinstance(batch, Tensor):
        raise TypeError(f"ThroughputMonitor counts the tokens of the batch's first tensor; this batch has none "
                        f"({type(batch).__name__}). Pass tokens_fn=lambda batch: <tokens in it>.")
    return batch.numel()


def _peak_bytes(device: torch.device) -> int:
    """This process's peak memory: allocated on its GPU, or its resident set on the host (CPU runs)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kilobytes on Linux


class ThroughputMonitor(Callback):
    """Tokens per second, model FLOPs utilisation and each rank's peak memory, logged every ``log_every_n_steps``
    optimizer steps (the Trainer's setting) to the Trainer's loggers.

    Lightning's own ``ThroughputMonitor`` multiplies the samples one rank reads by the world size, but the ranks of
    a tensor or pipeline group read the same batch, so under ``tp1d``, the pipelines and ``hybrid`` it over-counts
    by their size; it also calls ``torch.cuda.synchronize()`` after every batch. This one counts the batches of the
    data-parallel replicas (the sampler's ``num_replicas``) and waits for the device only at the end of each logging
    window.

    Logged (``throughput/`` and ``memory/``):
        ``tokens``: tokens trained so far, over all replicas. ``tokens_per_sec``: over the last window, all replicas
        (validation inside it excluded). ``tokens_per_sec_per_gpu``: divided by the world size. ``mfu``: per-GPU
        model FLOPs per second over the device's peak for the compute dtype, when the LightningModule has a
        ``flops_per_token`` attribute (forward and backward, e.g. 6 x parameters + attention) and the device's peak
        is known. ``peak_gib_rank<r>``: each rank's peak allocated GPU memory (on CPU: peak resident memory), a
        collective over the ranks at each logging step.

    Args:
        tokens_fn: the tokens in one batch as this rank reads it; default: the element count of its first tensor
            (token ids ``[batch, sequence]``).
    """

    def __init__(self, tokens_fn: Optional[Callable[[Any], int]] = None) -> None:
        super().__init__()
        self.tokens_fn = tokens_fn or _first_tensor_numel
        self.tokens = 0  # over all replicas, since fit started
        self.last: dict[str, float] = {}  # the metrics of the last logging step
        self._window_tokens = 0
        self._window_start = 0.0
        self._excluded = 0.0  # seconds of validation inside the window
        self._validation_start: Optional[float] = None
        self._logged_step = -1

    def _now(self, trainer: "pl.Trainer") -> float:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once per window: the host runs ahead of the device
        return time.perf_counter()

    @staticmethod
    def _replicas(trainer: "pl.Trainer") -> int:
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return int(kwargs.get("num_replicas", trainer.world_size))

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.tokens = self._window_tokens = 0
        self._excluded = 0.0
        self._window_start = self._now(trainer)

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: not training time
            self._validation_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._validation_start is not None:
            self._excluded += time.perf_counter() - self._validation_start
            self._validation_start = None

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = self.tokens_fn(batch) * self._replicas(trainer)
        self.tokens += tokens
        self._window_tokens += tokens
        step = trainer.global_step  # the same on every rank: they all reach the collective below together
        every = max(1, trainer.log_every_n_steps)
        if step == self._logged_step or step % every:
            return
        self._logged_step = step
        end = self._now(trainer)
        elapsed = max(end - self._window_start - self._excluded, 1e-9)
        per_sec = self._window_tokens / elapsed
        metrics = {"throughput/tokens": float(self.tokens), "throughput/tokens_per_sec": per_sec,
                   "throughput/tokens_per_sec_per_gpu": per_sec / trainer.world_size}
        flops_per_token = getattr(pl_module, "flops_per_token", None)
        device = trainer.strategy.root_device
        if flops_per_token and device.type == "cuda":
            peak = get_available_flops(device, COMPUTE_DTYPES.get(str(trainer.precision), torch.float32))
            if peak:
                metrics["throughput/mfu"] = per_sec / trainer.world_size * flops_per_token / peak
        peaks = torch.tensor([float(_peak_bytes(device))], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            mine, peaks = peaks, torch.empty(dist.get_world_size(), device=device)
            dist.all_gather_into_tensor(peaks, mine)
        for rank, value in enumerate(peaks.tolist()):
            metrics[f"memory/peak_gib_rank{rank}"] = value / 2**30
        self.last = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self._window_tokens = 0
        self._excluded = 0.0
        self._window_start = time.perf_counter()
