"""Where each chunk's optimizer side lives: on the compute device or in the host's (pinned) memory.

A chunk's optimizer side is its fp32 master shard (which is also its parameters at rest at stage 3), its fp32
gradient shard and the optimizer state for that shard: ``8 + 4·k`` bytes per element for an optimizer with k fp32
state tensors per parameter (Adam: k = 2, 16 bytes). The compute-dtype parameters exist on the device only while a
chunk is gathered, so they count as working memory, not as model memory here.

Pure arithmetic and a reading of /proc/meminfo: the engine decides, these functions compute.

[Note: which chunks go to the host]
The plan keeps the *first* chunks on the device and sends the last ones to the host. Right after the optimizer step
the next forward needs chunk 0 first and the last chunk last, so the host chunks are the ones needed furthest in
the future (their copies to the device are prefetched while earlier chunks compute); in backward their gradients are
produced first, so their copies to the host overlap the rest of backward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional, Sequence

GiB = 2**30
WRITES_IN_FLIGHT = 2  # chunks whose optimizer state is on its way to disk while the next one steps (zero/spill.py)

# fp32 state tensors per parameter element, by optimizer class name; unknown optimizers are assumed to keep two.
STATE_TENSORS = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1, "Adadelta": 2,
                 "RMSprop": 1, "Rprop": 2, "ASGD": 2}


class HostMemoryError(RuntimeError):
    """The plan needs more host memory than this rank may use."""


@dataclass(frozen=True)
class Plan:
    """``on_host[c]``: chunk c's optimizer side lives in host memory; ``on_nvme[c]`` (a subset): its optimizer
    state lives in files between steps, its master and gradient shard (8 bytes per element) in host memory."""

    on_host: tuple[bool, ...]
    bytes_per_element: int
    shard_numels: tuple[int, ...]
    on_nvme: tuple[bool, ...] = ()
    host_grad_bytes: int = 4  # 2 when host gradient shards are kept in the 16-bit compute dtype
    host_extra_bytes: int = 0  # delay_update: a spare gradient shard and two compute copies per host element

    def nvme(self, c: int) -> bool:
        return bool(self.on_nvme) and self.on_nvme[c]

    def host_bytes(self) -> int:
        in_memory = self.bytes_per_element - 4 + self.host_grad_bytes + self.host_extra_bytes  # master, grad, state
        on_disk = 4 + self.host_grad_bytes  # master and gradient; the state is in files
        return self.window_bytes() + sum(n * (on_disk if self.nvme(c) else in_memory)
                                         for c, (n, h) in enumerate(zip(self.shard_numels, self.on_host)) if h)

    def window_bytes(self) -> int:
        """Host buffers of the optimizer step in windows (``zero/spill.py``) at their largest: the optimizer state of
        the chunk read ahead, of the one stepping and of the writes in flight (chunks whose state is on disk), and
        the fp32 copy of a 16-bit gradient shard (``host_grads="compute"``). Bounded by the largest of each."""
        on_disk = sorted((n for c, n in enumerate(self.shard_numels) if self.nvme(c)), reverse=True)
        on_host = [n for n, h in zip(self.shard_numels, self.on_host) if h]
        state = sum(on_disk[: WRITES_IN_FLIGHT + 2]) * (self.bytes_per_element - 8)
        cast = 4 * max(on_host, default=0) if self.host_grad_bytes < 4 else 0
        return state + cast

    def nvme_bytes(self) -> int:
        return sum(n for c, n in enumerate(self.shard_numels) if self.nvme(c)) * (self.bytes_per_element - 8)

    def device_bytes(self) -> int:
        return sum(n for n, h in zip(self.shard_numels, self.on_host) if not h) * self.bytes_per_element

    def describe(self, device: str) -> str:
        host, nvme = sum(self.on_host), sum(self.on_nvme)
        out = (f"{len(self.on_host) - host} of {len(self.on_host)} chunks ({self.device_bytes() / GiB:.2f} GiB of "
               f"masters, gradients and optimizer state) on {device}, {host} ({self.host_bytes() / GiB:.2f} GiB) "
               "on the host")
        if nvme:
            out += f", of which {nvme} keep their optimizer state on disk ({self.nvme_bytes() / GiB:.2f} GiB)"
        return out


def state_tensors(optimizer: object) -> int:
    """fp32 state tensors per element that ``optimizer`` keeps (SGD: one with momentum, none without)."""
    kind = type(optimizer).__name__
    if kind == "SGD":
        return int(any(g.get("momentum", 0) for g in optimizer.param_groups))  # type: ignore[attr-defined]
    if kind in ("Adam", "AdamW") and any(g.get("amsgrad") for g in optimizer.param_groups):  # type: ignore[attr-defined]
        return 3
    return STATE_TENSORS.get(kind, 2)


def bytes_per_element(states: int = 2) -> int:
    """Master (4) + gradient shard (4) + 4 per optimizer state tensor; before the optimizer is known, Adam's 2."""
    return 8 + 4 * states


