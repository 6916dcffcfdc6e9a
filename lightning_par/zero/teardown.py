"""Where a ZeRO engine makes its module whole when fit ends: on the device when it fits, else on the host, after
checking the host has room. Shared by every strategy that runs the engine (``zero*``, ``hybrid``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_par.comm.flat import every_rank
from lightning_par.zero.placement import HostMemoryError, host_memory_available

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine


def whole_module_device(engine: "ZeroEngine", root_device: torch.device, offloading: bool,
                        local_ranks: int) -> tuple[torch.device, str]:
    """Where ``engine.unshard`` should put the module, and why: the device when the whole model fits in its free
    memory (with the engine's gradients freed first and one chunk of room to gather into), else the host; always the
    host for offloading strategies, whose training never held the whole model on the device. Every rank agrees, and
    a host without room is refused on every rank before anything is allocated."""
    device, reason = _choose(engine, root_device, offloading)
    if device.type == "cpu" and root_device.type != "cpu":
        _check_host_room(engine, device, local_ranks)
    return device, reason


def _choose(engine: "ZeroEngine", root_device: torch.device, offloading: bool) -> tuple[torch.device, str]:
    if root_device.type != "cuda":
        return root_device, "the device is the host"
    if offloading:
        return torch.device("cpu"), "offloading strategy: training never held the whole model on the device"
    engine.drop_gradients()
    need = sum(p.numel() * engine.original_dtypes[p].itemsize for c in engine.chunks for p in c.params)
    need += max((4 * c.padded for c in engine.chunks), default=0)
    free, _ = torch.cuda.mem_get_info(root_device)
    free += torch.cuda.memory_reserved(root_device) - torch.cuda.memory_allocated(root_device)
    fits = need <= 0.9 * free
    if engine.world_size > 1:
        fits = every_rank(fits, engine.group, root_device)
    if fits:
        return root_device, f"{need / 2**30:.1f} GiB fits in the free device memory"
    return torch.device("cpu"), f"{need / 2**30:.1f} GiB does not fit in the free device memory of every rank"


def _check_host_room(engine: "ZeroEngine", device: torch.device, local_ranks: int) -> None:
    """Refuse, on every rank together and before allocating, a teardown that cannot fit the whole module in host
    memory: the kernel would kill the process instead (12B on one H100, 2026-11-26). The engine is left intact, so
    ``trainer.save_checkpoint`` still writes the trained shards."""
    need = engine.unshard_bytes(device)
    available = host_memory_available(local_ranks)

    def check() -> None:
        if need > available:
            raise HostMemoryError(
                f"ZeRO teardown: making the module whole on the host needs {need / 2**30:.1f} GiB of host memory "
                f"on rank {engine.rank}, but {available / 2**30:.1f} GiB is available. Training finished and "
                "the trained state is intact in the engine's shards: write it with `trainer.save_checkpoint(path)` "
                "(or the checkpoints ModelCheckpoint wrote) and make one file of it with lightning-par-consolidate; "
                "or train on more ranks (each holds 1/N of the module)."
            )

    engine._agree(check)
