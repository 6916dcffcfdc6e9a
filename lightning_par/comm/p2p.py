"""Point-to-point transfer of a tensor or a tuple of tensors whose shapes the receiver does not know in advance.

Wire format, per transfer from one rank to another: one fixed-size int64 metadata message, then one message per
non-empty tensor. The metadata is fixed-size so the receiver can post its receive before knowing anything (no
length handshake, no blocking in ``irecv_tensors``). Both ends must be on the same ``group`` and pair their
transfers in the same order, as with any point-to-point protocol.

The pipeline executor does not use these functions: it posts each slot of transfers as one batch, with shapes it
recorded per input signature, through the building blocks at the end of this module (see [Note: batched slots and
recorded shapes]).
"""

from __future__ import annotations

import math
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
    "Spec",
    "post_batch",
    "wire_meta",
    "spec_of",
    "packed_size",
    "pack_tensors",
    "unpack_value",
    "encode_meta",
    "decode_meta",
    "describe_spec",
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


def _meta(tensors: Sequence[torch.Tensor], is_tuple: bool) -> list[int]:
    meta = [int(is_tuple), len(tensors)]
    for t in tensors:
        if t.dtype not in _DTYPE_CODE:
            raise ValueError(f"send_tensors: dtype {t.dtype} is not supported")
        meta += [_DTYPE_CODE[t.dtype], int(t.requires_grad), t.dim(), *t.shape]
    if len(meta) > META_SLOTS:
        raise ValueError(f"send_tensors: metadata needs {len(meta)} int64 slots, more than META_SLOTS={META_SLOTS}")
    return meta


def _encode(meta: list[int], device: torch.device) -> torch.Tensor:
    buf = torch.zeros(META_SLOTS, dtype=torch.int64)
    buf[: len(meta)] = torch.tensor(meta, dtype=torch.int64)
    return buf.to(device)


Spec = tuple[bool, list[tuple[torch.dtype, bool, tuple[int, ...]]]]  # is_tuple, (dtype, requires_grad, shape)


def _parse(meta: list[int]) -> Spec:
    is_tuple, count, pos, specs = bool(meta[0]), meta[1], 2, []
    for _ in range(count):
        code, requires_grad, ndim = meta[pos : pos + 3]
        shape = tuple(meta[pos + 3 : pos + 3 + ndim])
        specs.append((_DTYPES[code], bool(requires_grad), shape))
        pos += 3 + ndim
    return is_tuple, specs


def _decode(buf: torch.Tensor) -> Spec:
    return _parse(buf.tolist())


# Packed messages: every tensor's bytes at a 16-byte-aligned offset in one uint8 buffer, so a transfer of several
# tensors whose shapes both ends know is one message (the pipeline executor's fast path, [Note: batched slots and
# recorded shapes] below). The received tensors are views of the buffer (no copy); the sender pays one copy in.
_ALIGN = 16  # every dtype can be viewed at a multiple of 16 bytes