def plan_fraction(shard_numels: Sequence[int], fraction: float, bytes_per_elem: int) -> Plan:
    """The last chunks, holding at least ``fraction`` of this rank's elements, on the host."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The offload fraction must lie in [0, 1]; got {fraction}.")
    total = sum(shard_numels)
    on_host = [False] * len(shard_numels)
    offloaded = 0
    for c in reversed(range(len(shard_numels))):
        if offloaded >= fraction * total or fraction == 0.0:
            break
        on_host[c] = True
        offloaded += shard_numels[c]
    return Plan(tuple(on_host), bytes_per_elem, tuple(shard_numels))


def plan_budget(shard_numels: Sequence[int], budget_bytes: float, bytes_per_elem: int) -> Plan:
    """The first chunks, as many as fit in ``budget_bytes``, on the device; the rest on the host."""
    on_host = []
    used = 0
    for n in shard_numels:
        fits = not any(on_host) and used + n * bytes_per_elem <= budget_bytes
        on_host.append(not fits)
        used += n * bytes_per_elem if fits else 0
    return Plan(tuple(on_host), bytes_per_elem, tuple(shard_numels))


def spill_to_disk(plan: Plan, host_limit: int) -> Plan:
    """Turn the last host chunks into disk chunks (optimizer state in files) until the host part fits in
    ``host_limit`` bytes, or every host chunk spills."""
    on_nvme = [False] * len(plan.on_host)
    spilled = replace(plan, on_nvme=tuple(on_nvme))
    for c in reversed(range(len(plan.on_host))):
        if spilled.host_bytes() <= host_limit:
            break
        if plan.on_host[c]:
            on_nvme[c] = True
            spilled = replace(plan, on_nvme=tuple(on_nvme))
    return spilled


def host_memory_available(local_ranks: Optional[int] = None) -> int:
    """Bytes of host memory one rank may plan with: the kernel's MemAvailable, less 3% and 2 GiB for what else the
    processes allocate, shared evenly by the ranks of this host (they plan at the same time)."""
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:  # not Linux: physical memory
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(0, int(0.97 * available) - 2 * GiB) // max(local_ranks, 1)


def host_shortfall_message(plan: Plan, limit: int, rank: int, what: str,
                           done: str = "Nothing was allocated or written.") -> str:
    """``done``: what had happened when the plan was refused (set-up: nothing; the re-plan: the measured step)."""
    window = plan.window_bytes()
    of_it = f"; {window / GiB:.2f} GiB of it for the step of the chunks on disk" if window else ""
    return (
        f"{what} on rank {rank} needs {plan.host_bytes() / GiB:.2f} GiB of host memory for the chunks it places "
        f"there ({plan.bytes_per_element} bytes per element: fp32 master, gradient and optimizer state{of_it}), but "
        f"this rank may use {limit / GiB:.2f} GiB (`host_memory_limit`, or the host's available memory shared by its "
        f"ranks). {done} Use more ranks (each holds 1/N), keep more on the GPU (a smaller "
        "offload fraction, or offload='auto'), or spill optimizer state to disk with `zero3_nvme`."
    )
