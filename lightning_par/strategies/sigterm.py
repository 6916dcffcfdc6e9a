"""Lightning's per-step SIGTERM check, on the host instead of the GPU.

Lightning (2.5 and later) asks every training step whether rank 0 received SIGTERM
(``_TrainingEpochLoop._broadcast_sigterm_tensor``): it builds a one-element tensor on the training device from a
Python int, broadcasts it and reads it back with ``.item()``. On CUDA that is two host syncs per step, the pageable
copy in and the read out. Each one waits for the whole GPU queue to drain, so the host can never run ahead into the
next step: every launch gap of the forward pass then shows as idle GPU time (tp1d at 1.3B on 2 × H100: ~26 ms of a
~220 ms step under the profiler, most of it in the forward). The check here decides the same thing the same way
(rank 0's flag, a barrier, ``SIGTERMException`` on every rank) over a CPU (gloo) group: no device work, no sync.
"""

from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

import lightning.pytorch as pl

_LOOP_METHOD = "_broadcast_sigterm_tensor"


def host_sigterm_check(trainer: "pl.Trainer", host_group: Optional[dist.ProcessGroup]) -> bool:
    """Make ``trainer``'s training loop check for SIGTERM over ``host_group`` (a gloo group of all ranks).

    Returns whether it did: not when the Lightning version has no per-step check (nothing to replace) or there
    is no host group (a CPU run, whose check makes no device sync anyway)."""
    loop = trainer.fit_loop.epoch_loop
    if host_group is None or not callable(getattr(type(loop), _LOOP_METHOD, None)):
        return False

    def check(self) -> None:
        flag = torch.tensor([1 if getattr(self.trainer, "received_sigterm", False) else 0], dtype=torch.int32)
        dist.broadcast(flag, group_src=0, group=host_group)
        if int(flag[0]) == 1:
            with contextlib.suppress(Exception):
                dist.barrier(group=host_group)  # every rank raises together, none is left in a collective
            raise SIGTERMException()

    setattr(loop, _LOOP_METHOD, types.MethodType(check, loop))
    return True


def new_host_group(device: torch.device) -> Optional[dist.ProcessGroup]:
    """A gloo group of all ranks for host-side flags, or None when the default group is gloo already (a CPU run:
    Lightning's check syncs nothing there). Every rank must call it, in the same order."""
    if device.type == "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")
