"""Lightning steps over microbatches: splitting a batch, merging the outputs, and what ``self.log`` saw.

[Note: logging from a pipelined step]
The user's step runs once per microbatch, and only on the ranks of last stages does it get past the model's forward.
Its ``self.log`` calls are recorded (not sent to Lightning) while a microbatch runs; after the schedule every rank of
the pipeline receives the records, averages each logged number over the microbatches (the microbatches are equal
in size, so the mean of per-microbatch means is the batch mean a single process would log) and calls the real
``self.log`` once, with the user's arguments. So every rank logs the same values, once per step, and
``sync_dist`` and ``on_epoch`` behave as in a single process. A value that is not a number or a tensor (a
torchmetrics ``Metric``) cannot be averaged or sent; it is logged as given on the rank that computed it.

[Note: printing from a pipelined step]
``self.print`` prints on global rank 0 only, and rank 0 runs the first stage, whose step stops inside the model's
forward: the code after ``self(x)`` never runs there. So ``self.print`` calls are recorded as ``self.log`` calls
are (their arguments rendered to text where they ran), and after the schedule the records of the microbatches that
finished (those of the last stage, which ran the whole step: prints before and after the forward) reach every rank
of the pipeline; each rank calls the real ``self.print`` with them in microbatch order, so global rank 0 prints
every one once — one line per microbatch, after the step's schedule. Prints of microbatches that stopped at a
stage boundary are dropped (the last stage printed the same lines with the real values). A plain ``print`` is not
recorded: it prints where it runs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lightning_par.comm.collectives import group_size

__all__ = ["batch_size_of", "split_batch", "eval_microbatches", "merge_outputs", "StepRecorder"]


def batch_size_of(batch: Any) -> int:
    sizes = {t.shape[0] for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"A pipelined batch needs tensors that share their first (batch) dimension; got sizes "
                         f"{sorted(sizes) or 'none'}.")
    return sizes.pop()


def split_batch(batch: Any, microbatches: int) -> list[Any]:
    """``microbatches`` equal slices of every tensor of ``batch`` along dim 0; other leaves are shared."""
    size = batch_size_of(batch)
    if size % microbatches:
        divisors = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(
            f"The batch has {size} samples, which microbatches={microbatches} does not divide. Use a batch size that "
            f"is a multiple of {microbatches}, or microbatches in {divisors}."
        )
    leaves, spec = tree_flatten(batch)
    chunks = [t.chunk(microbatches) if isinstance(t, Tensor) and t.dim() > 0 else None for t in leaves]
    return [tree_unflatten([c[i] if c is not None else leaf for c, leaf in zip(chunks, leaves)], spec)
            for i in range(microbatches)]


def eval_microbatches(batch: Any, microbatches: int) -> int:
    """Evaluation splits as training does when it can, else into the largest count that divides the batch (a last,
    smaller batch), so that every sample is evaluated once."""
    size = batch_size_of(batch)
    return max(d for d in range(1, min(size, microbatches) + 1) if size % d == 0)


def merge_outputs(outputs: list[Any]) -> Any:
    """One step output from per-microbatch outputs: tensors with a batch dimension are concatenated, scalars
    averaged; other values are kept as the list."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs) if first.dim() > 0 else torch.stack(outputs).mean(0)
    if isinstance(first, Mapping):
        return type(first)({k: merge_outputs([o[k] for o in outputs]) for k in first})
    if isinstance(first, (tuple, list)) and not hasattr(first, "_fields"):
        return type(first)(merge_outputs(list(items)) for items in zip(*outputs))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return sum(outputs) / len(outputs)
    return outputs


def _portable(value: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, value)


