"""Data x pipeline x tensor x ZeRO in one strategy (``strategy="hybrid"``): Megatron-LM's 3D parallelism, Colossal-AI's
HybridParallelPlugin, torchtitan's tensor-then-data order. Every axis is a component of the composed strategy, used
as it is; see [Note: how the axes compose] in ``strategies/composed.py``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.comm.data_axis import DataAxis
from lightning_par.pipeline.runtime import PipelineRuntime, ScheduleName
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy
from lightning_par.tensor.axis import TensorAxis
from lightning_par.tensor.axis_2d import TensorAxis2D, TensorAxis3D
from lightning_par.tensor.styles import ParallelStyle
from lightning_par.topology import TensorMode
from lightning_par.zero.axis import ZeroAxis
from lightning_par.zero.policy import ZeroPolicy


class HybridParallelStrategy(ComposedStrategy):
    """Data x pipeline x tensor parallelism, with ZeRO over the data axis (``strategy="hybrid"``).

    Ranks are laid out data-outermost, tensor-innermost (a tensor group is contiguous: on one host it shares the
    fastest links). The data size is what the pipeline and tensor sizes leave of the world.

    Args:
        pipeline_size: pipeline stages (default 1: no pipeline).
        tensor_size: ranks per tensor group. Default: the largest divisor of ``world / pipeline_size`` that divides
            every head count and width the automatic plan would split (as ``tp1d``); with a grid mode the largest
            such square (2D), depth x square (2.5D) or cube (3D).
        tensor_mode: ``"1d"`` (Megatron), ``"2d"`` (SUMMA: ``tensor_size`` is q x q, see ``tp2d``) or ``"2.5d"``
            (Tesseract: ``tensor_size`` is depth x q x q, see ``tp2.5d``) or ``"3d"`` (a cube: ``tensor_size`` is
            q x q x q, see ``tp3d``).
        depth: with ``tensor_mode="2.5d"``, the grids in the stack (for example 2).
        zero_stage: 0 (data-parallel buckets), 1, 2 or 3 (ZeRO over the data axis). With ``pipeline_size > 1`` 0 or
            1: a pipeline accumulates each stage's gradients over its microbatches, which ZeRO-2/3 would reduce and
            free once per microbatch; ZeRO-1 reduces them once, after the schedule.
        offload: with ``zero_stage >= 1``, ZeRO's ``offload`` (a fraction of the chunks on the host, or ``"auto"``).
        sequence_parallel, plan, sequence_dim, sequence_chunks, vocab_parallel_loss, strict, param_init_fn: the
            tensor axis, as for ``tp1d``.
        schedule, microbatches, chunks, stall_timeout: the pipeline, as for ``pipeline`` (``stages`` is
            ``pipeline_size``).
        weights_only: how a checkpoint is opened when ``fit`` resumes from it, as for ``zero*``: ``None`` (default)
            with ``weights_only=True`` (nothing in the file can run); ``False`` for a checkpoint you trust that holds
            other objects (Lightning 2.6 does not pass ``Trainer.fit(..., weights_only=False)`` on to a strategy
            that restores after setup, as this one does).
        bucket_size_mb, process_group_backend, timeout, start_method: as for ``dp``.
    """

    def __init__(
        self,
        pipeline_size: int = 1,
        tensor_size: Optional[int] = None,
        tensor_mode: TensorMode = "1d",
        depth: int = 1,
        zero_stage: Literal[0, 1, 2, 3] = 0,
        offload: Optional[Union[float, Literal["auto"]]] = None,
        sequence_parallel: Optional[bool] = None,
        schedule: ScheduleName = "1f1b",
        microbatches: Optional[int] = None,
        chunks: Optional[int] = None,
        plan: Optional[dict[str, Union[str, ParallelStyle]]] = None,
        sequence_dim: int = 1,
        sequence_chunks: int = 1,
        vocab_parallel_loss: bool = True,
        strict: bool = True,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        bucket_size_mb: float = 25.0,
        stall_timeout: float = 600.0,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        if not isinstance(pipeline_size, int) or isinstance(pipeline_size, bool) or pipeline_size < 1:
            raise ValueError(f"pipeline_size must be a positive integer; got {pipeline_size!r}.")
        if tensor_mode not in ("1d", "2d", "2.5d", "3d"):
            raise ValueError(f"Unknown tensor_mode={tensor_mode!r}; hybrid runs tensor_mode='1d' (Megatron), "
                             "'2d' (SUMMA), '2.5d' (Tesseract) or '3d' (a cube).")
        if tensor_mode != "1d" and (plan is not None or sequence_parallel or sequence_chunks != 1):
            raise ValueError(f"tensor_mode={tensor_mode!r} cuts the module by the automatic plan on a grid, and "
                             "its activations are split in both dims already: plan, sequence_parallel and sequence_chunks "
                             "are 1D options.")
        if tensor_mode == "2.5d" and depth == 1:
            raise ValueError("tensor_mode='2.5d' stacks depth >= 2 grids; give depth (for example 2), or use "
                             "tensor_mode='2d' for one grid.")
        if depth != 1 and tensor_mode != "2.5d":
            raise ValueError(f"depth={depth} stacks the grids of tensor_mode='2.5d'; got tensor_mode={tensor_mode!r}.")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage!r}.")
        if pipeline_size > 1 and zero_stage > 1:
            raise ValueError(
                f"zero_stage={zero_stage} with pipeline_size={pipeline_size}: ZeRO-2 and ZeRO-3 reduce (and free) "
                "gradients during backward, but a pipeline accumulates each stage's gradients over its microbatches. "
                "Use zero_stage 0 or 1 with a pipeline, or pipeline_size=1 with ZeRO-2/3.")
        if offload is not None and not zero_stage:
            raise ValueError("offload places ZeRO's chunks on the host; it needs zero_stage 1, 2 or 3.")
        if offload is not None and pipeline_size > 1:
            raise ValueError("offload with a pipeline is not built; use pipeline_size=1 with offload.")
        if tensor_mode == "3d":
            tensor = TensorAxis3D(param_init_fn=param_init_fn, who="hybrid", owner=type(self).__name__)
        elif tensor_mode in ("2d", "2.5d"):
            tensor = TensorAxis2D(param_init_fn=param_init_fn, who="hybrid", owner=type(self).__name__,
                                  depth=depth if tensor_mode == "2.5d" else 1)
        else:
            tensor = TensorAxis(plan=plan, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                                sequence_chunks=sequence_chunks, vocab_parallel_loss=vocab_parallel_loss,
                                strict=strict, param_init_fn=param_init_fn, who="hybrid", owner=type(self).__name__)
        # Built (and so checked) at any size; a pipeline of one stage runs the module whole, as no pipeline.
        pipeline = PipelineRuntime(schedule=schedule, stages=pipeline_size, microbatches=microbatches, chunks=chunks,
                                   stall_timeout=stall_timeout)
        zero = data = None
        if zero_stage:
            chunk = (32 if offload is not None else 128) * 2**20
            zero = ZeroAxis(ZeroPolicy(stage=zero_stage, chunk_numel=chunk, offload=offload), who="hybrid")
        else:
            data = DataAxis(bucket_size_mb)
        super().__init__(data=data, zero=zero, tensor=tensor, tensor_size=tensor_size,
                         pipeline=pipeline if pipeline_size > 1 else None,
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)
        self.pipeline_size = pipeline_size
        self.tensor_mode = tensor_mode
        self.zero_stage = zero_stage
