"""The pipeline axis as a component of a Lightning strategy: the module split into stages by its blocks (or by tracing
its forward), and each training or evaluation step run as a schedule of microbatches. The pipelines and ``hybrid``
compose it (``strategies/composed.py``); it owns no Lightning hook.

[Note: a pipelined step inside Lightning's automatic optimization]
Lightning's loop calls ``strategy.training_step`` (inside the optimizer's closure), then ``strategy.backward`` on
the returned loss, then the optimizer step. A pipeline cannot separate forward from backward: 1F1B runs the
backward of microbatch 0 before the forward of microbatch p. So the strategy's ``training_step`` runs the whole
schedule (:meth:`PipelineRuntime.train_step`): it cuts the batch into microbatches, and for each forward action
calls the user's own ``training_step`` on one microbatch with the model arranged for that stage
(:class:`~lightning_par.pipeline.partition.Partition`); the last stage's loss, scaled by 1 / (microbatches x
accumulation), is backpropagated by the executor. It returns the batch loss (the microbatch mean, the same on every
rank, detached). Lightning's ``backward`` then finds the gradients already there: the strategy's ``backward`` runs
the hooks around it (``on_before_backward``, ``on_after_backward``) and the gradient communication
(``post_backward``), but not autograd (:meth:`PipelineRuntime.after_schedule`). Accumulation, clipping (over all
stages), the optimizer step, LR schedulers and checkpoints then work as with any strategy. Manual optimization is
refused: its ``manual_backward`` would call backward per microbatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten

import lightning.pytorch as pl
from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.data_axis import DataAxis
from lightning_par.pipeline.executor import PipelineExecutor
from lightning_par.pipeline.partition import Partition, PartitionError, StageExit, choose_split_points, find_blocks
from lightning_par.pipeline.schedules import Schedule, build_schedule, forward_only
from lightning_par.pipeline.shared import SharedGradients, canonical_names, optimizer_group_names, parameter_holders
from lightning_par.pipeline.split_choice import agreed_block_times, choose_split_mode
from lightning_par.pipeline.steps import OutputExchange, StepRecorder, eval_microbatches, merge_outputs, split_batch
from lightning_par.pipeline.trace_split import TracePartition
from lightning_par.topology import Topology

ScheduleName = Literal["1f1b", "gpipe", "interleaved", "zero_bubble", "chimera"]


class PipelineRuntime:
    """Splits a module into pipeline stages and runs its steps by a schedule; the arguments are ``pipeline``'s (see
    its docstring). ``stages`` None: the whole world is one pipeline."""

    def __init__(self, schedule: ScheduleName = "1f1b", stages: Optional[int] = None,
                 microbatches: Optional[int] = None, chunks: Optional[int] = None,
                 split_points: Optional[list[Union[int, str]]] = None,
                 split: Literal["auto", "blocks", "trace"] = "auto", balance: Literal["params", "time"] = "params",
                 blocks: Optional[str] = None, stall_timeout: float = 600.0, defer_weight_grads: bool = False) -> None:
        if schedule not in ("1f1b", "gpipe", "interleaved", "zero_bubble", "chimera"):
            raise ValueError(f"Unknown schedule {schedule!r}; choose 1f1b, gpipe, interleaved, zero_bubble or chimera.")
        if chunks is not None and chunks != 1 and schedule != "interleaved":
            raise ValueError(f"chunks={chunks} only applies to schedule='interleaved'; {schedule!r} runs one chunk.")
        for name, value in (("stages", stages), ("microbatches", microbatches), ("chunks", chunks)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if not isinstance(stall_timeout, (int, float)) or isinstance(stall_timeout, bool) or stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds; got {stall_timeout!r}.")
        if balance not in ("params", "time"):
            raise ValueError(f"balance must be 'params' or 'time'; got {balance!r}.")
        if split not in ("auto", "blocks", "trace"):
            raise ValueError(f"split must be 'auto', 'blocks' or 'trace'; got {split!r}.")
        self.schedule_name = schedule
        self.stages = stages
        self.microbatches = microbatches
        self.chunks = chunks if chunks is not None else (2 if schedule == "interleaved" else 1)
        self.split_points = split_points
        self.split_mode = split
        self.balance = balance
        self.blocks = blocks
        self.stall_timeout = float(stall_timeout)
        self.defer_weight_grads = bool(defer_weight_grads)
        self.partition: Optional[Union[Partition, TracePartition]] = None
        self.schedule: Optional[Schedule] = None
        self.canonical: dict[str, str] = {}  # local parameter name (aliases too) -> its single-process name
        self.shared: Optional[SharedGradients] = None
        self.group: Optional[dist.ProcessGroup] = None
        self.rank = 0  # this rank's position in its pipeline
        self.device = torch.device("cpu")
        self._side_group: Optional[dist.ProcessGroup] = None
        self._side_group_of: Optional[dist.ProcessGroup] = None  # the pipeline group `_side_group` belongs to
        self._exchanges: dict[Any, OutputExchange] = {}  # per executor: see [Note: sharing outputs without a host sync]
        self._train_executor: Optional[PipelineExecutor] = None
        self._eval_executors: dict[int, PipelineExecutor] = {}  # by microbatch count
        self._group_names_of: dict[int, list[list[str]]] = {}  # per optimizer: see `group_names`
        self._backward_ran = False
        self._set_aside: dict[torch.nn.Parameter, Optional[Tensor]] = {}
        self._recorder: Optional[StepRecorder] = None

    # ----- sizes ----------------------------------------------------------------------------------------------------

    def size(self, world_size: int) -> int:
        return self.stages or world_size

    def num_microbatches(self, pipeline: int) -> int:
        return self.microbatches if self.microbatches is not None else 2 * pipeline

    def schedule_for(self, pipeline: int) -> Schedule:
        """The training schedule on ``pipeline`` ranks; raises ScheduleError when the sizes do not fit it."""
        return build_schedule(self.schedule_name, pipeline, self.num_microbatches(pipeline), self.chunks)

    # ----- splitting the model --------------------------------------------------------------------------------------

    def split(self, module: "pl.LightningModule", topology: Topology, global_rank: int, data_group: Any,
              pipeline_group: dist.ProcessGroup, device: torch.device,
              batch_to_device: Callable[[Any], Any]) -> None:
        """Split ``module`` (once; a second ``fit`` keeps the stages) into this rank's stages."""
        self.device = device
        self.rank = topology.coordinates(global_rank)["pipeline"]
        if self.partition is not None and self.partition.module is module:
            return
        if getattr(module, "_lightning_par_pipeline", False):
            raise RuntimeError("This LightningModule was already split into pipeline stages by another strategy "
                               "object; build a new module (or reuse the same Trainer).")
        # Every copy of a parameter (data replicas, tied or replicated across stages) starts from global rank 0's.
        broadcast_module(module, data_group)
        broadcast_module(module, pipeline_group)
        schedule = self.schedule_for(topology.pipeline)
        self.canonical = canonical_names(module)
        if choose_split_mode(module, self.split_mode, self.blocks, self.balance, self.split_points) == "trace":
            self.partition = TracePartition(module, schedule.parts, schedule.parts_of(self.rank), self.split_points)
        else:
            self.partition = self._split_by_blocks(module, schedule, (data_group, pipeline_group), global_rank == 0,
                                                   batch_to_device)
        module._lightning_par_pipeline = True
        holders = parameter_holders(self.canonical, self.partition, schedule)
        self.shared = SharedGradients(module, self.canonical, holders, self.rank, pipeline_group)
        self.schedule = schedule
        self.group = pipeline_group
        self._side_group_for(pipeline_group, topology, global_rank)
        self._train_executor = None
        self._eval_executors = {}
        self._exchanges = {}  # their skeletons belong to the old executors

    def _side_group_for(self, pipeline_group: dist.ProcessGroup, topology: Topology, global_rank: int) -> None:
        # The gloo twin of the pipeline group, for the first step of each input shape (see [Note: overlap and
        # ordering] in executor.py). `new_group` is collective over the world: every rank makes every twin in order.
        if self._side_group_of is not pipeline_group:
            self._side_group = pipeline_group  # a gloo group is its own twin
            if str(dist.get_backend(pipeline_group)) != "gloo" and topology.pipeline > 1:
                for ranks in topology.groups("pipeline"):
                    group = dist.new_group(ranks, backend="gloo")
                    if global_rank in ranks:
                        assert sorted(ranks) == dist.get_process_group_ranks(pipeline_group), ranks
                        self._side_group = group
            self._side_group_of = pipeline_group

    def _split_by_blocks(self, module: "pl.LightningModule", schedule: Schedule, groups: tuple, first: bool,
                         batch_to_device: Callable[[Any], Any]) -> Partition:
        layout = find_blocks(module, self.blocks)
        times = None
        if self.balance == "time":
            example = module.example_input_array
            if example is None:
                raise PartitionError("balance='time' measures the blocks on the module's `example_input_array`; set it "
                                     "(e.g. `self.example_input_array = torch.zeros(2, 64, dtype=torch.long)`).")
            times = agreed_block_times(module, layout, batch_to_device(example), first, groups)
        starts = choose_split_points(module, layout, schedule.parts, self.split_points, times)
        return Partition(module, layout, starts, schedule.parts_of(self.rank))

    # ----- steps ----------------------------------------------------------------------------------------------------

    def _executor(self, microbatches: Optional[int] = None) -> PipelineExecutor:
        """The training executor, or (``microbatches`` given) the forward-only one for evaluation."""
        if microbatches is None:
            if self._train_executor is None:
                self._train_executor = PipelineExecutor(self.schedule, self.rank, self.group, self.device,
                                                        self._side_group, self.stall_timeout,
                                                        self.defer_weight_grads)
            return self._train_executor
        if microbatches not in self._eval_executors:
            self._eval_executors[microbatches] = PipelineExecutor(
                forward_only(self.schedule, microbatches), self.rank, self.group, self.device, self._side_group,
                self.stall_timeout)
        return self._eval_executors[microbatches]

    def _run(self, module: "pl.LightningModule", step: Callable[..., Any], executor: PipelineExecutor, batch: Any,
             rest: tuple, kwargs: dict, loss: Optional[Callable[[int, int, Any], Tensor]] = None,
             **run_kwargs: Any) -> dict[int, Any]:
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
        return recorder.share(results, self.group, schedule.microbatches, self.device, exchange, self._side_group)

    def train_step(self, module: "pl.LightningModule", optimizers: list[Optimizer], context: Any, args: tuple,
                   kwargs: dict, data: Optional[DataAxis], sync: bool) -> Any:
        """One training step: the whole schedule, forward and backward, under ``context`` (the precision plugin's);
        ``data``'s buckets start during this rank's last backward when ``sync``."""
        trainer = module.trainer
        schedule = self.schedule
        batch, rest = args[0], args[1:]
        scale = 1.0 / (schedule.microbatches * trainer.accumulate_grad_batches)
        if data is not None:
            data.before_backward(sync)  # a layer unfrozen during fit needs a bucket before its gradients arrive
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
            if data is not None and stage == last_stage:
                data.set_sync(sync)

        # [Note: gradients across Lightning's zero_grad] Lightning zeroes gradients between training_step and
        # backward, on the first batch of each accumulation window. The schedule's gradients are set aside over
        # that gap (restored in `after_schedule`), and the ones it would have zeroed are dropped before the
        # schedule runs.
        batch_idx = rest[0] if rest else kwargs.get("batch_idx", 0)
        window_start = batch_idx % trainer.accumulate_grad_batches == 0
        trained = [p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
        if window_start:
            for p in trained:
                p.grad = None
        if data is not None:
            data.set_sync(False)
        with context:
            outputs = self._run(module, module.training_step, executor, batch, rest, kwargs, loss,
                                params=lambda stage: local_params, modules=lambda stage: local_modules,
                                before_last_backward=before_last_backward)
        self._set_aside = {}
        if window_start:
            self._set_aside = {p: p.grad for p in trained}
            for p in trained:
                p.grad = None
        self._backward_ran = True
        self._recorder.replay(self.device)
        merged = merge_outputs([outputs[m] for m in range(schedule.microbatches)])
        if isinstance(merged, Mapping):
            return {k: v.detach() if isinstance(v, Tensor) else v for k, v in merged.items()}
        return merged.detach()

    def eval_step(self, module: "pl.LightningModule", step: Callable[..., Any], context: Any, args: tuple,
                  kwargs: dict) -> Any:
        """One validation, test or predict step (``step``: the module's), forward only."""
        batch, rest = args[0], args[1:]
        assert self.schedule is not None
        executor = self._executor(eval_microbatches(batch, self.num_microbatches(self.schedule.ranks)))
        with context:
            outputs = self._run(module, step, executor, batch, rest, kwargs)
        self._recorder.replay(self.device)
        if any(o is None for o in outputs.values()):
            return None
        return merge_outputs([outputs[m] for m in range(executor.schedule.microbatches)])

    def after_schedule(self, who: str) -> None:
        """In the strategy's ``backward``: autograd already ran inside ``train_step``; give back the gradients set
        aside over Lightning's ``zero_grad`` (see [Note: gradients across Lightning's zero_grad])."""
        if not self._backward_ran:
            raise RuntimeError(f"{who} runs backward inside its training_step; manual_backward and backward outside "
                               "the schedule are not supported.")
        self._backward_ran = False
        for p, grad in self._set_aside.items():
            p.grad = grad
        self._set_aside = {}

    def sum_shared(self) -> None:
        """Sum the gradients of parameters held by several stages (tied embeddings) over their holders."""
        if self.shared:
            self.shared.sum_()

    # ----- norms and checkpoints ----------------------------------------------------------------------------------

    def first_holder(self, name: str) -> bool:
        """Whether this stage is the first holder of the (canonical) parameter ``name``: it counts the parameter in
        the global norm and writes it to checkpoints; the other holders have the same values."""
        shared = self.shared
        return not shared or name not in shared.holders or shared.holders[name][0] == shared.rank

    def stage_params(self, module: torch.nn.Module, params: list[torch.nn.Parameter]
                     ) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """``params`` (module parameters of this stage) split into those counted in the global norm here and the
        copies of shared parameters whose first holder is another stage."""
        names = {id(p): self.canonical[n] for n, p in module.named_parameters(remove_duplicate=False)}
        return ([p for p in params if self.first_holder(names[id(p)])],
                [p for p in params if not self.first_holder(names[id(p)])])

    def group_names(self, optimizer: Optimizer, local: list[list[str]]) -> list[list[str]]:
        """``optimizer``'s parameter names per group over every stage (this stage's ``local`` ones and the others')."""
        if id(optimizer) not in self._group_names_of:
            order = {name: i for i, name in enumerate(dict.fromkeys(self.canonical.values()))}
            self._group_names_of[id(optimizer)] = optimizer_group_names(local, order, self.group)
        return self._group_names_of[id(optimizer)]

    def forget_optimizers(self) -> None:
        self._group_names_of = {}  # keyed by id(): the optimizers of an earlier fit are gone
