"""Pipeline parallel: the model split into stages by its blocks, microbatches run by a schedule; the rest of the
world is data parallel. The pipeline axis (``pipeline/runtime.py``) with the data axis, as a preset of the composed
strategy; see [Note: a pipelined step inside Lightning's automatic optimization] in ``pipeline/runtime.py``."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal, Optional, Union

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.comm.data_axis import DataAxis
from lightning_par.pipeline.partition import Partition
from lightning_par.pipeline.runtime import PipelineRuntime, ScheduleName
from lightning_par.pipeline.schedules import Schedule
from lightning_par.pipeline.trace_split import TracePartition
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy, argument

__all__ = ["PipelineStrategy", "ScheduleName"]


class PipelineStrategy(ComposedStrategy):
    """Pipeline parallelism for a standard LightningModule (``strategy="pipeline"``, ``"pipeline_gpipe"``, ...).

    The module keeps its layers in one ``nn.ModuleList`` / ``nn.Sequential`` with the embedding before it and the
    head after it, or has a forward that ``torch.fx`` can trace (see ``docs/pipeline.md``); its ``training_step``
    stays as written.

    Args:
        schedule: ``"1f1b"`` (default), ``"gpipe"``, ``"interleaved"``, ``"zero_bubble"`` or ``"chimera"``.
        stages: pipeline size (ranks per pipeline); by default all ranks. The remaining factor is data parallel.
        microbatches: microbatches per batch; by default twice the pipeline size. Must divide the batch size.
        chunks: model chunks per rank for ``interleaved`` (default 2); 1 for the other schedules.
        split: ``"auto"`` (default): by the blocks container when there is one, else by tracing the forward;
            ``"blocks"``; ``"trace"`` (``torch.fx``, for a module without a blocks container).
        split_points: where stages 1, 2, ... start (``parts - 1`` of them); by default balanced by parameter count.
            Block indices when split by blocks, module names (e.g. ``"model.l4"``) when split by tracing.
        balance: ``"params"`` (parameter count) or ``"time"`` (measured forward+backward per block on the
            module's ``example_input_array``).
        blocks: dotted path of the blocks container (e.g. ``"model.blocks"``); by default the largest one.
        bucket_size_mb: gradient bucket size of the data-parallel all-reduce.
        stall_timeout: seconds a pipeline transfer may wait before the step fails with an error naming the rank,
            the action and the peer (on NCCL the message is printed and the process group's ``timeout`` aborts).
        defer_weight_grads: also for schedules without a W action, compute the linear layers' weight gradients
            outside autograd, after each backward's input gradient is sent, accumulating them inside the matmul
            (zero bubble always does; see ``lightning_par/pipeline/split_backward.py``).
        weights_only: how a checkpoint is opened when ``fit`` resumes from it: ``None`` (default) with
            ``weights_only=True`` (nothing in the file can run); ``False`` for a checkpoint you trust that holds other
            objects. Checkpoints are sharded directories (see ``docs/checkpoints.md``).

    Precision: ``32-true``, ``bf16-mixed``, ``bf16-true``. ``16-mixed`` is refused: its loss scaler decides per rank
    whether to skip a step, and the stages would drift apart.
    """

    def __init__(
        self,
        schedule: ScheduleName = "1f1b",
        stages: Optional[int] = None,
        microbatches: Optional[int] = None,
        chunks: Optional[int] = None,
        split_points: Optional[list[Union[int, str]]] = None,
        split: Literal["auto", "blocks", "trace"] = "auto",
        balance: Literal["params", "time"] = "params",
        blocks: Optional[str] = None,
        bucket_size_mb: float = 25.0,
        stall_timeout: float = 600.0,
        defer_weight_grads: bool = False,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        pipeline = PipelineRuntime(schedule=schedule, stages=stages, microbatches=microbatches, chunks=chunks,
                                   split_points=split_points, split=split, balance=balance, blocks=blocks,
                                   stall_timeout=stall_timeout, defer_weight_grads=defer_weight_grads)
        super().__init__(data=DataAxis(bucket_size_mb), pipeline=pipeline, weights_only=weights_only,
                         process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)

    schedule_name = argument("pipeline", "schedule_name")
    stages = argument("pipeline", "stages")
    microbatches = argument("pipeline", "microbatches")
    chunks = argument("pipeline", "chunks")
    split_points = argument("pipeline", "split_points")
    split = argument("pipeline", "split_mode")
    balance = argument("pipeline", "balance")
    blocks = argument("pipeline", "blocks")
    stall_timeout = argument("pipeline", "stall_timeout")
    defer_weight_grads = argument("pipeline", "defer_weight_grads")
    bucket_size_mb = argument("data_axis", "bucket_size_mb")

    @property
    def partition(self) -> Union[Partition, TracePartition]:
        if self.pipeline.partition is None:
            raise RuntimeError(f"{type(self).__name__}.partition exists once the model is split, in `setup`.")
        return self.pipeline.partition

    @property
    def schedule(self) -> Schedule:
        if self.pipeline.schedule is None:
            raise RuntimeError(f"{type(self).__name__}.schedule is built in `setup`.")
        return self.pipeline.schedule
