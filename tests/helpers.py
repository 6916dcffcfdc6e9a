"""Run a function on N gloo ranks in fresh processes: the harness for communication tests.

Strategy tests go through Lightning's own Trainer and launchers instead; this helper is for primitives that need
a process group and nothing else.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: tuple, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # One thread per rank: 4-8 ranks share 2 cores in CI.
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on every rank of a fresh gloo group; return the results by rank.

    ``fn`` must be a module-level function (it is pickled into spawned processes). An exception on any rank fails
    the call with that rank's traceback.
    """
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(fn, world_size, free_port(), args, results), nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]