class StepRecorder:
    """Records what the user's step returns and logs per microbatch, shares it over the pipeline group and replays
    it once per step on every rank (see [Note: logging from a pipelined step])."""

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.logs: dict[int, list[tuple[str, Any, tuple, dict]]] = {}
        self.kept: dict[int, list[tuple[str, Any, tuple, dict]]] = {}
        self.prints: dict[int, list[tuple[tuple[str, ...], dict]]] = {}

    @contextmanager
    def microbatch(self, index: int) -> Iterator["_Microbatch"]:
        """Record ``self.log`` while microbatch ``index`` runs; call ``.stopped()`` on what it yields when the step
        ended at a stage boundary (its records do not count: only last stages finish the step)."""
        record = _Microbatch()

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            record.calls.append((name, value, args, kwargs))

        def print_(*args: Any, **kwargs: Any) -> None:  # see [Note: printing from a pipelined step]
            record.prints.append(_printable(args, kwargs))

        self.module.log = log  # an instance attribute shadows LightningModule.log (and log_dict calls self.log)
        self.module.print = print_
        try:
            yield record
        finally:
            del self.module.log
            del self.module.print
        if record.finished:
            self.logs[index] = record.calls
            if record.prints:
                self.prints[index] = record.prints

    def share(self, results: dict[int, Any], group: Optional[ProcessGroup], microbatches: int,
              device: torch.device) -> dict[int, Any]:
        """Exchange outputs and log records with the other ranks of the pipeline; returns every microbatch's output
        (on ``device``). Collective over ``group``."""
        numeric = {m: [c for c in calls if _is_number(c[1])] for m, calls in self.logs.items()}
        self.kept = {m: [c for c in calls if not _is_number(c[1])] for m, calls in self.logs.items()}
        payload = (_portable(results), {m: [(n, _portable(v), a, k) for n, v, a, k in calls]
                                        for m, calls in numeric.items()}, self.prints)
        everyone = [payload]
        if group_size(group) > 1:
            everyone = [None] * group_size(group)
            dist.all_gather_object(everyone, payload, group=group)
        outputs: dict[int, Any] = {}
        self.logs, self.prints = {}, {}
        for rank_results, rank_logs, rank_prints in everyone:
            outputs.update(rank_results)
            self.logs.update(rank_logs)
            self.prints.update(rank_prints)
        if sorted(outputs) != list(range(microbatches)):
            raise RuntimeError(f"The pipeline produced outputs for microbatches {sorted(outputs)} of {microbatches}.")
        to_device = lambda t: t.to(device) if isinstance(t, Tensor) else t  # noqa: E731
        return {m: tree_map(to_device, out) for m, out in outputs.items()}

    def replay(self, device: torch.device, log: Optional[Callable[..., None]] = None) -> None:
        """Call ``self.log`` once per name with the mean over microbatches (numbers) or as given (the rest)."""
        log = log or self.module.log
        names: dict[str, tuple[list[Any], tuple, dict]] = {}
        for m in sorted(self.logs):
            for name, value, args, kwargs in self.logs[m]:
                names.setdefault(name, ([], args, kwargs))[0].append(value)
        for name, (values, args, kwargs) in names.items():
            mean = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values]).mean()
            dtype = values[0].dtype if isinstance(values[0], Tensor) and values[0].is_floating_point() else torch.float32
            log(name, mean.to(device=device, dtype=dtype), *args, **kwargs)
        for m in sorted(self.kept):
            for name, value, args, kwargs in self.kept[m]:
                log(name, value, *args, **kwargs)
        for m in sorted(self.prints):
            for args, kwargs in self.prints[m]:
                if kwargs.pop("stderr", False):
                    kwargs["file"] = sys.stderr
                self.module.print(*args, **kwargs)  # LightningModule.print: global rank 0 only
        self.logs, self.kept, self.prints = {}, {}, {}


class _Microbatch:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, tuple, dict]] = []
        self.prints: list[tuple[tuple[str, ...], dict]] = []
        self.finished = True

    def stopped(self) -> None:
        self.finished = False


def _is_number(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _printable(args: tuple, kwargs: dict) -> tuple[tuple[str, ...], dict]:
    """A ``print`` call that can be sent: arguments rendered as ``print`` renders them; ``sep``, ``end`` and
    ``flush`` kept, ``file`` kept when it is stdout or stderr."""
    options = {k: kwargs[k] for k in ("sep", "end", "flush") if k in kwargs}
    if kwargs.get("file") is sys.stderr:
        options["stderr"] = True
    return tuple(str(a) for a in args), options
