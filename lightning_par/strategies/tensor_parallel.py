"""1D tensor parallelism (Megatron-LM), with optional sequence parallelism, on top of data parallelism."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.comm.buckets import broadcast_module
from lightning_par.comm.collectives import group_rank
from lightning_par.comm.grad_norm import NormPart
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.tensor import full_state
from lightning_par.tensor.auto_plan import auto_plan
from lightning_par.tensor.layers_1d import VocabParallelOutput, shard_spec
from lightning_par.tensor.loss import materialize_logits
from lightning_par.tensor.plan import (
    AppliedPlan,
    applied_plan,
    parallelize,
    unparallelize,
)
from lightning_par.tensor.styles import (
    ParallelStyle,
    SequenceParallelRegion,
    divisors,
)
from lightning_par.topology import Topology
from lightning_par.zero.materialize import Materializer, has_meta_tensors


class TensorParallel1DStrategy(DataParallelStrategy):
    """1D tensor parallelism (``strategy="tp1d"``): weight matrices split over a tensor group of ``tensor_size``
    ranks; the remaining ``world / tensor_size`` ranks are data parallel (``dp``'s bucketed all-reduce, over the
    data axis).

    The LightningModule is sharded in place when ``fit`` starts, by ``plan`` or, by default, by the automatic plan
    (attention and MLP blocks, ``nn.MultiheadAttention``, ``nn.Transformer*`` layers, the token embedding and the
    output layer; see ``docs/tp1d.md``), which is logged. Its code does not change.

    Args:
        tensor_size: ranks per tensor group. Default: the largest divisor of the world size that divides every head
            count and hidden width the automatic plan would split (the world size for a custom plan).
        sequence_parallel: split the activations between blocks (norms, dropout, residuals) along the sequence;
            the block's all-reduces become a reduce-scatter and an all-gather. None (default): on where the plan
            allows it (it has a sequence-parallel region, and the tensor size is above 1), else off with an info
            line; True: required (the plan's errors stay errors); False: off.
        plan: ``{module name or glob: style}``; None for the automatic plan.
        sequence_dim: the sequence dim of the activations between the user's blocks (1 for ``[batch, seq, ...]``);
            ``nn.Transformer*`` layers use their own ``batch_first``.
        sequence_chunks: under sequence parallelism, each row-parallel layer multiplies the tokens in this many
            chunks and reduce-scatters one chunk while it multiplies the next (backward: all-gathers while it
            multiplies), hiding the collectives behind the matmuls; 1 (default): one matmul, then the collective.
            Used when the batch's tokens divide into ``sequence_chunks * tensor_size`` blocks, else 1. On 2 and 4
            H100s on NVLink (1.3B GPT, 2026-11-26) 2 and 4 chunks were 2-6% slower than 1: the overlap there costs
            more than it hides (see docs/benchmarks.md); try it where links are slower.
        vocab_parallel_loss: the output layer hands out its vocabulary shard, so ``F.cross_entropy`` on the logits
            never gathers them; False gathers the logits in the output layer.
        strict: with the automatic plan, refuse a model with a list of repeated blocks of which the plan shards
            nothing (naming the block class); False trains such a model with those blocks replicated, with a
            warning.
        param_init_fn: initialises a module built on the meta device (``Trainer.init_module(empty_init=True)`` or
            ``configure_model``), called with each module that owns meta tensors, which already have storage: fill
            them in place. Default: the model's own ``_init_weights`` (Hugging Face) or ``reset_parameters()``; see
            ``docs/tp1d.md``.
        bucket_size_mb, process_group_backend, timeout, start_method: as for ``dp``.

    After ``fit`` (``validate``, ...) the module is whole again on every rank: its original classes, parameter
    names and full shapes, trained values gathered from the shards (``save_pretrained`` and inference work as in one
    process); the optimizers hold the whole parameters and full-shaped state.
    """

    def __init__(
        self,
        tensor_size: Optional[int] = None,
        sequence_parallel: Optional[bool] = None,
        plan: Optional[dict[str, Union[str, ParallelStyle]]] = None,
        sequence_dim: int = 1,
        sequence_chunks: int = 1,
        vocab_parallel_loss: bool = True,
        strict: bool = True,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        bucket_size_mb: float = 25.0,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        super().__init__(
            bucket_size_mb=bucket_size_mb,
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if tensor_size is not None and (not isinstance(tensor_size, int) or tensor_size < 1):
            raise ValueError(f"tensor_size must be a positive integer or None; got {tensor_size!r}.")
        self.tensor_size = tensor_size
        self.sequence_parallel = sequence_parallel
        self.plan = dict(plan) if plan is not None else None
        self.sequence_dim = sequence_dim
        if not isinstance(sequence_chunks, int) or sequence_chunks < 1:
            raise ValueError(f"sequence_chunks must be a positive integer; got {sequence_chunks!r}.")
        self.sequence_chunks = sequence_chunks
        self.vocab_parallel_loss = vocab_parallel_loss
        self.strict = strict
        self.param_init_fn = param_init_fn
        self._restore_after_setup = False  # this run's module was built on the meta device (see the property)
        self._default_sizes: dict[int, int] = {}
        self._sharded_here = False  # this strategy sharded the module in setup: teardown makes it whole again
        self._failed = False

    # ----- topology -----------------------------------------------------------------------------------------------

    @override
    def topology_for(self, world_size: int) -> Topology:
        tensor = self.tensor_size if self.tensor_size is not None else self._default_tensor_size(world_size)
        return Topology.for_world(world_size, tensor=tensor)

    def _default_tensor_size(self, world_size: int) -> int:
        if world_size in self._default_sizes:
            return self._default_sizes[world_size]
        module = self.lightning_module
        if module is None:
            return world_size  # not cached: the module decides once it is connected
        existing = applied_plan(module)
        if existing is not None:
            divisor = existing.tg.size
        else:
            divisor = auto_plan(module).divisor() if self.plan is None else 0
        size = max(d for d in divisors(world_size) if divisor == 0 or divisor % d == 0)
        self._default_sizes[world_size] = size
        return size

    @property
    def applied_plan(self) -> Optional[AppliedPlan]:
        """What the plan did to the module (after ``setup``): entries, notes and the tensor group."""
        return applied_plan(self.lightning_module) if self.lightning_module is not None else None

    # ----- sharding -------------------------------------------------------------------------------------------------

    @override
    def setup_module(self, trainer: "pl.Trainer") -> None:
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn == TrainerFn.FITTING:
            self._refuse_weight_averaging(
                trainer,
                ": it copies the whole module when fit starts and then averages the parameters of the sharded one "
                "(each rank holds 1/tensor_size of every sharded weight), a size mismatch.",
                "; or average after fit, when the module is whole again")
        group = self.group("tensor")
        tensor = self.topology.tensor
        existing = applied_plan(module)
        if existing is None:
            self._materialize(module)
            broadcast_module(module, group)  # every rank of the tensor group cuts the same full weights
            if self.plan is None:
                automatic = auto_plan(module, tensor)
                plan, notes, reasons = automatic.plan, automatic.notes, automatic.reasons
                message = automatic.strict_error()
                if message is not None and tensor > 1:
                    if self.strict:
                        raise ValueError(message)
                    rank_zero_warn(message.split("\nGive a plan")[0] + " (strict=False: training them replicated).")
            else:
                plan, notes, reasons = self.plan, [], None
            sp = self._resolve_sequence_parallel(plan, tensor)
            applied = parallelize(module, plan, group, sequence_parallel=sp,
                                  sequence_dim=self.sequence_dim, vocab_parallel_loss=self.vocab_parallel_loss,
                                  token_chunks=self.sequence_chunks, notes=notes, reasons=reasons)
            self._sharded_here = True
            self._failed = False
            rank_zero_info(applied.describe())
        else:
            # A second fit / validate of the same module: same shards, new process groups.
            existing.rebind(group)
            if self.sequence_parallel is not None and existing.sequence_parallel != (self.sequence_parallel
                                                                                    and tensor > 1):
                raise ValueError("This module was sharded with sequence_parallel="
                                 f"{existing.sequence_parallel}; build a new module to change it.")
        for m in module.modules():
            if isinstance(m, VocabParallelOutput):
                m.vocab_parallel_loss = self.vocab_parallel_loss
        _share_rng_state(group, self.root_device)
        super().setup_module(trainer)

    # ----- meta-device initialisation -----------------------------------------------------------------------------

    @override
    def _initialises_meta(self) -> bool:
        # Materialised whole in `setup_module` by the model's own initialisation, before the plan cuts it.
        return True

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # A module built on the meta device (`Trainer.init_module(empty_init=True)`) has nothing to load into
        # before `setup_module` materialises it: loading first would be a no-op, and the materialisation would then
        # replace the checkpoint's weights with fresh ones. After setup, `load_model_state_dict` shards the
        # checkpoint's whole tensors instead. A whole module keeps Lightning's usual order (restore, then setup),
        # which is also the order in which Lightning passes `Trainer.fit(..., weights_only=...)` on. Lightning asks
        # before setup and again after it, when the module is no longer on meta: the first answer is kept.
        module = self.lightning_module
        if module is not None and has_meta_tensors(module):
            self._restore_after_setup = True
        return self._restore_after_setup

    def _materialize(self, module: torch.nn.Module) -> None:
        """Initialise meta tensors with the model's own initialisation (``zero/materialize.py``), whole, before the
        plan cuts them; rank 0's values are then broadcast to the tensor group. Tied weights are one Parameter,
        initialised once. A module that cannot be initialised is refused there, by name."""
        if not has_meta_tensors(module):
            return
        materializer = Materializer(module, self.root_device, self.param_init_fn, who="tp1d",
                                    strategy="TensorParallel1DStrategy")
        for m in module.modules():
            materializer.materialize(m)

    def _resolve_sequence_parallel(self, plan: Any, tensor: int) -> bool:
        """``sequence_parallel`` as given, or for None: on where the plan has a sequence-parallel region (Megatron
        turns it on together with tensor parallelism), else off, said in an info line."""
        if self.sequence_parallel is not None:
            return bool(self.sequence_parallel)
        if tensor == 1:
            return False
        has_region = any(isinstance(style, SequenceParallelRegion) or style == SequenceParallelRegion.name
                         for style in plan.values())
        if not has_region:
            rank_zero_info("tp1d: sequence parallelism off: the plan has no sequence-parallel region (a list of "
                           "blocks run one after the other); pass sequence_parallel=False to silence this.")
        return has_region

    # ----- gradients ------------------------------------------------------------------------------------------------

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        plan = self.applied_plan
        if plan is not None:
            plan.tg.weight_grads.active = True  # see [Note: deferred weight gradients] in tensor/deferred_grads.py

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        plan = self.applied_plan
        if plan is not None:
            plan.tg.weight_grads.flush()  # the last deferred weight gradients, before anything reads a gradient
        super().post_backward(closure_loss)  # the data axis: bucketed average
        # Every backward goes through here (`manual_backward` too); accumulation steps skip the sum, the backward
        # that ends them sums the accumulated gradients once. Right also after several backward calls per step:
        # see [Note: one coalesced sum of the replicated gradients] in tensor/replicated_grads.py.
        if plan is not None and self._grad_sync_enabled:
            plan.reduce_replicated_grads()

    @override
    def grad_norm_parts(self, optimizer: Optimizer) -> list[NormPart]:
        # Sharded gradients: each tensor rank holds a disjoint part, summed over the group. Replicated ones are the
        # same on every rank (data-averaged, and summed over the tensor group under sequence parallelism): once.
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        group = self._tensor_group() if self._sharded() else None
        return [NormPart([p.grad for p in params if shard_spec(p) is not None], (group,)),
                NormPart([p.grad for p in params if shard_spec(p) is None])]

    @torch.no_grad()
    def grad_norm(self, norm_type: Union[float, int, str] = 2.0) -> dict[str, torch.Tensor]:
        """What ``lightning.pytorch.utilities.grad_norm(module, norm_type)`` gives in one process: the norm of each
        parameter's whole gradient (``grad_{p}_norm/<name>``) and their total (``grad_{p}_norm_total``), summed over
        the tensor group's shards (Lightning's own reads only this rank's shard). A collective: call it on every
        rank after backward and before the optimizer step, e.g. ``self.log_dict(self.trainer.strategy.grad_norm(2))``
        in ``on_before_optimizer_step`` (gradients are data-averaged by then)."""
        norm_type = float(norm_type)
        if norm_type <= 0:
            raise ValueError(f"`norm_type` must be a positive number or 'inf'; got {norm_type}")
        module = self.lightning_module
        named = [(n, p) for n, p in module.named_parameters() if p.grad is not None]
        if not named:
            return {}
        inf = norm_type == float("inf")
        device = named[0][1].grad.device
        values = torch.zeros(len(named), dtype=torch.float64, device=device)
        sharded = torch.zeros(len(named), dtype=torch.bool, device=device)
        for i, (_, p) in enumerate(named):
            g = p.grad.detach().to(torch.float64)
            values[i] = (g.abs().max() if g.numel() else 0.0) if inf else g.abs().pow(norm_type).sum()
            sharded[i] = shard_spec(p) is not None
        if self._sharded() and bool(sharded.any()):
            part = torch.where(sharded, values, torch.zeros_like(values))
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=self._tensor_group())
            values = torch.where(sharded, part, values)
        per = values if inf else values.pow(1.0 / norm_type)
        norms = {f"grad_{norm_type}_norm/{n}": per[i].float() for i, (n, _) in enumerate(named)}
        norms[f"grad_{norm_type}_norm_total"] = torch.stack(list(norms.values())).norm(norm_type)
        return norms

    # ----- steps: outputs leave as plain tensors ------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(super().training_step(*args, **kwargs))

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(super().validation_step(*args, **kwargs))

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(super().test_step(*args, **kwargs))

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return materialize_logits(super().predict_step(*args, **kwargs))

    # ----- checkpoints: whole tensors, see [Note: the interim checkpoint path of tp1d] ------------------------------

    def _sharded(self) -> bool:
        return self.lightning_module is not None and applied_plan(self.lightning_module) is not None

    def _tensor_group(self) -> Optional[dist.ProcessGroup]:
        # The plan's group, not the mesh's: `trainer.save_checkpoint` after `fit` runs after teardown.
        return applied_plan(self.lightning_module).tg.group

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._sharded():
            return super().lightning_module_state_dict()
        return full_state.full_state_dict(self.lightning_module, self._tensor_group())

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        if not self._sharded():  # restored before setup: the module is still whole
            return super().load_model_state_dict(checkpoint, strict=strict)
        rank = group_rank(self._tensor_group())
        self.lightning_module.load_state_dict(
            full_state.shard_state_dict(self.lightning_module, checkpoint["state_dict"], rank), strict=strict
        )

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if not self._sharded():
            return optimizer.state_dict()
        return full_state.full_optimizer_state(optimizer, self._tensor_group())

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            if self._sharded():
                state = full_state.shard_optimizer_state(optimizer, state, group_rank(self._tensor_group()))
            optimizer.load_state_dict(state)
            _optimizers_to_device([optimizer], self.root_device)

    # ----- teardown: the module whole again -----------------------------------------------------------------------

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # another rank may be gone: no collective in teardown
        plan = self.applied_plan
        if plan is not None:
            plan.tg.weight_grads.clear()
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None and self._sharded_here and applied_plan(module) is not None:
            if self._failed:
                rank_zero_warn("tp1d: training failed; the module is left sharded (its parameters hold this rank's "
                               "shards).")
            else:
                optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
                unparallelize(module, optimizers)
            self._sharded_here = False
        self._restore_after_setup = False
        super().teardown()

def _share_rng_state(group: dist.ProcessGroup, device: torch.device) -> None:
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
