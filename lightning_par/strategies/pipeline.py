"""Pipeline parallel: the model split into stages by its blocks, microbatches run by a schedule; the rest of the
world is data parallel.

[Note: a pipelined step inside Lightning's automatic optimization]
Lightning's loop calls ``strategy.training_step`` (inside the optimizer's closure), then ``strategy.backward`` on
the returned loss, then the optimizer step. A pipeline cannot separate forward from backward: 1F1B runs the
backward of microbatch 0 before the forward of microbatch p. So ``training_step`` runs the whole schedule: it cuts
the batch into microbatches, and for each forward action calls the user's own ``training_step`` on one microbatch
with the model arranged for that stage (:class:`~lightning_par.pipeline.partition.Partition`); the last stage's
loss, scaled by 1 / (microbatches x accumulation), is backpropagated by the executor. It returns the batch loss
(the microbatch mean, the same on every rank, detached). Lightning's ``backward`` then finds the gradients already
there: this strategy's ``backward`` runs the hooks around it (``on_before_backward``, ``on_after_backward``) and
the gradient communication (``post_backward``), but not autograd. Accumulation (``block_backward_sync``), clipping
(over all stages: `clip_grad_norm_`), the optimizer step, LR schedulers and checkpoints then work as
with any strategy. Manual optimization is refused: its ``manual_backward`` would call backward per microbatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.checkpoint import Holdings
from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.grad_norm import NormPart
from lightning_par.pipeline.executor import PipelineExecutor
from lightning_par.pipeline.partition import Partition, PartitionError, StageExit, choose_split_points, find_blocks
from lightning_par.pipeline.split_choice import agreed_block_times, choose_split_mode
from lightning_par.pipeline.trace_split import TracePartition
from lightning_par.pipeline.schedules import Schedule, build_schedule, forward_only
from lightning_par.pipeline.shared import SharedGradients, canonical_names, optimizer_group_names, parameter_holders
from lightning_par.pipeline.steps import OutputExchange, StepRecorder, eval_microbatches, merge_outputs, split_batch
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.strategies.holdings import module_holdings
from lightning_par.topology import Topology
from lightning_par.zero.pieces import Placement, uncut

ScheduleName = Literal["1f1b", "gpipe", "interleaved", "zero_bubble", "chimera"]
PIPELINE_PRECISION = ("32-true", "bf16-mixed", "bf16-true")


class PipelineStrategy(DataParallelStrategy):
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
        super().__init__(
            bucket_size_mb=bucket_size_mb,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if schedule not in ("1f1b", "gpipe", "interleaved", "zero_bubble", "chimera"):
            raise ValueError(f"Unknown schedule {schedule!r}; choose 1f1b, gpipe, interleaved, zero_bubble or chimera.")
        if chunks is not None and chunks != 1 and schedule != "interleaved":
            raise ValueError(f"chunks={chunks} only applies to schedule='interleaved'; {schedule!r} runs one chunk.")
        for name, value in (("stages", stages), ("microbatches", microbatches), ("chunks", chunks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if not isinstance(stall_timeout, (int, float)) or isinstance(stall_timeout, bool) or stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds; got {stall_timeout!r}.")
        if balance not in ("params", "time"):
            raise ValueError(f"balance must be 'params' or 'time'; got {balance!r}.")
        if split not in ("auto", "blocks", "trace"):
            raise ValueError(f"split must be 'auto', 'blocks' or 'trace'; got {split!r}.")
        self.schedule_name = schedule
        self.defer_weight_grads = bool(defer_weight_grads)
        self.stages = stages
        self.microbatches = microbatches
        self.chunks = chunks if chunks is not None else (2 if schedule == "interleaved" else 1)
        self.split_points = split_points
        self.split = split
        self.balance = balance
        self.blocks = blocks
        self.stall_timeout = float(stall_timeout)
        self.weights_only = weights_only
        self._side_group: Optional[dist.ProcessGroup] = None
        self._side_group_of: Optional[dist.ProcessGroup] = None  # the pipeline group `_side_group` belongs to
        self._exchanges: dict[Any, OutputExchange] = {}  # per executor: see [Note: sharing outputs without a host sync]
        self._partition: Optional[Union[Partition, TracePartition]] = None
        self._schedule: Optional[Schedule] = None
        self._train_executor: Optional[PipelineExecutor] = None
        self._eval_executors: dict[int, PipelineExecutor] = {}  # by microbatch count
        self._shared: Optional[SharedGradients] = None
        self._pipeline_group: Optional[dist.ProcessGroup] = None
        self._canonical: dict[str, str] = {}
        self._group_names_of: dict[int, list[list[str]]] = {}  # per optimizer: see `_group_names`
        self._backward_ran = False
        self._set_aside: dict[torch.nn.Parameter, Optional[Tensor]] = {}

    # ----- topology and schedule ------------------------------------------------------------------------------------

    @override
    def topology_for(self, world_size: int) -> Topology:
        return Topology.for_world(world_size, pipeline=self.stages or world_size)

    def num_microbatches(self, pipeline: int) -> int:
        return self.microbatches if self.microbatches is not None else 2 * pipeline

    def schedule_for(self, pipeline: int) -> Schedule:
        """The training schedule on ``pipeline`` ranks; raises ScheduleError when the sizes do not fit it."""
        return build_schedule(self.schedule_name, pipeline, self.num_microbatches(pipeline), self.chunks)

    @property
    def pipeline_rank(self) -> int:
        return self.topology.coordinates(self.global_rank)["pipeline"]

    def _splits(self) -> bool:
        """Whether the module is split into stages. A strategy composing a pipeline with other axes (``hybrid``)
        says no for a pipeline of one stage: the module then runs whole, as under ``dp``, and every step method
        below falls through to the data-parallel one."""
        return True

    @override
    def setup_environment(self) -> None:
        # Sizes are checked before any process group exists: a schedule that cannot run must not start.
        if self._splits():
            self.schedule_for(self.topology.pipeline)
        super().setup_environment()

    @property
    @override
    def precision_plugin(self) -> Precision:
        return super().precision_plugin

    @precision_plugin.setter
    @override
    def precision_plugin(self, precision_plugin: Optional[Precision]) -> None:
        name = getattr(precision_plugin, "precision", None)
        if precision_plugin is not None and name not in PIPELINE_PRECISION:
            # 16-mixed's GradScaler decides per rank whether to skip a step, from the gradients that rank holds: the
            # stages (and the shards of a tensor group, for tp1d and hybrid) would drift apart.
            raise ValueError(f"{type(self).__name__} does not support precision={name!r}. "
                             f"Choose one of: {', '.join(PIPELINE_PRECISION)}.")
        self._precision_plugin = precision_plugin

    # ----- splitting the model --------------------------------------------------------------------------------------

    @override
    def setup_module(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        assert module is not None
        if not self._splits():
            return super().setup_module(trainer)
        if not module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} runs backward itself, microbatch by microbatch, inside the schedule; manual "
                "optimization (self.manual_backward in training_step) is not supported. Use automatic optimization."
            )
        if self._partition is None or self._partition.module is not module:
            self._split(module)
        if trainer.state.fn == TrainerFn.FITTING and self.topology.data > 1:
            self._build_bucketer()

    def _split(self, module: "pl.LightningModule") -> None:
        if _is_split(module):
            raise RuntimeError("This LightningModule was already split into pipeline stages by another strategy "
                               "object; build a new module (or reuse the same Trainer).")
        data_group, pipeline_group = self.group("data"), self.group("pipeline")
        # Every copy of a parameter (data replicas, tied or replicated across stages) starts from global rank 0's.
        broadcast_module(module, data_group)
        broadcast_module(module, pipeline_group)
        schedule = self.schedule_for(self.topology.pipeline)
        self._canonical = canonical_names(module)
        rank = self.pipeline_rank
        if choose_split_mode(module, self.split, self.blocks, self.balance, self.split_points) == "trace":
            self._partition = TracePartition(module, schedule.parts, schedule.parts_of(rank), self.split_points)
        else:
            self._partition = self._split_by_blocks(module, schedule, data_group, pipeline_group)
        module._lightning_par_pipeline = True
        holders = parameter_holders(self._canonical, self._partition, schedule)
        self._shared = SharedGradients(module, self._canonical, holders, rank, pipeline_group)
        self._schedule = schedule
        self._pipeline_group = pipeline_group
        self._side_group_for(pipeline_group)
        self._train_executor = None
        self._eval_executors = {}
        self._exchanges = {}  # their skeletons belong to the old executors

    def _side_group_for(self, pipeline_group: dist.ProcessGroup) -> None:
        # The gloo twin of the pipeline group, for the first step of each input shape (see [Note: overlap and
        # ordering] in executor.py). `new_group` is collective over the world: every rank makes every twin in order.
        if self._side_group_of is not pipeline_group:
            self._side_group = pipeline_group  # a gloo group is its own twin
            if str(dist.get_backend(pipeline_group)) != "gloo" and self.topology.pipeline > 1:
                for ranks in self.topology.groups("pipeline"):
                    group = dist.new_group(ranks, backend="gloo")
                    if self.global_rank in ranks:
                        assert sorted(ranks) == dist.get_process_group_ranks(pipeline_group), ranks
                        self._side_group = group
            self._side_group_of = pipeline_group

    def _split_by_blocks(self, module: "pl.LightningModule", schedule: Schedule, data_group: Any,
                         pipeline_group: Any) -> Partition:
        layout = find_blocks(module, self.blocks)
        times = None
        if self.balance == "time":
            example = module.example_input_array
            if example is None:
                raise PartitionError("balance='time' measures the blocks on the module's `example_input_array`; set it "
                                     "(e.g. `self.example_input_array = torch.zeros(2, 64, dtype=torch.long)`).")
            times = agreed_block_times(module, layout, self.batch_to_device(example), self.global_rank == 0,
                                       (data_group, pipeline_group))
        starts = choose_split_points(module, layout, schedule.parts, self.split_points, times)
        return Partition(module, layout, starts, schedule.parts_of(self.pipeline_rank))

    @property
    def partition(self) -> Union[Partition, TracePartition]:
        if self._partition is None:
            raise RuntimeError(f"{type(self).__name__}.partition exists once the model is split, in `setup`.")
        return self._partition

    @property
    def schedule(self) -> Schedule:
        if self._schedule is None:
            raise RuntimeError(f"{type(self).__name__}.schedule is built in `setup`.")
        return self._schedule

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)
        self._group_names_of = {}  # keyed by id(): the optimizers of an earlier fit are gone

    @override
    def grad_norm_parts(self, optimizer: Optimizer) -> list[NormPart]:
        # [Note: clipping over shards] each stage holds part of the norm, summed over the pipeline; a shared
        # parameter counts on its first holder only (all holders have the same gradient). Data-parallel replicas
        # hold the same averaged gradients, so the pipeline group is enough.
        if self._partition is None:
            return super().grad_norm_parts(optimizer)
        counted, copies = self._stage_params(optimizer)
        return [NormPart([p.grad for p in counted], (self._pipeline_group,)),
                NormPart([p.grad for p in copies], counted=False)]

    def _stage_params(self, optimizer: Optimizer, params: Optional[list[torch.nn.Parameter]] = None
                      ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """``optimizer``'s parameters with a gradient on this stage (or ``params``, module parameters): those
        counted in the global norm here, and the copies of shared parameters whose first holder is another stage."""
        names = {id(p): self._canonical[n] for n, p in self.lightning_module.named_parameters(remove_duplicate=False)}
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return ([p for p in params if self._first_holder(names[id(p)])],
                [p for p in params if not self._first_holder(names[id(p)])])

    # ----- steps ----------------------------------------------------------------------------------------------------

    def _executor(self, microbatches: Optional[int] = None) -> PipelineExecutor:
        """The training executor, or (``microbatches`` given) the forward-only one for evaluation."""
        if microbatches is None:
            if self._train_executor is None:
                self._train_executor = PipelineExecutor(self.schedule, self.pipeline_rank, self._pipeline_group,
                                                        self.root_device, self._side_group, self.stall_timeout,
                                                        self.defer_weight_grads)
            return self._train_executor
        if microbatches not in self._eval_executors:
            self._eval_executors[microbatches] = PipelineExecutor(
                forward_only(self.schedule, microbatches), self.pipeline_rank, self._pipeline_group, self.root_device,
                self._side_group, self.stall_timeout)
        return self._eval_executors[microbatches]

    def _run(self, step: Callable[..., Any], executor: PipelineExecutor, batch: Any, rest: tuple, kwargs: dict,
             loss: Optional[Callable[[int, int, Any], Tensor]] = None, **run_kwargs: Any) -> dict[int, Any]:
        module = self.lightning_module
        partition = self.partition
        schedule = executor.schedule
        micro = split_batch(batch, schedule.microbatches)
        recorder = self._recorder = StepRecorder(module)

        def forward(stage: int, microbatch: int, received: Any) -> Any:
            with partition.stage(schedule.stage_part[stage], received), recorder.microbatch(microbatch) as record:
                try:
                    output = step(micro[microbatch], *rest, **kwargs)
                except StageExit as stop:
                    record.stopped()
                    return stop.output
            if not schedule.is_last(stage):
                raise RuntimeError(f"`{step.__name__}` returned without running the model's blocks. A pipelined step "
                                   "must call the model's forward, which runs every block.")
            return output

        # Every rank of the pipeline sees the same batch, so all compute the same signature: the executor's
        # transfers take the recorded shapes from the second step with it on (no host sync).
        signature = (executor.training, module.training, schedule.microbatches,
                     tuple((tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__
                           for t in tree_flatten(micro[0])[0]))
        results = executor.run(forward, loss, signature=signature, **run_kwargs)
        exchange = self._exchanges.setdefault(executor, OutputExchange())  # train and eval steps differ
        return recorder.share(results, self._pipeline_group, schedule.microbatches, self.root_device, exchange,
                              self._side_group)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._partition is None:
            return super().training_step(*args, **kwargs)
        module = self.lightning_module
        trainer = module.trainer
        schedule = self.schedule
        batch, rest = args[0], args[1:]
        scale = 1.0 / (schedule.microbatches * trainer.accumulate_grad_batches)
        # A layer unfrozen during fit needs a bucket before its gradients arrive (see DataParallelStrategy).
        super().pre_backward(torch.empty(0))
        local_params = [p for p in module.parameters() if p.requires_grad]
        local_modules = list(module.modules())
        executor = self._executor()
        last_stage = max(executor.last_grad_action.items(), key=lambda kv: kv[1], default=(None, 0))[0]

        def loss(stage: int, microbatch: int, output: Any) -> Tensor:
            value = output["loss"] if isinstance(output, Mapping) else output
            if not isinstance(value, Tensor):
                raise RuntimeError("In automatic optimization `training_step` must return the loss tensor or a dict "
                                   "with 'loss'; a pipelined step cannot be skipped by returning None.")
            return value * scale

        def before_last_backward(stage: int) -> None:
            # Gradient buckets of the data axis start during the last backward of this rank, not before.
            if self._bucketer is not None and stage == last_stage:
                self._bucketer.sync = self._grad_sync_enabled

        # [Note: gradients across Lightning's zero_grad] Lightning zeroes gradients between training_step and
        # backward, on the first batch of each accumulation window. The schedule's gradients are set aside over
        # that gap (restored in `backward`), and the ones it would have zeroed are dropped before the schedule runs.
        batch_idx = rest[0] if rest else kwargs.get("batch_idx", 0)
        window_start = batch_idx % trainer.accumulate_grad_batches == 0
        trained = [p for optimizer in self.optimizers for group in optimizer.param_groups for p in group["params"]]
        if window_start:
            for p in trained:
                p.grad = None
        if self._bucketer is not None:
            self._bucketer.sync = False
        with self.precision_plugin.train_step_context():
            outputs = self._run(module.training_step, executor, batch, rest, kwargs, loss,
                                params=lambda stage: local_params, modules=lambda stage: local_modules,
                                before_last_backward=before_last_backward)
        self._set_aside = {}
        if window_start:
            self._set_aside = {p: p.grad for p in trained}
            for p in trained:
                p.grad = None
        self._backward_ran = True
        self._recorder.replay(self.root_device)
        merged = merge_outputs([outputs[m] for m in range(schedule.microbatches)])
        if isinstance(merged, Mapping):
            return {k: v.detach() if isinstance(v, Tensor) else v for k, v in merged.items()}
        return merged.detach()

    def _eval_step(self, step: Callable[..., Any], context: Any, args: tuple, kwargs: dict) -> Any:
        batch, rest = args[0], args[1:]
        executor = self._executor(eval_microbatches(batch, self.num_microbatches(self.topology.pipeline)))
        schedule = executor.schedule
        with context:
            outputs = self._run(step, executor, batch, rest, kwargs)
        self._recorder.replay(self.root_device)
        if any(o is None for o in outputs.values()):
            return None
        return merge_outputs([outputs[m] for m in range(schedule.microbatches)])

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._partition is None:
            return super().validation_step(*args, **kwargs)
        return self._eval_step(self.lightning_module.validation_step, self.precision_plugin.val_step_context(),
                               args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._partition is None:
            return super().test_step(*args, **kwargs)
        return self._eval_step(self.lightning_module.test_step, self.precision_plugin.test_step_context(), args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._partition is None:
            return super().predict_step(*args, **kwargs)
        return self._eval_step(self.lightning_module.predict_step, self.precision_plugin.predict_step_context(),
                               args, kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        # See [Note: a pipelined step inside Lightning's automatic optimization]: autograd already ran.
        if self._partition is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        if not self._backward_ran:
            raise RuntimeError(f"{type(self).__name__} runs backward inside its training_step; manual_backward and "
                               "backward outside the schedule are not supported.")
        self._backward_ran = False
        for p, grad in self._set_aside.items():  # see [Note: gradients across Lightning's zero_grad]
            p.grad = grad
        self._set_aside = {}
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        # Before on_after_backward: see [Note: gradients are final in on_after_backward] in base.py.
        self.post_backward(closure_loss)
        return self.precision_plugin.post_backward(closure_loss, module)

    @override
    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)  # the data axis: bucketed all-reduce
        if self._grad_sync_enabled and self._shared:
            self._shared.sum_()

    # ----- checkpoints: see [Note: format] in checkpoint.py ------------------------------------------------------

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # each stage loads its own parameters' pieces

    def _tensor_placement(self) -> Optional[Placement]:
        """How the tensor axis cut a parameter (``hybrid``); None: nothing is cut."""
        return None

    def _zero_engine(self) -> Optional[Any]:
        """The ZeRO engine that holds the parameters' pieces (``hybrid``), or None."""
        return None

    def _first_holder(self, name: str) -> bool:
        """Whether this stage is the first holder of the (canonical) parameter ``name``: it counts the parameter in
        the global norm and writes it to checkpoints; the other holders have the same values."""
        shared = self._shared
        return not shared or name not in shared.holders or shared.holders[name][0] == shared.rank

    def _group_names(self, optimizer: Optimizer, local: list[list[str]]) -> list[list[str]]:
        if self._partition is None:
            return local
        if id(optimizer) not in self._group_names_of:
            order = {name: i for i, name in enumerate(dict.fromkeys(self._canonical.values()))}
            self._group_names_of[id(optimizer)] = optimizer_group_names(local, order, self._pipeline_group)
        return self._group_names_of[id(optimizer)]

    @override
    def checkpoint_holdings(self, saving: bool) -> Optional[Holdings]:
        module = self.lightning_module
        placement, engine = self._tensor_placement(), self._zero_engine()
        if self._partition is None and placement is None and engine is None:
            return None  # every rank holds the whole module: Lightning's single file
        canonical = self._canonical if self._partition is not None else canonical_names(module)
        first_replica = self.topology.coordinates(self.global_rank)["data"] == 0
        return module_holdings(module, canonical, placement or uncut, self._held_optimizers(), self._group_names,
                               engine, buffers=first_replica or not saving,
                               keep=self._first_holder if saving else (lambda name: True))


def _is_split(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "_lightning_par_pipeline", False))
