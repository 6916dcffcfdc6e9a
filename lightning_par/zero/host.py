"""Page-locked host tensors of exactly their size, given back to the system when freed.

torch's pinned allocator (``torch.empty(..., pin_memory=True)``) rounds every allocation up to a power of two and
keeps freed blocks cached for reuse. For offloaded chunks that costs up to 2x: a wide layer's weight is a chunk of
its own (5120 x 20480 fp32 = 420 MB becomes 512 MiB), and a chunk moved back to the device keeps its host memory.
Here a tensor is allocated as ordinary (pageable) memory and page-locked in place with ``cudaHostRegister``, so it
costs its size, copies from and to it run asynchronously like any pinned copy, and ``free`` unregisters it and lets
the memory go back to the system.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class PinnedHost:
    """Allocates the host tensors of one engine; ``enabled=False`` (CPU training) gives plain tensors."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._registered: dict[int, Tensor] = {}  # data pointer -> tensor: kept alive until unregistered

    def empty(self, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        t = torch.empty(numel, dtype=dtype)
        if not self.enabled or numel == 0:
            return t
        error = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(error) != 0 or not t.is_pinned():
            warnings.warn(f"cudaHostRegister failed ({error}); this host buffer stays pageable (slower copies).")
            return t
        self._registered[t.data_ptr()] = t
        return t

    def zeros(self, numel: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.empty(numel, dtype).zero_()

    def free(self, t: Tensor) -> None:
        """Unregister ``t`` (the caller drops its own references; views of it must be gone)."""
        if self._registered.pop(t.data_ptr(), None) is not None:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())

    def close(self) -> None:
        for ptr in list(self._registered):
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._registered.clear()

    @property
    def registered_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._registered.values())
