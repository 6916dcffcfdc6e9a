"""Data parallel: every rank holds the whole model; gradients are averaged in buckets overlapped with backward. The
data axis alone (``comm/data_axis.py``), as a preset of the composed strategy."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, Optional

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.comm.data_axis import DataAxis
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy, argument


class DataParallelStrategy(ComposedStrategy):
    """Data parallel training on the lightning_par communication core (``strategy="dp"``).

    Unlike Lightning's DDP strategy it does not wrap the model in ``DistributedDataParallel``: gradients are
    grouped in buckets whose all-reduce starts as soon as backward has filled them
    (:class:`~lightning_par.comm.buckets.GradientBucketer`), in place by default. On one rank nothing is
    communicated and nothing is copied.

    Args:
        bucket_size_mb: target size of one gradient bucket; larger buckets mean fewer, longer all-reduces.
        reduce_dtype: ``"fp32"`` (default) all-reduces the fp32 gradients as they are; ``"compute"`` all-reduces a
            copy in the compute dtype (bf16 under ``bf16-mixed``): half the bytes on the wire, as DDP's bf16
            compression hook and FSDP's ``reduce_dtype`` do, at the cost of rounding the average. The gradients the
            optimizer reads stay fp32.
        bucket_mode: ``"grouped"`` all-reduces the gradients where autograd left them, one coalesced group per
            bucket: no copy and no second copy of the gradients in memory (2% faster than ``"flat"`` for a 1.3 B GPT
            on 2 and 4 H100s, docs/benchmarks.md). ``"flat"`` copies each fresh gradient into its bucket's flat
            buffer and all-reduces the buffer (needed to reduce in another dtype). ``"auto"`` (default):
            ``"grouped"``, or ``"flat"`` with ``reduce_dtype="compute"`` or with gloo on GPUs (gloo coalesces CPU
            tensors only).
        process_group_backend: ``"nccl"`` / ``"gloo"``; by default the one that suits the device.
        timeout: how long a collective may wait before the process group gives up.
        start_method: ``"popen"`` re-runs the script per rank (default, works everywhere), ``"spawn"`` / ``"fork"``
            start ranks from the running interpreter (notebooks, tests).
    """

    def __init__(
        self,
        bucket_size_mb: float = 25.0,
        reduce_dtype: Literal["fp32", "compute"] = "fp32",
        bucket_mode: Literal["auto", "flat", "grouped"] = "auto",
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        super().__init__(data=DataAxis(bucket_size_mb, reduce_dtype, bucket_mode),
                         process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)

    bucket_size_mb = argument("data_axis", "bucket_size_mb")
    reduce_dtype = argument("data_axis", "reduce_dtype")
    bucket_mode = argument("data_axis", "bucket_mode")
