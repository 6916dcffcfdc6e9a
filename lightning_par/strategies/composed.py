"""One Lightning strategy that composes the parallel axes its arguments enable; every registered name is a preset of
it (``dp``, ``zero*``, ``tp1d``, ``pipeline*``, ``hybrid``: each a subclass that only builds components from its
own arguments).

[Note: how the axes compose]
The components, one per mesh axis, each with no Lightning hook of its own:

- tensor (:class:`~lightning_par.tensor.axis.TensorAxis`): cuts the module by a plan over the innermost, contiguous
  ranks;
- pipeline (:class:`~lightning_par.pipeline.runtime.PipelineRuntime`): splits the tensor-local module into stages
  and runs each step as a schedule of microbatches;
- data: either buckets (:class:`~lightning_par.comm.data_axis.DataAxis`) or the ZeRO engine
  (:class:`~lightning_par.zero.axis.ZeroAxis`, stages 1-3 over the data group; under a pipeline stage 1 only).

The module is cut by the tensor axis first; the tensor-local module is then what the other axes see, as they would
see a whole module (torchtitan's order: tensor parallel, then data). Every tensor rank of one data/pipeline
coordinate sees the same tensor-local layout, so ZeRO's chunks and the pipeline's stage shapes agree across the
tensor group without communicating.

Gradients end right in three steps after backward: deferred weight gradients are flushed (tensor), the data axis
reduces (buckets or ZeRO's reduce-scatter) together with the pipeline's sums of parameters held by several stages,
and the tensor group sums the replicated parameters of sequence-parallel regions (from ``.grad``, or from ZeRO's
shard pieces). The gradient norm sums each part over the ranks that hold the others: tensor shards over the tensor
group, stages over the pipeline group, ZeRO pieces over the data group, copies of shared parameters once.

Checkpoints take the one path of every strategy ([Note: format] in checkpoint.py): each rank writes its boxes of the
global tensors, which every axis describes in turn (the pipeline's names, the tensor shard, ZeRO's flat range of
it), and loads the boxes it needs from any strategy's checkpoint.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.checkpoint import Holdings
from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.data_axis import DataAxis
from lightning_par.comm.grad_norm import NormPart
from lightning_par.pipeline.runtime import PipelineRuntime
from lightning_par.pipeline.shared import canonical_names
from lightning_par.strategies.base import COMPUTE_DTYPES, LightningParStrategy, StartMethod
from lightning_par.strategies.holdings import module_holdings
from lightning_par.tensor.axis import TensorAxis
from lightning_par.tensor.axis_2d import TensorAxis2D
from lightning_par.tensor.loss import materialize_logits
from lightning_par.topology import Topology
from lightning_par.zero.axis import ZeroAxis
from lightning_par.zero.materialize import meta_parameters
from lightning_par.zero.pieces import Placement, uncut

def argument(component: str, name: str) -> property:
    """A preset's constructor argument, read back from the component that holds it (one copy of the value)."""
    return property(lambda self: getattr(getattr(self, component), name),
                    doc=f"``{name}`` as given to the constructor (held by ``self.{component}``).")


# 16-mixed's GradScaler decides per rank whether to skip a step, from the gradients that rank holds: pipeline stages
# and the shards of a tensor group would drift apart. (ZeRO alone replaces it by the sharded scaler.)
CUT_PRECISION = ("32-true", "bf16-mixed", "bf16-true")


