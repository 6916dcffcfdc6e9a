"""Data x pipeline x tensor x ZeRO in one strategy (``strategy="hybrid"``): Megatron-LM's 3D parallelism, Colossal-AI's
HybridParallelPlugin, torchtitan's tensor-then-data order.

[Note: how hybrid composes the axes]
The module is first cut by the tensor axis (:class:`~lightning_par.tensor.axis.TensorAxis`, the plan ``tp1d`` uses,
over the innermost, contiguous ranks); the tensor-local module is then what the other axes see, exactly as they
would see a whole module: the pipeline splits its blocks into stages (``PipelineStrategy``, whose runtime this
class inherits and which stands aside for a pipeline of one stage), and the data axis either averages its gradients
in buckets (``zero_stage=0``) or shards it with the ZeRO engine (stages 1-3 over the data group; under a pipeline
stage 1 only, as Colossal-AI allows). Every tensor rank of one data/pipeline coordinate sees the same tensor-local layout, so the ZeRO
chunks and the pipeline's stage shapes agree across the tensor group without communicating.

Gradients end right in three steps after backward: deferred weight gradients are flushed (tensor), the data axis
reduces (buckets or ZeRO reduce-scatter) and the tensor group sums the replicated parameters of sequence-parallel
regions (from ``.grad``, or from ZeRO's shard pieces). The gradient norm sums each part over the ranks that hold
the others: tensor shards over the tensor group, pipeline stages over the pipeline group, ZeRO pieces over the
data group.

Checkpoints take the one path of every strategy ([Note: format] in checkpoint.py): each rank writes its boxes of the
global tensors, which every axis describes in turn (the pipeline's names, the tensor shard, ZeRO's flat range of
it), and loads the boxes it needs from any strategy's checkpoint.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.comm.collectives import group_rank
from lightning_par.comm.grad_norm import NormPart
from lightning_par.strategies.base import COMPUTE_DTYPES, StartMethod
from lightning_par.strategies.pipeline import PipelineStrategy, ScheduleName
from lightning_par.tensor.axis import TensorAxis
from lightning_par.tensor.layers_1d import shard_spec
from lightning_par.tensor.loss import materialize_logits
from lightning_par.tensor.plan import applied_plan
from lightning_par.tensor.replicated_grads import mean_over_group
from lightning_par.tensor.styles import ParallelStyle
from lightning_par.topology import TensorMode, Topology
from lightning_par.zero.axis import ZeroAxis
from lightning_par.zero.engine import ZeroEngine
from lightning_par.zero.policy import ZeroPolicy
from lightning_par.zero.pieces import Placement


class HybridParallelStrategy(PipelineStrategy):
    """Data x pipeline x tensor parallelism, with ZeRO over the data axis (``strategy="hybrid"``).

    Ranks are laid out data-outermost, tensor-innermost (a tensor group is contiguous: on one host it shares the
    fastest links). The data size is what the pipeline and tensor sizes leave of the world.

    Args:
        pipeline_size: pipeline stages (default 1: no pipeline).
        tensor_size: ranks per tensor group. Default: the largest divisor of ``world / pipeline_size`` that divides
            every head count and width the automatic plan would split (as ``tp1d``).
        tensor_mode: ``"1d"`` (Megatron); 2D, 2.5D and 3D are not built yet.
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
        for name, value in (("pipeline_size", pipeline_size), ("tensor_size", tensor_size)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if tensor_mode != "1d":
            raise ValueError(f"tensor_mode={tensor_mode!r} is not built yet; hybrid runs tensor_mode='1d' (Megatron).")
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
        super().__init__(
            schedule=schedule, stages=pipeline_size, microbatches=microbatches, chunks=chunks,
            bucket_size_mb=bucket_size_mb, stall_timeout=stall_timeout, process_group_backend=process_group_backend,
            timeout=timeout, start_method=start_method,
        )
        self.pipeline_size = pipeline_size
        self.tensor_size = tensor_size
        self.tensor_mode = tensor_mode
        self.zero_stage = zero_stage
        self.weights_only = weights_only
        self.tensor_axis = TensorAxis(plan=plan, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                                      sequence_chunks=sequence_chunks, vocab_parallel_loss=vocab_parallel_loss,
                                      strict=strict, param_init_fn=param_init_fn, who="hybrid",
                                      owner=type(self).__name__)
        policy = None
        if zero_stage:
            chunk = (32 if offload is not None else 128) * 2**20
            policy = ZeroPolicy(stage=zero_stage, chunk_numel=chunk, offload=offload)
        self.zero = ZeroAxis(policy, who="hybrid")  # idle (no engine) with zero_stage=0
        self._default_sizes: dict[int, int] = {}

    # ----- topology -------------------------------------------------------------------------------------------------

    @override
    def topology_for(self, world_size: int) -> Topology:
        if world_size % self.pipeline_size:
            return Topology.for_world(world_size, pipeline=self.pipeline_size)  # raises, naming what would fit
        tensor = self.tensor_size
        if tensor is None:
            rest = world_size // self.pipeline_size
            if rest not in self._default_sizes:
                size = self.tensor_axis.default_size(self.lightning_module, rest)
                if size is None:
                    return Topology.for_world(world_size, pipeline=self.pipeline_size, tensor=rest)
                self._default_sizes[rest] = size
            tensor = self._default_sizes[rest]
        return Topology.for_world(world_size, pipeline=self.pipeline_size, tensor=tensor)

    @override
    def _splits(self) -> bool:
        return self.topology.pipeline > 1

    # ----- setup ----------------------------------------------------------------------------------------------------

    @override
    def _initialises_meta(self) -> bool:
        return True  # the tensor axis materialises a meta-built module whole, before the plan cuts it

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # every axis cuts the checkpoint's whole tensors into what it holds (see the module note)

    @override
    def setup_module(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn == TrainerFn.FITTING:
            self._refuse_weight_averaging(
                trainer, ": it averages whole parameters between steps, which hybrid keeps sharded.",
                "; or average after fit, when the module is whole again")
        self.tensor_axis.shard(module, self.group("tensor"), self.topology.tensor, self.root_device)
        super().setup_module(trainer)  # the pipeline split (or none), the data axis's buckets unless ZeRO's
        self.tensor_axis.keep_replicated_of(module)
        if self.zero.policy is not None:
            self.zero.build(module, self.group("data"), COMPUTE_DTYPES[self.precision_plugin.precision],
                            self.root_device, self.num_processes)

    @property
    def _engine(self) -> Optional[ZeroEngine]:
        return self.zero.engine

    @override
    def _build_bucketer(self) -> None:
        if self.zero.policy is None:  # else the ZeRO engine reduces the data axis
            super()._build_bucketer()

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        super().setup_optimizers(trainer)
        if self._engine is not None:
            self.zero.shard_optimizers(self.optimizers)

    # ----- gradients ------------------------------------------------------------------------------------------------

    @override
    def set_grad_sync(self, enabled: bool) -> None:
        super().set_grad_sync(enabled)
        self.zero.set_sync(enabled)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        self.tensor_axis.before_backward(self.lightning_module)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        module = self.lightning_module
        self.tensor_axis.finish_weight_grads(module)
        if self._engine is None:
            super().post_backward(closure_loss)  # buckets (and the pipeline's shared parameters)
            if self._grad_sync_enabled:
                self.tensor_axis.sum_replicated_grads(module)
            return
        if self._partition is not None:
            # ZeRO-1 under a pipeline: the schedule accumulated every microbatch into the module's gradients (the
            # engine's local buffers) without reducing; the stages' and the tensor group's sums act on those, then
            # the engine reduces once.
            if self._grad_sync_enabled:
                self._shared.sum_()
                self.tensor_axis.sum_replicated_grads(module)
            self._engine.sync = self._grad_sync_enabled
            self._engine.finish_backward()
            return
        self._engine.finish_backward()
        plan = applied_plan(module)
        # Stage 1 hands out gradients only on a synchronising backward; stages 2-3 on every one.
        if plan is not None and plan.replicated_grads is not None and (self._grad_sync_enabled or self.zero_stage > 1):
            names = {self._engine.names[p] for p in plan.replicated_grads.params}
            pieces = [g for name, g in self._engine.shard_gradients() if name in names]
            mean_over_group(pieces, plan.tg, self.root_device)

    @override
    def grad_norm_parts(self, optimizer: Optimizer) -> list[NormPart]:
        module = self.lightning_module
        if self._engine is not None:
            params = self._engine.params_by_name
            pairs = [(params[name], g) for name, g in self._engine.shard_gradients(optimizer)]
            if self._partition is None:
                return self.tensor_axis.norm_parts(module, pairs, (self._engine.group,))
            counted, _ = self._stage_params(optimizer, [p for p, _ in pairs])
            here = {id(p) for p in counted}
            return (self.tensor_axis.norm_parts(module, [(p, g) for p, g in pairs if id(p) in here],
                                                (self._engine.group, self._pipeline_group))
                    + self.tensor_axis.norm_parts(module, [(p, g) for p, g in pairs if id(p) not in here],
                                                  (self._engine.group,), counted=False))
        if self._partition is None:
            params = self.precision_plugin.main_params(optimizer)
            return self.tensor_axis.norm_parts(module, [(p, p.grad) for p in params if p.grad is not None])
        counted, copies = self._stage_params(optimizer)
        return (self.tensor_axis.norm_parts(module, [(p, p.grad) for p in counted], (self._pipeline_group,))
                + self.tensor_axis.norm_parts(module, [(p, p.grad) for p in copies], counted=False))

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.zero.after_step()
        return output

    # ----- steps: ZeRO's forward bookkeeping, outputs as plain tensors ---------------------------------------------

    def _forward(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(self.zero.forward(step, *args, **kwargs))

    def _evaluate(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(self.zero.evaluate(step, *args, **kwargs))

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._engine is not None and self._partition is not None:
            self._engine.sync = False  # ZeRO-1 accumulates the microbatches; `post_backward` reduces once
        return self._forward(super().training_step, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate(super().validation_step, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate(super().test_step, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate(super().predict_step, *args, **kwargs)

    # ----- checkpoints: see [Note: format] in checkpoint.py ------------------------------------------------------

    def _tensor_group(self) -> Optional[Any]:
        plan = applied_plan(self.lightning_module)
        return plan.tg.group if plan is not None else None

    @override
    def _tensor_placement(self) -> Optional[Placement]:
        if applied_plan(self.lightning_module) is None:
            return None
        rank = group_rank(self._tensor_group())
        return lambda p: (spec, rank) if (spec := shard_spec(p)) is not None else None

    @override
    def _zero_engine(self) -> Optional[ZeroEngine]:
        return self._engine

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        meta = super().load_checkpoint(checkpoint_path, weights_only)
        if self._engine is not None:
            self._engine.refresh_compute()
        return meta

    # ----- teardown ---------------------------------------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        self.tensor_axis.failed = True  # another rank may be gone: no collective in teardown
        if self.lightning_module is not None:
            self.tensor_axis.clear(self.lightning_module)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        # The module leaves fit whole: ZeRO's masters gathered into its parameters, then the tensor shards joined.
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        if self._engine is not None:
            if self.tensor_axis.failed:
                self.zero.abandon()
                optimizers = []  # they hold ZeRO's pieces, not the module's parameters
            else:
                self.zero.teardown(self.lightning_module, self.root_device, self.num_processes, optimizers)
        if self._partition is None:
            self.tensor_axis.unshard(self.lightning_module, optimizers)
        super().teardown()
