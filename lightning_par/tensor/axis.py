"""The tensor axis as a component: what a strategy does to shard a module over its tensor group by a plan and to keep
the gradients of the sharded module right. ``tp1d`` and ``hybrid`` compose it; it owns no Lightning hook."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.collectives import group_rank
from lightning_par.comm.grad_norm import NormPart
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.layers_1d import VocabParallelOutput, shard_spec
from lightning_par.tensor.plan import AppliedPlan, applied_plan, parallelize, unparallelize
from lightning_par.tensor.styles import ParallelStyle, SequenceParallelRegion, divisors
from lightning_par.tensor.replicated_grads import mean_over_group
from lightning_par.zero.materialize import Materializer, has_meta_tensors
from lightning_par.zero.pieces import Placement

if TYPE_CHECKING:
    from lightning_par.zero.engine import ZeroEngine

Groups = tuple[Optional[dist.ProcessGroup], ...]


class TensorAxis:
    """Shards a module over a tensor group by ``plan`` (None: the automatic plan) and keeps its gradients right.

    ``who`` (``"tp1d"``) and ``owner`` (its class name) name the strategy in messages. The other arguments are
    those of ``tp1d`` (see its docstring)."""

    def __init__(self, *, plan: Optional[dict[str, Union[str, ParallelStyle]]], sequence_parallel: Optional[bool],
                 sequence_dim: int, sequence_chunks: int, vocab_parallel_loss: bool, strict: bool,
                 param_init_fn: Optional[Callable[[nn.Module], None]], who: str, owner: str) -> None:
        if not isinstance(sequence_chunks, int) or sequence_chunks < 1:
            raise ValueError(f"sequence_chunks must be a positive integer; got {sequence_chunks!r}.")
        self.plan = dict(plan) if plan is not None else None
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.sequence_chunks = sequence_chunks
        self.vocab_parallel_loss = vocab_parallel_loss
        self.strict = strict
        self.param_init_fn = param_init_fn
        self.who, self.owner = who, owner
        self.sharded_here = False  # this component sharded the module: `unshard` makes it whole again
        self.failed = False  # training raised: another rank may be gone, no collective in `unshard`

    # ----- sizes ----------------------------------------------------------------------------------------------------

    def default_size(self, module: Optional[nn.Module], ranks: int) -> Optional[int]:
        """The largest divisor of ``ranks`` that divides every head count and width the automatic plan would split
        (``ranks`` itself for a custom plan); None while the module is not known yet."""
        if module is None:
            return None
        existing = applied_plan(module)
        if existing is not None:
            divisor = existing.tg.size
        else:
            divisor = auto_plan(module).divisor() if self.plan is None else 0
        return max(d for d in divisors(ranks) if divisor == 0 or divisor % d == 0)

    # ----- sharding -------------------------------------------------------------------------------------------------

    mode = "1d"
    depth = 1

    def shard(self, module: nn.Module, group_of: Callable[[str], dist.ProcessGroup], size: int,
              device: torch.device) -> AppliedPlan:
        """Materialise a meta-built module, agree on rank 0's weights over the tensor group (``group_of``: the
        strategy's groups by mesh axis), and apply the plan; a module sharded before (a second ``fit``) keeps its
        shards and is bound to the new group."""
        group = group_of("tensor")
        existing = applied_plan(module)
        if existing is None:
            materialize_whole(module, device, self.param_init_fn, self.who, self.owner)
            broadcast_module(module, group)  # every rank of the tensor group cuts the same full weights
            if self.plan is None:
                automatic = auto_plan(module, size)
                plan, notes, reasons = automatic.plan, automatic.notes, automatic.reasons
                message = automatic.strict_error()
                if message is not None and size > 1:
                    if self.strict:
                        raise ValueError(message)
                    rank_zero_warn(message.split("\nGive a plan")[0] + " (strict=False: training them replicated).")
            else:
                plan, notes, reasons = self.plan, [], None
            sp = self.resolve_sequence_parallel(plan, size)
            existing = parallelize(module, plan, group, sequence_parallel=sp, sequence_dim=self.sequence_dim,
                                   vocab_parallel_loss=self.vocab_parallel_loss, token_chunks=self.sequence_chunks,
                                   notes=notes, reasons=reasons)
            self.sharded_here = True
            self.failed = False
            rank_zero_info(existing.describe())
        else:
            existing.rebind(group)
            if self.sequence_parallel is not None and existing.sequence_parallel != (self.sequence_parallel
                                                                                    and size > 1):
                raise ValueError("This module was sharded with sequence_parallel="
                                 f"{existing.sequence_parallel}; build a new module to change it.")
        for m in module.modules():
            if isinstance(m, VocabParallelOutput):
                m.vocab_parallel_loss = self.vocab_parallel_loss
        share_rng_state(group, device)
        return existing

    def resolve_sequence_parallel(self, plan: dict, tensor: int) -> bool:
        """``sequence_parallel`` as given, or for None: on where the plan has a sequence-parallel region (Megatron
        turns it on together with tensor parallelism), else off, said in an info line."""
        if self.sequence_parallel is not None:
            return bool(self.sequence_parallel)
        if tensor == 1:
            return False
        has_region = any(isinstance(style, SequenceParallelRegion) or style == SequenceParallelRegion.name
                         for style in plan.values())
        if not has_region:
            rank_zero_info(f"{self.who}: sequence parallelism off: the plan has no sequence-parallel region (a list of "
                           "blocks run one after the other); pass sequence_parallel=False to silence this.")
        return has_region

    # ----- gradients ------------------------------------------------------------------------------------------------

    @staticmethod
    def before_backward(module: nn.Module) -> None:
        plan = applied_plan(module)
        if plan is not None:
            plan.tg.weight_grads.active = True  # see [Note: deferred weight gradients] in tensor/deferred_grads.py

    @staticmethod
    def finish_weight_grads(module: nn.Module) -> None:
        """The last deferred weight gradients, before anything reads a gradient."""
        plan = applied_plan(module)
        if plan is not None:
            plan.tg.weight_grads.flush()

    @staticmethod
    def sum_replicated_grads(module: nn.Module) -> None:
        """The sequence-parallel regions' replicated gradients summed over the tensor group, from ``.grad`` (see
        [Note: one coalesced sum of the replicated gradients]); once per backward that synchronises gradients."""
        plan = applied_plan(module)
        if plan is not None:
            plan.reduce_replicated_grads()

    @staticmethod
    def keep_replicated_of(module: nn.Module) -> None:
        """Sum only the replicated gradients of parameters ``module`` still holds: a pipeline stage dropped the other
        stages' blocks, whose gradients would otherwise be summed as zeros, and read back as missing (a host sync)."""
        plan = applied_plan(module)
        if plan is not None and plan.replicated_grads is not None:
            here = {id(p) for p in module.parameters()}
            plan.replicated_grads.params = [p for p in plan.replicated_grads.params if id(p) in here]

    @staticmethod
    def norm_parts(module: nn.Module, grads: list[tuple[nn.Parameter, torch.Tensor]], others: Groups = (),
                   counted: bool = True) -> list[NormPart]:
        """``grads`` ((parameter, gradient) pairs) as parts of the global norm: a sharded parameter's gradients are
        summed over the tensor group and ``others``, a replicated one's over ``others`` only."""
        plan = applied_plan(module)
        group = (plan.tg.group,) if plan is not None else ()
        return [NormPart([g for p, g in grads if shard_spec(p) is not None], group + others, counted),
                NormPart([g for p, g in grads if shard_spec(p) is None], others, counted)]

    @staticmethod
    def zero_replicated(module: nn.Module, engine: "ZeroEngine", device: torch.device) -> None:
        """Under ZeRO (no pipeline): the replicated parameters' gradient pieces averaged over the tensor group (see
        ``tensor/replicated_grads.mean_over_group``)."""
        plan = applied_plan(module)
        if plan is not None and plan.replicated_grads is not None:
            names = {engine.names[p] for p in plan.replicated_grads.params}
            pieces = [g for name, g in engine.shard_gradients() if name in names]
            mean_over_group(pieces, plan.tg, device)

    @staticmethod
    def placement(module: nn.Module) -> Optional[Placement]:
        """How each parameter is cut, for checkpoints; None while the module is whole."""
        plan = applied_plan(module)
        if plan is None:
            return None
        rank = group_rank(plan.tg.group)
        return lambda p: (spec, rank) if (spec := shard_spec(p)) is not None else None

    @staticmethod
    def clear(module: nn.Module) -> None:
        """After an exception in backward: drop the deferred weight gradients."""
        plan = applied_plan(module)
        if plan is not None:
            plan.tg.weight_grads.clear()

    # ----- teardown -------------------------------------------------------------------------------------------------

    def unshard(self, module: Optional[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        """Make the module whole again (original classes, names and shapes) with the optimizers' state, unless
        training failed (then it stays sharded, with a warning)."""
        if module is None or not self.sharded_here or applied_plan(module) is None:
            return
        if self.failed:
            rank_zero_warn(f"{self.who}: training failed; the module is left sharded (its parameters hold this "
                           "rank's shards).")
        else:
            unparallelize(module, optimizers)
        self.sharded_here = False


def materialize_whole(module: nn.Module, device: torch.device, param_init_fn: Optional[Callable[[nn.Module], None]],
                      who: str, owner: str) -> None:
    """Initialise meta tensors with the model's own initialisation (``zero/materialize.py``), whole, before a plan
    cuts them; rank 0's values are then broadcast to the tensor group. Tied weights are one Parameter, initialised
    once. A module that cannot be initialised is refused there, by name."""
    if not has_meta_tensors(module):
        return
    materializer = Materializer(module, device, param_init_fn, who=who, strategy=owner)
    for m in module.modules():
        materializer.materialize(m)


def share_rng_state(group: dist.ProcessGroup, device: torch.device) -> None:
    """Give every rank of the tensor group tensor-rank 0's random state.

    Activations outside the sharded layers are replicated over the tensor group: their dropout masks must be the
    same on every rank or the replicas drift apart. (Consequence: inside the sharded layers, and on the sequence
    shards under sequence parallelism, ranks draw the same mask for different heads / tokens.)
    """
    if dist.get_world_size(group) == 1:
        return
    states = [torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None]
    dist.broadcast_object_list(states, group_src=0, group=group, device=device if device.type == "cuda" else None)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)
