"""The data axis as a component of a Lightning strategy: every rank of the data group holds the same (local) module,
and its gradients are averaged in buckets whose all-reduce starts while backward runs (``comm/buckets.py``). ``dp``
is this axis alone; ``tp1d``, the pipelines and ``hybrid`` (without ZeRO) use it for their data dimension, on the
module their other axes left. ZeRO replaces it (``zero/axis.py``).

The strategy calls :meth:`build` in ``setup_module`` (fit only, when the data group has several ranks),
:meth:`before_backward` before each backward, :meth:`set_sync` from ``set_grad_sync``, :meth:`finish` after
backward, :meth:`reset` after an exception and :meth:`remove` at teardown.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_par.comm.buckets import GradientBucketer


def grouped_buckets(bucket_mode: str, reduce_dtype: str, backend: str, device: torch.device) -> bool:
    """Whether ``bucket_mode`` means grouped (in-place) buckets here; ``"auto"`` picks grouped unless the gradients
    are reduced in another dtype (a copy anyway) or gloo would have to coalesce GPU tensors (CPU only)."""
    if bucket_mode != "auto":
        return bucket_mode == "grouped"
    return reduce_dtype == "fp32" and not (backend == "gloo" and device.type != "cpu")


class DataAxis:
    """Bucketed gradient averaging over the data group; the arguments are ``dp``'s (see its docstring)."""

    def __init__(self, bucket_size_mb: float = 25.0, reduce_dtype: Literal["fp32", "compute"] = "fp32",
                 bucket_mode: Literal["auto", "flat", "grouped"] = "auto") -> None:
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be positive; got {bucket_size_mb}.")
        if reduce_dtype not in ("fp32", "compute"):
            raise ValueError(f"reduce_dtype must be 'fp32' or 'compute'; got {reduce_dtype!r}.")
        if bucket_mode not in ("auto", "flat", "grouped"):
            raise ValueError(f"bucket_mode must be 'auto', 'flat' or 'grouped'; got {bucket_mode!r}.")
        if bucket_mode == "grouped" and reduce_dtype != "fp32":
            raise ValueError("bucket_mode='grouped' reduces the gradients in place, in their own dtype; it cannot be "
                             "combined with reduce_dtype='compute'. Use bucket_mode='flat' (or 'auto') for a bf16 "
                             "reduction.")
        self.bucket_size_mb = bucket_size_mb
        self.reduce_dtype = reduce_dtype
        self.bucket_mode = bucket_mode
        self.bucketer: Optional[GradientBucketer] = None
        self._rebuild: Optional[tuple] = None  # what `build` was given: `before_backward` may build again

    def build(self, module: nn.Module, group: dist.ProcessGroup, compute_dtype: torch.dtype, device: torch.device,
              sync: bool) -> None:
        self.remove()
        wire = compute_dtype if self.reduce_dtype == "compute" else None
        grouped = grouped_buckets(self.bucket_mode, self.reduce_dtype, dist.get_backend(group), device)
        self.bucketer = GradientBucketer(module.named_parameters(), group,
                                         bucket_bytes=int(self.bucket_size_mb * 2**20), reduce_dtype=wire,
                                         grouped=grouped)
        self.bucketer.sync = sync
        self._rebuild = (module, group, compute_dtype, device)

    def before_backward(self, sync: bool) -> None:
        # A layer unfrozen during fit (fine-tuning callbacks) has no bucket yet: rebuild, or its gradient would never
        # be averaged. Parameters frozen later (or toggled off by `toggle_optimizer`) need no rebuild.
        if self.bucketer is not None and not self.bucketer.covers(self._rebuild[0].parameters()):
            self.build(*self._rebuild, sync=sync)

    def set_sync(self, enabled: bool) -> None:
        if self.bucketer is not None:
            self.bucketer.sync = enabled

    def finish(self) -> None:
        """Launch what backward left unlaunched and wait for every bucket (a synchronising backward only)."""
        if self.bucketer is not None:
            self.bucketer.finish()

    def reset(self) -> None:
        if self.bucketer is not None:
            self.bucketer.reset()

    def remove(self) -> None:
        if self.bucketer is not None:
            self.bucketer.remove()
            self.bucketer = None
