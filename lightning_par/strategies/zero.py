"""ZeRO stages 1, 2 and 3 as a Lightning strategy, on the chunk engine (``strategy="zero1" | "zero2" | "zero3"``):
the ZeRO form of the data axis (``zero/axis.py``) alone, as a preset of the composed strategy."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Literal, Optional, Union

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from torch import Tensor

from lightning_par.strategies.base import StartMethod
from lightning_par.strategies.composed import ComposedStrategy, argument
from lightning_par.zero.axis import ZeroAxis
from lightning_par.zero.engine import ZeroEngine
from lightning_par.zero.policy import ZeroPolicy


class ZeroStrategy(ComposedStrategy):
    """ZeRO data parallelism: optimizer state (stage 1), gradients (2) and parameters (3) sharded over the ranks.

    Mixed precision is ZeRO's: the model computes in bf16 (``bf16-mixed`` / ``bf16-true``) or fp16 (``16-mixed``,
    with dynamic loss scaling whose overflow check spans all ranks), while fp32 master weights, gradients and
    optimizer state live in the shards. Any element-wise ``torch.optim`` optimizer works, with its parameter groups
    and learning-rate schedulers. Checkpoints are directories of shards that load at another world size.

    Args:
        stage: 1, 2 or 3.
        chunk_size: elements per chunk, the unit of communication and sharding. Default: 128 Mi elements (fewer,
            longer collectives: on 4 x H100 zero3 went from 40.5k to 43.1k tokens/s at 6.7B and from 192k to 195k at
            1.3B against 32 Mi), or 32 Mi when offloading (a finer split between host and device memory).
        allow_oversize: a parameter larger than ``chunk_size`` gets a chunk of its own (else an error).
        reshard_after_forward: stage 3 frees chunks after forward and gathers them again in backward.
        prefetch: stage 3 gathers the next chunk while the current one computes.
        offload: where each chunk's fp32 master, gradient shard, optimizer state and optimizer step live. None: on
            the device. A fraction in [0, 1]: that share of the chunks in pinned host memory (1.0 is ZeRO-Offload,
            registered as ``zero2_offload``). ``"auto"``: measure the first step and keep on the device as much as
            fits beside its working memory, the rest on the host (registered as ``zero3_offload``; the plan is
            logged). Adam/AdamW step on the host with torch's fused CPU kernel.
        device_memory_limit: bytes of device memory ``"auto"`` may fill (default: what the device has free).
        host_memory_limit: bytes of host memory this rank may fill (default: the host's available memory shared by
            its ranks); a plan that needs more is an error before anything is allocated.
        nvme_dir: a directory on a local NVMe disk: the optimizer state of host chunks that do not fit in host
            memory lives there in files between steps, read and written asynchronously around the step of each
            chunk (ZeRO-Infinity; registered as ``zero3_nvme`` with the system's temporary directory). The files are
            removed when fit ends, and those of crashed runs on this host when the next run starts.
        host_grads: ``"fp32"`` keeps the gradient shards of host chunks in fp32 (exact); ``"compute"`` keeps them
            in the bf16 compute dtype (half the host memory and copies; each chunk is cast to fp32 for its step),
            exact at world size 1 without accumulation, else the reduced gradient is rounded to bf16.
        delay_update: with ``offload``, ZeRO-Offload's delayed parameter update: the host chunks' optimizer step of
            step k runs on a worker thread while step k + 1's forward and backward run, so a step costs the larger
            of the two instead of their sum. The host chunks' parameters then lag one more update: forward k reads
            them as updated through step k - 2 (chunks on the device are not delayed). Off by default; it changes
            the training trajectory (see ``docs/offload.md``). Checkpoints and the module after fit hold every
            update. One optimizer, in-memory host state, fp32 host gradients.
        step_during_backward: with ``offload``, start each host chunk's optimizer step on a worker thread as soon as
            its gradient is on the host, while backward goes on: the same update, sooner. Used only where nothing reads
            or changes the gradients between backward and the step (no clipping, loss scaler, accumulation, manual
            optimization, ``on_after_backward``, ``on_before_optimizer_step`` or ``configure_gradient_clipping`` of
            your own); elsewhere the step runs as without it. Off by default: on an H100 it gained 2% at 1.3 B
            (docs/offload.md).
        param_init_fn: initialises a module built on the meta device (stage 3 with
            ``Trainer.init_module(empty_init=True)`` or ``configure_model``): called with each module that owns meta
            tensors once they have (uninitialised) storage on the device, it fills that module's own parameters and
            buffers in place. Default: the model's own ``_init_weights(module)`` (Hugging Face models, the demo
            GPT), else the module's ``reset_parameters()``; a module left uninitialised is an error.
        reduce_dtype: ``"fp32"`` (default) reduces gradients in fp32, so half-precision gradients lose no bits in the
            sum; ``"compute"`` reduces them in the compute dtype (bf16 under ``bf16-mixed``): half the bytes of every
            reduce-scatter, as Lightning's ``fsdp`` does under ``bf16-mixed``, at the cost of rounding the sum.
        allow_untested_optimizer: accept an optimizer that is not one of torch's element-wise optimizers nor a
            subclass of one, declaring it element-wise (as DeepSpeed's ``zero_allow_untested_optimizer``).
        weights_only: how a checkpoint is opened when ``fit`` resumes from it. ``None`` (default): with
            ``weights_only=True`` (tensors and plain containers only, nothing in the file can run), unless the
            ``weights_only`` that Lightning passes says otherwise. Lightning 2.6 does not pass ``Trainer.fit(...,
            weights_only=False)`` on to a strategy that restores after setup, as ZeRO does, so to open a checkpoint
            you trust that holds other objects, pass ``weights_only=False`` here.

    Reading parameters: at stage 3 a parameter's values exist only inside the forward and backward of the module
    that owns it; read them elsewhere inside ``with strategy.full_params():`` (see ``full_params``). The gradient
    norm is ``strategy.grad_norm(norm_type)``, not Lightning's ``grad_norm(module)``.
    """

    def __init__(
        self,
        stage: Literal[1, 2, 3] = 2,
        chunk_size: Optional[int] = None,
        allow_oversize: bool = True,
        reshard_after_forward: bool = True,
        prefetch: bool = True,
        offload: Union[float, Literal["auto"], None] = None,
        device_memory_limit: Optional[int] = None,
        host_memory_limit: Optional[int] = None,
        nvme_dir: Optional[str] = None,
        host_grads: Literal["fp32", "compute"] = "fp32",
        delay_update: bool = False,
        step_during_backward: bool = False,
        param_init_fn: Optional[Callable[[torch.nn.Module], None]] = None,
        allow_untested_optimizer: bool = False,
        reduce_dtype: Literal["fp32", "compute"] = "fp32",
        weights_only: Optional[bool] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: StartMethod = "popen",
    ) -> None:
        if chunk_size is None:
            chunk_size = (32 if offload is not None else 128) * 2**20
        policy = ZeroPolicy(stage=stage, chunk_numel=chunk_size, allow_oversize=allow_oversize,
                            reshard_after_forward=reshard_after_forward, prefetch=prefetch, offload=offload,
                            device_memory_limit=device_memory_limit, host_memory_limit=host_memory_limit,
                            nvme_dir=nvme_dir, host_grads=host_grads, allow_untested_optimizer=allow_untested_optimizer,
                            delay_update=delay_update, step_during_backward=step_during_backward)
        super().__init__(zero=ZeroAxis(policy, who="ZeRO", reduce_dtype=reduce_dtype, param_init_fn=param_init_fn),
                         weights_only=weights_only, process_group_backend=process_group_backend, timeout=timeout,
                         start_method=start_method)

    policy = argument("zero", "policy")  # stage, chunk size, offload, ... (``zero/policy.py``)
    reduce_dtype = argument("zero", "reduce_dtype")
    param_init_fn = argument("zero", "param_init_fn")

    @property
    def engine(self) -> ZeroEngine:
        if self.zero.engine is None:
            raise RuntimeError(f"{type(self).__name__}.engine exists once `Trainer.fit` has set up the model.")
        return self.zero.engine

    def grad_norm(self, norm_type: Union[float, int, str] = 2.0) -> dict[str, Tensor]:
        """What ``lightning.pytorch.utilities.grad_norm(module, norm_type)`` gives under ``dp``: the norm of each
        parameter's whole gradient (``grad_{p}_norm/<name>``) and their total (``grad_{p}_norm_total``), from the
        shards on every rank. Lightning's ``grad_norm`` reads ``param.grad``, which ZeRO does not fill (stages 2-3)
        or fills with this rank's unreduced gradient (stage 1). Call it on every rank after backward, before the
        optimizer step: ``self.log_dict(self.trainer.strategy.grad_norm(2))`` in ``on_before_optimizer_step``."""
        return self.engine.grad_norm(float(norm_type))

    @contextmanager
    def full_params(self, writeback: bool = False) -> Generator[None, None, None]:
        """Every parameter of the module whole and readable inside, like FSDP's ``summon_full_params``: a
        collective, entered on every rank outside forward and backward (in ``training_step`` before or after the
        forward, in callbacks). ``writeback=True`` writes the values changed inside into the fp32 masters on exit
        (make the same changes on every rank). At stage 3 the whole model is held on the device in the compute
        dtype while inside; at stages 1-2 parameters are always readable and this only matters for writing."""
        with self.engine.full_params(writeback=writeback):
            yield

    def memory_report(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, gradients and optimizer state (see ``ZeroEngine.memory_report``)."""
        return self.engine.memory_report(self.optimizers)