def _layout(specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the packed buffer, and the buffer's size."""
    offsets, end = [], 0
    for dtype, shape in specs:
        end = -(-end // _ALIGN) * _ALIGN
        offsets.append(end)
        end += math.prod(shape) * dtype.itemsize
    return offsets, max(end, 1)  # one byte at least: a message of only empty tensors still pairs the two ends


def _pack(items: Sequence[torch.Tensor]) -> torch.Tensor:
    offsets, size = _layout([(t.dtype, tuple(t.shape)) for t in items])
    buf = torch.empty(size, dtype=torch.uint8, device=items[0].device)
    for t, offset in zip(items, offsets):
        if t.numel():
            buf[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t.detach())
    return buf


def _unpack(buf: torch.Tensor, specs: Sequence[tuple[torch.dtype, bool, tuple[int, ...]]]) -> list[torch.Tensor]:
    offsets, _ = _layout([(dtype, shape) for dtype, _, shape in specs])
    tensors = []
    for (dtype, _, shape), offset in zip(specs, offsets):
        size = math.prod(shape) * dtype.itemsize
        tensors.append(buf[offset : offset + size].view(dtype).view(shape) if size
                       else torch.empty(shape, dtype=dtype, device=buf.device))
    return tensors


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
        self._result: Tensors | None = None
        self._buf = torch.empty(META_SLOTS, dtype=torch.int64, device=device)
        self._work = self._irecv(self._buf)

    def _irecv(self, buf: torch.Tensor):
        return dist.irecv(buf, src=self._src, group=self._group)

    def wait(self) -> Tensors:
        if self._result is not None:
            return self._result
        self._work.wait()
        is_tuple, specs = _decode(self._buf)
        # Payload receives are only posted now (their shapes were unknown); the sender's isends are queued.
        tensors, works = [], []
        for dtype, _, shape in specs:
            t = torch.empty(shape, dtype=dtype, device=self._device)
            if t.numel():
                works.append(self._irecv(t))
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
    buffers = [_encode(_meta(items, is_tuple), items[0].device)] + [t.detach().contiguous() for t in items if t.numel()]
    works = [dist.isend(b, dst=peer, group=group) for b in buffers]
    return SendHandle(works, buffers)


def irecv_tensors(src: int, group: ProcessGroup | None, device: torch.device | str | None = None) -> RecvHandle:
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


# [Note: batched slots and recorded shapes]
# The pipeline executor posts the SENDs and RECVs between two of its computes (a slot) as one
# ``dist.batch_isend_irecv``: NCCL groups them, so the sends and receives of a slot progress together, and a rank's
# slots run in order on one stream (the schedule is built so that this cannot deadlock: [Note: communication
# actions] in lightning_par/pipeline/schedules.py). It knows every transfer's shapes in advance: the first step
# with a new input signature sends each transfer's metadata and packed payload over a gloo group (host waits there
# are fine once per signature) and both ends record the shapes per action; later steps post receives of the
# recorded size, one packed message per transfer, and never read anything on the host. These are the pieces.


def post_batch(ops: Sequence[tuple[bool, torch.Tensor, int, int]], group: ProcessGroup | None) -> list:
    """Post ``(is_send, tensor, group peer, tag)`` operations as one ``dist.batch_isend_irecv``; one Work per
    operation (the batch's single Work repeated where the backend coalesces the batch, as NCCL does)."""
    if not ops:
        return []
    p2p = [dist.P2POp(dist.isend if is_send else dist.irecv, t, group=group, tag=tag, group_peer=peer)
           for is_send, t, peer, tag in ops]
    works = dist.batch_isend_irecv(p2p)
    if len(works) == len(p2p):
        return list(works)
    if len(works) == 1:
        return list(works) * len(p2p)
    raise RuntimeError(f"batch_isend_irecv returned {len(works)} works for {len(p2p)} operations")


def wire_meta(value: Tensors | Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The metadata of a tensor or tuple of tensors (read from shapes only: no device sync) and its tensors."""
    is_tuple = not isinstance(value, torch.Tensor)
    items = list(value) if is_tuple else [value]
    if not items:
        raise ValueError("send_tensors: nothing to send (empty sequence)")
    return _meta(items, is_tuple), items


def spec_of(meta: list[int]) -> Spec:
    return _parse(meta)


def packed_size(spec: Spec) -> int:
    """Bytes of the packed message of ``spec`` (see ``pack_tensors``)."""
    return _layout([(dtype, shape) for dtype, _, shape in spec[1]])[1]


def pack_tensors(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """One uint8 buffer holding every tensor at an aligned offset (a copy on the tensors' device)."""
    return _pack(items)


def unpack_value(buf: torch.Tensor, spec: Spec, device: torch.device | None = None) -> Tensors:
    """The tensor or tuple a packed buffer holds (views of it, or copies on ``device`` when that differs), with the
    sender's ``requires_grad``."""
    tensors = _unpack(buf, spec[1])
    if device is not None and torch.device(device) != buf.device:
        tensors = [t.to(device) for t in tensors]
    for t, (_, requires_grad, _) in zip(tensors, spec[1]):
        if requires_grad:
            t.requires_grad_(True)
    return tuple(tensors) if spec[0] else tensors[0]


def encode_meta(meta: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed-size int64 message of ``meta`` (``META_SLOTS`` long)."""
    return _encode(meta, torch.device(device))


def decode_meta(buf: torch.Tensor) -> tuple[list[int], Spec]:
    """Metadata list and spec from a received ``encode_meta`` message (reads it on the host)."""
    values = buf.tolist()
    spec = _parse(values)
    used = 2 + sum(3 + len(shape) for _, _, shape in spec[1])
    return values[:used], spec


def describe_spec(spec: Spec) -> str:
    parts = [f"{str(dtype).removeprefix('torch.')}{list(shape)}" for dtype, _, shape in spec[1]]
    return f"({', '.join(parts)})" if spec[0] else parts[0]
