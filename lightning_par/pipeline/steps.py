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

import math
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

__all__ = ["batch_size_of", "split_batch", "eval_microbatches", "merge_outputs", "StepRecorder", "OutputExchange"]


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
              device: torch.device, exchange: Optional["OutputExchange"] = None,
              host_group: Optional[ProcessGroup] = None) -> dict[int, Any]:
        """Exchange outputs and log records with the other ranks of the pipeline; returns every microbatch's output
        (on ``device``). Collective over ``group``; with ``exchange`` and ``host_group`` (gloo) it runs without a
        host sync once the step's outputs repeat their shapes (see [Note: sharing outputs without a host sync])."""
        numeric = {m: [c for c in calls if _is_number(c[1])] for m, calls in self.logs.items()}
        self.kept = {m: [c for c in calls if not _is_number(c[1])] for m, calls in self.logs.items()}
        everyone = None
        skeleton = None
        if exchange is not None and group_size(group) > 1:
            skeleton, tensors = _skeleton(results, numeric, self.kept, self.prints, device)
            everyone = exchange.fast(skeleton, tensors, group, host_group, device)
        if everyone is None:
            payload = (_portable(results), {m: [(n, _portable(v), a, k) for n, v, a, k in calls]
                                            for m, calls in numeric.items()}, self.prints, skeleton)
            everyone = [payload]
            if group_size(group) > 1:
                everyone = [None] * group_size(group)
                dist.all_gather_object(everyone, payload, group=group)
            if exchange is not None:
                exchange.record([entry[3] for entry in everyone])
        outputs: dict[int, Any] = {}
        self.logs, self.prints = {}, {}
        for rank_results, rank_logs, rank_prints, _ in everyone:
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


# [Note: sharing outputs without a host sync]
# Every rank of the pipeline needs the step's outputs (Lightning's loop and callbacks read the loss) and the logged
# numbers, which only the last stage computed. Sending them as Python objects (``all_gather_object``) copies every
# tensor to the host: a host sync every step, after which the host cannot queue the next step's work while the
# device finishes this one. So the first step records each rank's *skeleton* (which microbatches it finished, the
# structure of their outputs, the names and arguments of their log calls, the shapes and dtypes of every tensor);
# from then on, when every rank's outputs are tensors on the device with the skeleton it recorded (the ranks agree
# on that over the gloo side group: a host-only exchange of one flag), the tensors travel in one float64 all-reduce
# on the device (each rank fills its own segment; float64 holds every float type and integers up to 2^53 exactly)
# and are cut back into place with the recorded skeletons. Anything else (a Python number or a metric logged, a
# print, changed shapes) takes the object path for that step, which records the skeletons again.


class OutputExchange:
    """The recorded skeletons of every rank of one pipeline group (see the note above)."""

    def __init__(self) -> None:
        self.skeletons: Optional[list[Any]] = None

    def record(self, skeletons: list[Any]) -> None:
        self.skeletons = skeletons if all(s is not None for s in skeletons) else None

    def fast(self, skeleton: Any, tensors: list[Tensor], group: Optional[ProcessGroup],
             host_group: Optional[ProcessGroup], device: torch.device) -> Optional[list[tuple]]:
        """Every rank's ``(results, logs, prints, skeleton)`` from device tensors alone, or None when some rank must
        take the object path. Collective over ``host_group`` (and then ``group``) on every rank."""
        if host_group is None:
            return None
        rank = dist.get_rank(group)
        mine = self.skeletons is not None and skeleton is not None and _same(skeleton, self.skeletons[rank])
        agreed = torch.tensor([1 if mine else 0], dtype=torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=host_group)
        if not int(agreed[0]):
            return None
        sizes = [sum(math.prod(shape) for shape, _ in sk[2]) for sk in self.skeletons]
        buffer = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
        if tensors:
            start = sum(sizes[:rank])
            torch.cat([t.reshape(-1).to(torch.float64) for t in tensors], out=buffer[start:start + sizes[rank]])
        dist.all_reduce(buffer, group=group)
        everyone, offset = [], 0
        for (spec, log_entries, metas), size in zip(self.skeletons, sizes):
            values = []
            for shape, dtype in metas:
                n = math.prod(shape)
                values.append(buffer[offset:offset + n].view(shape).to(dtype))
                offset += n
            count = spec.num_leaves
            results = tree_unflatten(values[:count], spec)
            logs, rest = {}, iter(values[count:])
            for m, calls in log_entries:
                logs[m] = [(name, next(rest), args, dict(kwargs)) for name, args, kwargs in calls]
            everyone.append((results, logs, {}, None))
        return everyone


def _skeleton(results: dict[int, Any], numeric: dict[int, list], kept: dict[int, list], prints: dict[int, list],
              device: torch.device) -> tuple[Any, list[Tensor]]:
    """This rank's skeleton and tensors in order, or ``(None, [])`` when they cannot take the device path."""
    if any(kept.values()) or prints:
        return None, []
    leaves, spec = tree_flatten(results)
    log_entries = tuple((m, tuple((name, args, tuple(sorted(kwargs.items()))) for name, _, args, kwargs in calls))
                        for m, calls in sorted(numeric.items()))
    tensors = leaves + [value for m, _ in log_entries for _, value, _, _ in numeric[m]]
    if not all(isinstance(t, Tensor) and t.device == device for t in tensors):
        return None, []
    return (spec, log_entries, tuple((tuple(t.shape), t.dtype) for t in tensors)), [t.detach() for t in tensors]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an argument of self.log that does not compare: take the object path
        return False


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
