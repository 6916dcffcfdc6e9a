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
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_par.comm.collectives import group_rank
from lightning_par.comm.grad_norm import NormPart
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.data_parallel import DataParallelStrategy
from lightning_par.tensor import full_state
from lightning_par.tensor.axis import TensorAxis
from lightning_par.tensor.layers_1d import shard_spec
from lightning_par.tensor.loss import materialize_logits
from lightning_par.tensor.plan import AppliedPlan, applied_plan
from lightning_par.tensor.styles import ParallelStyle
from lightning_par.topology import Topology
from lightning_par.zero.materialize import has_meta_tensors


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
        self.tensor_axis = TensorAxis(plan=plan, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                                      sequence_chunks=sequence_chunks, vocab_parallel_loss=vocab_parallel_loss,
                                      strict=strict, param_init_fn=param_init_fn, who="tp1d",
                                      owner=type(self).__name__)
        self._restore_after_setup = False  # this run's module was built on the meta device (see the property)
        self._default_sizes: dict[int, int] = {}

    @property
    def plan(self) -> Optional[dict[str, Union[str, ParallelStyle]]]:
        """The plan given to the constructor; None for the automatic plan."""
        return self.tensor_axis.plan

    @property
    def sequence_parallel(self) -> Optional[bool]:
        """``sequence_parallel`` as given to the constructor (None: decided by the plan)."""
        return self.tensor_axis.sequence_parallel

    # ----- topology -----------------------------------------------------------------------------------------------

    @override
    def topology_for(self, world_size: int) -> Topology:
        tensor = self.tensor_size if self.tensor_size is not None else self._default_tensor_size(world_size)
        return Topology.for_world(world_size, tensor=tensor)

    def _default_tensor_size(self, world_size: int) -> int:
        if world_size not in self._default_sizes:
            size = self.tensor_axis.default_size(self.lightning_module, world_size)
            if size is None:
                return world_size  # not cached: the module decides once it is connected
            self._default_sizes[world_size] = size
        return self._default_sizes[world_size]

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
        self.tensor_axis.shard(module, self.group("tensor"), self.topology.tensor, self.root_device)
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

    # ----- gradients ------------------------------------------------------------------------------------------------

    @override
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        super().pre_backward(closure_loss)
        self.tensor_axis.before_backward(self.lightning_module)

    @override
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        module = self.lightning_module
        self.tensor_axis.finish_weight_grads(module)
        super().post_backward(closure_loss)  # the data axis: bucketed average
        # Every backward goes through here (`manual_backward` too); accumulation steps skip the sum, the backward
        # that ends them sums the accumulated gradients once. Right also after several backward calls per step:
        # see [Note: one coalesced sum of the replicated gradients] in tensor/replicated_grads.py.
        if self._grad_sync_enabled:
            self.tensor_axis.sum_replicated_grads(module)

    @override
    def grad_norm_parts(self, optimizer: Optimizer) -> list[NormPart]:
        # Sharded gradients: each tensor rank holds a disjoint part, summed over the group. Replicated ones are the
        # same on every rank (data-averaged, and summed over the tensor group under sequence parallelism): once.
        params = self.precision_plugin.main_params(optimizer)
        return self.tensor_axis.norm_parts(self.lightning_module, [(p, p.grad) for p in params if p.grad is not None])

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
        self.tensor_axis.failed = True  # another rank may be gone: no collective in teardown
        if self.lightning_module is not None:
            self.tensor_axis.clear(self.lightning_module)
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        optimizers = [o._optimizer if isinstance(o, LightningOptimizer) else o for o in self.optimizers]
        self.tensor_axis.unshard(self.lightning_module, optimizers)
        self._restore_after_setup = False
        super().teardown()
