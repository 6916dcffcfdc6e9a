"""Point-to-point transfer of a tensor or a tuple of tensors whose shapes the receiver does not know in advance.

Wire format, per transfer from one rank to another: one fixed-size int64 metadata message, then one message per
non-empty tensor. The metadata is fixed-size so the receiver can post its receive before knowing anything (no
length handshake, no blocking in ``irecv_tensors``). Both ends must be on the same ``group`` and pair their
transfers in the same order, as with any point-to-point protocol.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .collectives import group_rank

__all__ = [
    "send_tensors",
    "recv_tensors",
    "isend_tensors",
    "irecv_tensors",
    "SendHandle",
    "RecvHandle",
    "META_SLOTS",
]

Tensors = Union[torch.Tensor, tuple[torch.Tensor, ...]]

# Codes are list positions: both ends run the same code, so the table is the protocol.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}

# Layout: [is_tuple, count, then per tensor: dtype code, requires_grad, ndim, *shape]. 512 slots (4 KiB) hold e.g.
# 73 four-dimensional tensors; larger transfers raise ValueError on the sender.
META_SLOTS = 512


def _global_rank(group: ProcessGroup | None, rank: int) -> int:
    return dist.get_global_rank(group if group is not None else dist.group.WORLD, rank)


def _default_device(group: ProcessGroup | None) -> torch.device:
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(tensors: Sequence[torch.Tensor], is_tuple: bool, device: torch.device) -> torch.Tensor:
    meta = [int(is_tuple), len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPE_CODE:
            raise ValueError(f"send_tensors: dtype {t.dtype} is not supported")
        meta += [_DTYPE_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(meta) > META_SLOTS:
        raise ValueError(f"send_tensors: metadata needs {len(meta)} int64 slots, more than META_SLOTS={META_SLOTS}")
    buf = torch.zeros(META_SLOTS, dtype=torch.int64)
    buf[: len(meta)] = torch.tensor(meta, dtype=torch.int64)
    return buf.to(device)


def _decode(buf: torch.Tensor) -> tuple[bool, list[tuple[torch.dtype, bool, tuple[int, ...]]]]:
    meta = buf.tolist()
    is_tuple, count, pos, specs = bool(meta[0]), meta[1], 2, []
    for _ in range(count):
        code, requires_grad, ndim = meta[pos : pos + 3]
        shape = tuple(meta[pos + 3 : pos + 3 + ndim])
        specs.append((_DTYPES[code], bool(requires_grad), shape))
        pos += 3 + ndim
    return is_tuple, specs


class SendHandle(list):
    """The Work objects of one posted transfer; also keeps the send buffers alive until ``wait()``."""

    def __init__(self, works, buffers):
        super().__init__(works)
        self.buffers = buffers

    def wait(self) -> None:
        for work in self:
            work.wait()
        self.buffers = None


class RecvHandle:
    """A posted receive; ``wait()`` returns the tensor (or tuple) the sender passed."""

    def __init__(self, src: int, group: ProcessGroup | None, device: torch.device):
        self._src = _global_rank(group, src)
        self._group = group
        self._device = device
        self._meta = torch.empty(META_SLOTS, dtype=torch.int64, device=device)
        self._meta_work = dist.irecv(self._meta, src=self._src, group=group)
        self._result: Tensors | None = None

    def wait(self) -> Tensors:
        if self._result is not None:
            return self._result
        self._meta_work.wait()
        is_tuple, specs = _decode(self._meta)
        # Payload receives are only posted now (their shapes were unknown); the sender's isends are queued already.
        tensors, works = [], []
        for dtype, _, shape in specs:
            t = torch.empty(shape, dtype=dtype, device=self._device)
            if t.numel():
                works.append(dist.irecv(t, src=self._src, group=self._group))
            tensors.append(t)
        for work in works:
            work.wait()
        for t, (_, requires_grad, _) in zip(tensors, specs):
            if requires_grad:
                t.requires_grad_(True)
        self._result = tuple(tensors) if is_tuple else tensors[0]
        return self._result


def isend_tensors(tensors: Tensors | Sequence[torch.Tensor], dst: int, group: ProcessGroup | None) -> SendHandle:
    """Post the send of a tensor or a tuple of tensors to group rank ``dst``; ``.wait()`` the handle before reuse."""
    is_tuple = not isinstance(tensors, torch.Tensor)
    items = list(tensors) if is_tuple else [tensors]
    if not items:
        raise ValueError("send_tensors: nothing to send (empty sequence)")
    if dst == group_rank(group):
        raise ValueError(f"send_tensors: dst={dst} is this rank")
    peer = _global_rank(group, dst)
    # Metadata travels on the payload's device: NCCL needs it on the GPU, gloo takes CPU tensors.
    buffers = [_encode(items, is_tuple, items[0].device)]
    buffers += [t.detach().contiguous() for t in items if t.numel()]
    works = [dist.isend(b, dst=peer, group=group) for b in buffers]
    return SendHandle(works, buffers)


def irecv_tensors(
    src: int, group: ProcessGroup | None, device: torch.device | str | None = None
) -> RecvHandle:
    """Post a receive from group rank ``src``; ``device`` defaults to CPU on gloo, the current GPU on NCCL."""
    if src == group_rank(group):
        raise ValueError(f"recv_tensors: src={src} is this rank")
    return RecvHandle(src, group, torch.device(device) if device is not None else _default_device(group))


def send_tensors(tensors: Tensors | Sequence[torch.Tensor], dst: int, group: ProcessGroup | None) -> None:
    """Send a tensor or a tuple of tensors to group rank ``dst`` and wait for completion."""
    isend_tensors(tensors, dst, group).wait()


def recv_tensors(src: int, group: ProcessGroup | None, device: torch.device | str | None = None) -> Tensors:
    """Receive what ``send_tensors`` sent from group rank ``src``: a Tensor or a tuple, as sent.

    Tensors that required grad on the sender come back as leaves with ``requires_grad=True``.
    """
    return irecv_tensors(src, group, device).wait()
