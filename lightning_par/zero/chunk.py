"""A ZeRO chunk's buffers and per-round state (the engine's unit of communication)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_par.zero.host import PinnedHost
from lightning_par.zero.layout import ChunkLayout, Piece

__all__ = ["Chunk"]


class Chunk:
    """One chunk of parameters on this rank: its compute buffer, this rank's shard of it (master weights, gradient,
    on the device or in pinned host memory), and the per-round bookkeeping of backward (see [Note: what lives
    where] in ``engine.py``)."""

    def __init__(self, index: int, params: list[nn.Parameter], full: Tensor, layout: ChunkLayout, rank: int,
                 separate_master: bool, compute_dtype: torch.dtype, device: torch.device, host: bool,
                 pinned: PinnedHost, host_grad_dtype: torch.dtype) -> None:
        """``full``: the chunk's initial values in fp32 (so that masters keep their full precision)."""
        self.index = index
        self.params = params
        self.slots = layout.slots_in(index)
        self.padded = layout.padded_numel(index)
        self.shard_numel = layout.shard_numel(index)
        self.shard_start = rank * self.shard_numel
        self.compute = full if compute_dtype == torch.float32 else full.to(compute_dtype)
        shard = slice(self.shard_start, self.shard_start + self.shard_numel)
        self.host = host  # the optimizer side (master, gradient shard, optimizer state) lives in host memory
        if host:  # pinned, so that copies to and from the device run asynchronously
            self.master = pinned.empty(self.shard_numel).copy_(full[shard])
            self.grad_shard = pinned.zeros(self.shard_numel, host_grad_dtype)
        else:
            self.master = full[shard].clone() if separate_master else self.compute[shard]
            self.grad_shard = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.grad_full: Optional[Tensor] = None  # stage 1: persistent; stages 2-3: only while backward fills it
        self.trainable = [p.requires_grad for p in params]
        self.ready = [False] * len(params)
        self.touched = [False] * len(params)  # got a gradient in this accumulation window
        self.pending = sum(self.trainable)
        self.reduce_work: Any = None
        self.reduce_input: Optional[Tensor] = None
        self.reduced: Optional[Tensor] = None
        self.grad_sent = False  # offloaded: the reduced gradient is already on its way to the host
        self.gathered = True
        self.gather_work: Any = None
        self.gather_input: Optional[Tensor] = None
        self.copied: Any = None  # offloaded, on CUDA: event after the host-to-device copy of a gather
        self.nvme = False  # offloaded, and its optimizer state lives in files between steps
        # delay_update (see [Note: the delayed host step]): stage 3's compute copies, the one the device reads (front)
        # and the next one the host step writes (back), and the gradient buffer the next backward fills while it runs.
        self.published: Optional[Tensor] = None
        self.publishing: Optional[Tensor] = None
        self.grad_spare: Optional[Tensor] = None
        self.read_done: Any = None  # stages 1-2: event after the refresh's copy of the master to the device
        # A host gradient shard kept in 16 bits is not held by the pieces (a parameter's .grad has its dtype): it
        # steps in a window of its own, and `window_open[k]` says piece k has a gradient of the current window.
        self.window_open: list[bool] = []
        self.forward_remaining = 0
        self.pieces: list[tuple[Piece, nn.Parameter]] = []
        self.piece_slots: list[int] = []  # the slot (parameter) each piece belongs to

    @property
    def arriving(self) -> bool:
        """A gather or a host-to-device copy into the compute buffer was launched, and no read has waited for it."""
        return self.gather_work is not None or self.copied is not None

    @property
    def half_grads(self) -> bool:
        return self.host and self.grad_shard.dtype != torch.float32

    def view(self, buffer: Tensor, i: int) -> Tensor:
        s = self.slots[i]
        return buffer[s.offset : s.offset + s.numel].view_as(self.params[i])

    def reset_round(self) -> None:
        # Re-read: layers may be frozen or unfrozen between steps (fine-tuning, `toggle_optimizer`).
        self.trainable = [p.requires_grad for p in self.params]
        self.ready = [False] * len(self.params)
        self.touched = [False] * len(self.params)
        self.pending = sum(self.trainable)
