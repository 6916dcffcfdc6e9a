"""1D tensor parallelism (Megatron-LM), with optional sequence parallelism, on top of data parallelism: the tensor
axis (``tensor/axis.py``) and the data axis, as a preset of the composed strategy (``hybrid`` with no pipeline and
no ZeRO), under its own name and arguments."""

from __future__ import annotations

from datetime import timedelta
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

from lightning_par.comm.data_axis import DataAxis
from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy, argument
from lightning_par.tensor.axis import TensorAxis
from lightning_par.tensor.layers_1d import shard_spec
from lightning_par.tensor.plan import AppliedPlan, applied_plan
from lightning_par.tensor.styles import ParallelStyle


class TensorParallel1DStrategy(ComposedStrategy):
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
        weights_only: how a checkpoint is opened when ``fit`` resumes from it, as for ``hybrid``.
        bucket_size_mb, process_group_backend, timeout, start_method: as for ``dp``.

    Precision: ``32-true``, ``bf16-mixed``, ``bf16-true``. ``16-mixed`` is refused: its loss scaler decides per rank,
    from the shards that rank holds, whether to skip a step, and the ranks of a tensor group would drift apart.

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
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        tensor = TensorAxis(plan=plan, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim,
                            sequence_chunks=sequence_chunks, vocab_parallel_loss=vocab_parallel_loss, strict=strict,
                            param_init_fn=param_init_fn, who="tp1d", owner=type(self).__name__)
        super().__init__(data=DataAxis(bucket_size_mb), tensor=tensor, tensor_size=tensor_size,
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)

    plan = argument("tensor_axis", "plan")  # None: the automatic plan
    sequence_parallel = argument("tensor_axis", "sequence_parallel")  # None: decided by the plan
    sequence_dim = argument("tensor_axis", "sequence_dim")
    sequence_chunks = argument("tensor_axis", "sequence_chunks")
    vocab_parallel_loss = argument("tensor_axis", "vocab_parallel_loss")
    strict = argument("tensor_axis", "strict")
    param_init_fn = argument("tensor_axis", "param_init_fn")
    bucket_size_mb = argument("data_axis", "bucket_size_mb")

    @property
    def applied_plan(self) -> Optional[AppliedPlan]:
        """What the plan did to the module (after ``setup``): entries, notes and the tensor group."""
        return applied_plan(self.lightning_module) if self.lightning_module is not None else None

    def _tensor_group(self) -> Optional[dist.ProcessGroup]:
        plan = applied_plan(self.lightning_module)
        return plan.tg.group if plan is not None else None

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
        if applied_plan(module) is not None and bool(sharded.any()):
            part = torch.where(sharded, values, torch.zeros_like(values))
            dist.all_reduce(part, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=self._tensor_group())
            values = torch.where(sharded, part, values)
        per = values if inf else values.pow(1.0 / norm_type)
        norms = {f"grad_{norm_type}_norm/{n}": per[i].float() for i, (n, _) in enumerate(named)}
        norms[f"grad_{norm_type}_norm_total"] = torch.stack(list(norms.values())).norm(norm_type)
        return norms
