"""How a module is split into pipeline parts: by its blocks or by tracing its forward (checked against the
strategy's arguments), and the measured block times every rank cuts by."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch.distributed as dist
from torch import nn

from lightning_par.pipeline.partition import BlockLayout, PartitionError, find_blocks, measure_block_times

__all__ = ["agreed_block_times", "choose_split_mode"]


def choose_split_mode(module: nn.Module, split: str, blocks: Optional[str], balance: str,
                      split_points: Optional[Sequence[Union[int, str]]]) -> str:
    """'blocks' or 'trace' for ``split`` ('auto': blocks when the module has a blocks container), with the other
    arguments checked against it."""
    mode = split
    if mode == "auto":
        try:
            find_blocks(module, blocks)
            mode = "blocks"
        except PartitionError:
            if blocks is not None:
                raise
            mode = "trace"
    points = split_points or []
    if mode == "trace":
        if balance == "time":
            raise PartitionError("balance='time' measures the blocks of a blocks container; a split by tracing "
                                 "the forward is balanced by parameter count (balance='params').")
        if not all(isinstance(x, str) for x in points):
            raise PartitionError(f"split_points={split_points}: when the model is split by tracing its forward "
                                 "they are names of the modules where parts 1, 2, ... start, e.g. ['l3', 'l5'].")
    elif not all(isinstance(x, int) for x in points):
        raise PartitionError(f"split_points={split_points}: when the model is split by its blocks they are "
                             "block indices, e.g. [3, 6, 9]; module names need split='trace'.")
    return mode


def agreed_block_times(module: nn.Module, layout: BlockLayout, example: Any, measures: bool,
                       groups: Sequence[Any]) -> list[float]:
    """Each block's forward + backward time on ``example``, measured where ``measures`` (global rank 0) and passed
    on through ``groups`` in order (the data groups, then the pipeline groups), so every rank cuts alike."""
    run = lambda: module(*example) if isinstance(example, tuple) else module(example)  # noqa: E731
    box = [measure_block_times(module, layout, run) if measures else None]
    for group in groups:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