class ComposedStrategy(LightningParStrategy):
    """Data x pipeline x tensor parallelism with ZeRO over the data axis, from the components a preset gives.

    ``data`` and ``zero`` are the two forms of the data axis (at most one of them); ``tensor_size`` None with a
    tensor axis: the largest size the plan allows. See [Note: how the axes compose].
    """

    def __init__(
        self,
        *,
        data: Optional[DataAxis] = None,
        zero: Optional[ZeroAxis] = None,
        tensor: Optional[Union[TensorAxis, TensorAxis2D]] = None,
        tensor_size: Optional[int] = None,
        pipeline: Optional[PipelineRuntime] = None,
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, timeout=timeout, start_method=start_method)
        assert data is None or zero is None, "the data axis is buckets or ZeRO, not both"
        if tensor_size is not None and (not isinstance(tensor_size, int) or isinstance(tensor_size, bool)
                                        or tensor_size < 1):
            raise ValueError(f"tensor_size must be a positive integer; got {tensor_size!r}.")
        self.data_axis = data
        self.zero = zero
        self.tensor_axis = tensor
        self.tensor_size = tensor_size
        self.pipeline = pipeline
        self.weights_only = weights_only
        self._default_sizes: dict[int, int] = {}  # ranks left for the tensor axis -> the size the plan allows
        self._failed = False  # fit raised: another rank may be gone, no collective in teardown

    # ----- topology -------------------------------------------------------------------------------------------------

    @override
    def topology_for(self, world_size: int) -> Topology:
        pipeline = self.pipeline.size(world_size) if self.pipeline is not None else 1
        if self.tensor_axis is None:
            return Topology.for_world(world_size, pipeline=pipeline)
        if world_size % pipeline:
            return Topology.for_world(world_size, pipeline=pipeline)  # raises, naming what would fit
        mode, depth = self.tensor_axis.mode, self.tensor_axis.depth
        tensor = self.tensor_size
        if tensor is None:
            rest = world_size // pipeline
            if rest not in self._default_sizes:
                module = self.lightning_module
                size = self.tensor_axis.default_size(module, rest)
                if module is None:  # not known yet: the size for now, not kept
                    return Topology.for_world(world_size, pipeline=pipeline, tensor=size or rest, tensor_mode=mode,
                                              depth=depth)
                self._default_sizes[rest] = size
            tensor = self._default_sizes[rest]
        return Topology.for_world(world_size, pipeline=pipeline, tensor=tensor, tensor_mode=mode, depth=depth)

    @property
    def pipeline_rank(self) -> int:
        return self.topology.coordinates(self.global_rank)["pipeline"]

    @override
    def setup_environment(self) -> None:
        # Sizes are checked before any process group exists: a schedule that cannot run must not start.
        if self.pipeline is not None:
            self.pipeline.schedule_for(self.topology.pipeline)
        super().setup_environment()

    # ----- precision and meta-device initialisation -------------------------------------------------------------------

    @property
    @override
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, precision_plugin: Optional[Precision]) -> None:
        name = getattr(precision_plugin, "precision", None)
        # (Lightning's constructor sets None before this class has set its axes.)
        cut = getattr(self, "pipeline", None) is not None or getattr(self, "tensor_axis", None) is not None
        if precision_plugin is not None and cut and name not in CUT_PRECISION:
            raise ValueError(f"{type(self).__name__} does not support precision={name!r}. "
                             f"Choose one of: {', '.join(CUT_PRECISION)}.")
        LightningParStrategy.precision_plugin.fset(self, precision_plugin)

    def _zero_stage(self) -> int:
        return self.zero.policy.stage if self.zero is not None else 0

    @override
    def _initialises_meta(self) -> bool:
        # The tensor axis materialises a meta-built module whole, before the plan cuts it; ZeRO-3 alone chunk by chunk.
        return self.tensor_axis is not None or self._zero_stage() == 3

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # `configure_model` runs inside this: under ZeRO-3 its parameters are created on the meta device (as
        # Lightning's FSDP strategy does; buffers as usual) and initialised chunk by chunk by the model's own init.
        if self._zero_stage() != 3 or self.tensor_axis is not None:
            yield
            return
        with meta_parameters():
            yield

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # Each rank loads the pieces it holds once the axes have cut the module; a whole module loads before.
        return self.zero is not None or self.pipeline is not None or self.tensor_axis is not None

    # ----- setup ----------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and (self.zero is not None or self.tensor_axis is not None):
            self._refuse_weight_averaging(trainer, *self._weight_averaging_message())
        if self.pipeline is not None:
            self.pipeline.forget_optimizers()
        self._failed = False
        super().setup(trainer)
        plugin = self.precision_plugin
        if fitting and self.zero is not None and getattr(plugin, "scaler", None) is not None:
            # [Note: one overflow decision] Each rank sees only its shard of the gradients; the scaler must skip the
            # step on every rank when any rank overflowed. FSDP's ShardedGradScaler all-reduces that decision.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            plugin.scaler = ShardedGradScaler(device=self.root_device.type, process_group=self.group("data"))
        if fitting and self.zero is not None:
            self.zero.allow_early_host_step(self._gradients_untouched_before_step(trainer))

    def _gradients_untouched_before_step(self, trainer: "pl.Trainer") -> bool:
        """Nothing between backward and the optimizer step reads or changes the gradients: no clipping, loss scaler,
        accumulation or manual optimization, one optimizer, no pipeline or tensor axis, and no ``on_after_backward``,
        ``on_before_optimizer_step`` or ``configure_gradient_clipping`` of the module's or a callback's own. ZeRO's
        host chunks may then step during backward ([Note: the early host step] in ``zero/host_step.py``)."""
        from lightning.pytorch.callbacks import GradientAccumulationScheduler
        from lightning.pytorch.utilities.model_helpers import is_overridden

        module = self.lightning_module
        names = ("on_after_backward", "on_before_optimizer_step", "configure_gradient_clipping")
        hooks = [(name, module, pl.LightningModule) for name in names]
        hooks += [(name, callback, pl.Callback) for callback in trainer.callbacks for name in names[:2]]
        return (not trainer.gradient_clip_val and trainer.accumulate_grad_batches == 1
                and module.automatic_optimization and len(self.optimizers) == 1 and self.pipeline is None
                and self.tensor_axis is None  # (the tensor axes sum replicated gradients after backward)
                and getattr(self.precision_plugin, "scaler", None) is None
                and not any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks)
                and not any(is_overridden(name, owner, parent) for name, owner, parent in hooks))

    def _weight_averaging_message(self) -> tuple[str, str]:
        if self.tensor_axis is None:
            # Under stage 3 the callback would average freed memory; at stages 1-2 its final weights would be
            # overwritten from the fp32 masters when fit ends, and its checkpoint state mixed with the shards.
            return (f" (ZeRO stage {self._zero_stage()}): it averages whole parameters between steps, which ZeRO "
                    "keeps sharded (the fp32 masters on their ranks; at stage 3 the parameters are freed between "
                    "steps).", "; or keep the average in your LightningModule, updated inside "
                    "`with self.trainer.strategy.full_params():` on every rank")
        return (": it averages whole parameters between steps, which this strategy keeps sharded.",
                "; or average after fit, when the module is whole again")

    @override
    def setup_module(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        assert module is not None
        if self.tensor_axis is not None:
            self.tensor_axis.shard(module, self.group, self.topology.tensor, self.root_device)
        if self.pipeline is not None:
            if not module.automatic_optimization:
                raise RuntimeError(
                    f"{type(self).__name__} runs backward itself, microbatch by microbatch, inside the pipeline's "
                    "schedule; manual optimization (self.manual_backward in training_step) is not supported. Use "
                    "automatic optimization.")
            self.pipeline.split(module, self.topology, self.global_rank, self.group("data"), self.group("pipeline"),
                                self.root_device, self.batch_to_device)
        elif self.zero is None:
            # Ranks may have initialised differently (no seed, or a seed per rank): start from rank 0's weights.
            # (ZeRO's engine agrees on rank 0's values chunk by chunk.)
            broadcast_module(module, self.group("data"))
        if self.tensor_axis is not None:
            self.tensor_axis.keep_replicated_of(module)
        compute_dtype = COMPUTE_DTYPES[self.precision_plugin.precision]
        if self.zero is not None:
            self.zero.build(module, self.group("data"), compute_dtype, self.root_device, self.num_processes)
        elif self.data_axis is not None and trainer.state.fn == TrainerFn.FITTING and self.topology.data > 1:
            self.data_axis.build(module, self.group("data"), compute_dtype, self.root_device, self._grad_sync_enabled)

    @override
    def setup_optimizers(self, trainer: "pl.Trainer") -> None:
        super().setup_optimizers(trainer)
        if self.zero is not None:
            self.zero.shard_optimizers(self.optimizers)

    # ----- steps ----------------------------------------------------------------------------------------------------

    def _forward(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = self.zero.forward(step, *args, **kwargs) if self.zero is not None else step(*args, **kwargs)
        return materialize_logits(output) if self.tensor_axis is not None else output

    def _evaluate(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = self.zero.evaluate(step, *args, **kwargs) if self.zero is not None else step(*args, **kwargs)
        return materialize_logits(output) if self.tensor_axis is not None else output

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is None:
            return self._forward(super().training_step, *args, **kwargs)
        if self.zero is not None:
            self.zero.engine.sync = False  # ZeRO-1 accumulates the microbatches; `post_backward` reduces once
        return self._forward(self.pipeline.train_step, self.lightning_module, self.optimizers,
                             self.precision_plugin.train_step_context(), args, kwargs, self.data_axis,
                             self._grad_sync_enabled)

    def _eval_step(self, lightning_step: Callable[..., Any], module_step: Callable[..., Any], context: Any,
                   args: tuple, kwargs: dict) -> Any:
        if self.pipeline is None:
            return self._evaluate(lightning_step, *args, **kwargs)
        return self._evaluate(self.pipeline.eval_step, self.lightning_module, module_step, context, args, kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step(super().validation_step, self.lightning_module.validation_step,
                               self.precision_plugin.val_step_context(), args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step(super().test_step, self.lightning_module.test_step,
                               self.precision_plugin.test_step_context(), args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._eval_step(super().predict_step, self.lightning_module.predict_step,
                               self.precision_plugin.predict_step_context(), args, kwargs)

    # ----- gradients ------------------------------------------------------------------------------------------------

    @override
    def set_grad_sync(self, enabled: bool) -> None:
        super().set_grad_sync(enabled)
        if self.data_axis is not None:
            self.data_axis.set_sync(enabled)
        if self.zero is not None:
            self.zero.set_sync(enabled)

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        if self.data_axis is not None:
            self.data_axis.before_backward(self._grad_sync_enabled)
        if self.tensor_axis is not None:
            self.tensor_axis.before_backward(self.lightning_module)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self.pipeline is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        # See [Note: a pipelined step inside Lightning's automatic optimization]: autograd already ran.
        self.pipeline.after_schedule(type(self).__name__)
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        # Before on_after_backward: see [Note: gradients are final in on_after_backward] in base.py.
        self.post_backward(closure_loss)
        return self.precision_plugin.post_backward(closure_loss, module)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        module = self.lightning_module
        sync = self._grad_sync_enabled
        if self.tensor_axis is not None:
            self.tensor_axis.finish_weight_grads(module)
        engine = self.zero.engine if self.zero is not None else None
        if engine is None:
            if sync:
                if self.data_axis is not None:
                    self.data_axis.finish()
                if self.pipeline is not None:
                    self.pipeline.sum_shared()
                if self.tensor_axis is not None:
                    self.tensor_axis.sum_replicated_grads(module)
            return
        if self.pipeline is not None:
            # ZeRO-1 under a pipeline: the schedule accumulated every microbatch into the module's gradients (the
            # engine's local buffers) without reducing; the stages' and the tensor group's sums act on those, then
            # the engine reduces once.
            if sync:
                self.pipeline.sum_shared()
                if self.tensor_axis is not None:
                    self.tensor_axis.sum_replicated_grads(module)
            engine.sync = sync
            engine.finish_backward()
            return
        engine.finish_backward()
        # Stage 1 hands out gradients only on a synchronising backward; stages 2-3 on every one.
        if self.tensor_axis is not None and (sync or self._zero_stage() > 1):
            self.tensor_axis.zero_replicated(module, engine, self.root_device)

    @override
    def grad_norm_parts(self, optimizer: Optimizer) -> list[NormPart]:
        module = self.lightning_module
        engine = self.zero.engine if self.zero is not None else None
        if engine is not None:
            params = engine.params_by_name
            pairs = [(params[name], g) for name, g in engine.shard_gradients(optimizer)]
            data: tuple = (engine.group,)
        else:
            pairs = [(p, p.grad) for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
            data = ()  # replicas hold the same averaged gradients
        if self.pipeline is None:
            return self._norm_parts(pairs, data)
        counted, copies = self.pipeline.stage_params(module, [p for p, _ in pairs])
        here = {id(p) for p in counted}
        return (self._norm_parts([(p, g) for p, g in pairs if id(p) in here], data + (self.pipeline.group,))
                + self._norm_parts([(p, g) for p, g in pairs if id(p) not in here], data, counted=False))

    def _norm_parts(self, pairs: list[tuple[torch.nn.Parameter, Tensor]], groups: tuple,
                    counted: bool = True) -> list[NormPart]:
        if self.tensor_axis is not None:
            return self.tensor_axis.norm_parts(self.lightning_module, pairs, groups, counted)
        return [NormPart([g for _, g in pairs], groups, counted)]

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                       model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.zero is not None:
            self.zero.after_step()  # the compute copies from the updated masters
        return output

    # ----- checkpoints: see [Note: format] in checkpoint.py ------------------------------------------------------

    def _tensor_placement(self) -> Optional[Placement]:
        """How the tensor axis cut a parameter; None: nothing is cut (no tensor axis, or the module is whole)."""
        return self.tensor_axis.placement(self.lightning_module) if self.tensor_axis is not None else None

    def _split(self) -> bool:
        return self.pipeline is not None and self.pipeline.partition is not None

    @override
    def checkpoint_holdings(self, saving: bool) -> Optional[Holdings]:
        module = self.lightning_module
        placement = self._tensor_placement()
        engine = self.zero.engine if self.zero is not None else None
        if engine is not None:
            engine.settle()  # delay_update: the masters and the optimizer state hold every update before they are read
        if not self._split() and placement is None and engine is None:
            return None  # every rank holds the whole module: Lightning's single file
        pipeline = self.pipeline if self._split() else None
        canonical = pipeline.canonical if pipeline is not None else canonical_names(module)
        first_replica = self.topology.coordinates(self.global_rank)["data"] == 0
        return module_holdings(module, canonical, placement or uncut, self._held_optimizers(),
                               pipeline.group_names if pipeline is not None else (lambda optimizer, names: names),
                               engine, buffers=first_replica or not saving,
                               keep=pipeline.first_holder if pipeline is not None and saving else (lambda name: True))

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self.zero is not None and self.zero.engine is not None:
            self.zero.engine.settle()  # delay_update: no host step may write the masters while they load
        meta = super().load_checkpoint(checkpoint_path, weights_only)
        if self.zero is not None and self.zero.engine is not None:
            self.zero.engine.publish_masters()
            self.zero.engine.refresh_compute()
        return meta

    # ----- teardown ---------------------------------------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # another rank may be gone: no collective in teardown
        if self.tensor_axis is not None:
            self.tensor_axis.failed = True
            if self.lightning_module is not None:
                self.tensor_axis.clear(self.lightning_module)
        if self.data_axis is not None:
            self.data_axis.reset()

    @override
    def teardown(self) -> None:
        # The module leaves fit whole where no pipeline split it: ZeRO's masters gathered into its parameters, then
        # the tensor shards joined. Alone, ZeRO keeps its engine (shards of masters and optimizer state) for
        # `trainer.save_checkpoint` after fit; under a tensor axis the optimizers are pointed back at the module's
        # parameters first, which the tensor axis then makes whole.
        module = self.lightning_module
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        if self.zero is not None and self.zero.engine is not None:
            if self.tensor_axis is None:
                self.zero.teardown(module, self.root_device, self.num_processes)
            elif self._failed:
                self.zero.abandon()
                optimizers = []  # they hold ZeRO's pieces, not the module's parameters
            else:
                self.zero.teardown(module, self.root_device, self.num_processes, optimizers)
        if self.tensor_axis is not None and self.pipeline is None:
            self.tensor_axis.unshard(module, optimizers)
        if self.data_axis is not None:
            self.data_axis.remove()
        super().teardown()
