"""ZeRO over the data axis as a component of a Lightning strategy: the engine, and what a strategy does with it at
each point of Lightning's loop. Used by ``zero*`` (ZeRO alone) and ``hybrid`` (ZeRO under a tensor axis or a
pipeline), as ``tensor/axis.py`` is for the tensor axis.

The strategy calls, in Lightning's order: :meth:`build` in ``setup_module``, :meth:`shard_optimizers` after
``setup_optimizers``, :meth:`set_sync` from ``set_grad_sync``, :meth:`forward` / :meth:`evaluate` around each step
(the forward's gather bookkeeping, and at stage 3 freeing what an evaluation step gathered), :meth:`after_step`
after the optimizer step (the compute copies from the updated masters), :meth:`teardown` at the end of fit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Literal, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_par.comm.buckets import broadcast_tensors
from lightning_par.zero.engine import ZeroEngine
from lightning_par.zero.policy import ZeroPolicy
from lightning_par.zero.teardown import whole_module_device
from lightning_par.zero.whole import unshard_optimizer


class ZeroAxis:
    """ZeRO by ``policy``; ``reduce_dtype`` and ``param_init_fn`` are ``zero*``'s (see its docstring); ``who`` names
    the strategy the user chose in messages."""

    def __init__(self, policy: ZeroPolicy, who: str, reduce_dtype: Literal["fp32", "compute"] = "fp32",
                 param_init_fn: Optional[Callable[[nn.Module], None]] = None) -> None:
        if reduce_dtype not in ("fp32", "compute"):
            raise ValueError(f"reduce_dtype must be 'fp32' or 'compute'; got {reduce_dtype!r}.")
        self.policy = policy
        self.who = who
        self.reduce_dtype = reduce_dtype
        self.param_init_fn = param_init_fn
        self.engine: Optional[ZeroEngine] = None

    def build(self, module: nn.Module, group: Any, compute_dtype: torch.dtype, device: torch.device,
              local_ranks: int) -> ZeroEngine:
        """Shard ``module`` over ``group``. The engine agrees on the parameters chunk by chunk (rank 0's values);
        buffers are copied from rank 0 here."""
        if self.engine is not None:
            self.engine.remove_hooks()
        policy = self.policy
        if self.reduce_dtype == "compute":
            policy = replace(policy, reduce_dtype=compute_dtype)
        self.engine = ZeroEngine(module, group, policy, compute_dtype, device, log=rank_zero_info,
                                 local_ranks=local_ranks, param_init_fn=self.param_init_fn)
        broadcast_tensors(list(module.buffers()), group)
        return self.engine

    def shard_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for optimizer in optimizers:
            self.engine.shard_optimizer(optimizer)

    def set_sync(self, enabled: bool) -> None:
        if self.engine is not None:
            self.engine.sync = enabled

    def forward(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.engine is not None:
            self.engine.begin_forward()
        return step(*args, **kwargs)

    def evaluate(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        output = self.forward(step, *args, **kwargs)
        if self.engine is not None and self.policy.stage == 3:
            self.engine.release_all()  # no backward follows to free what the forward gathered
        return output

    def allow_early_host_step(self, allowed: bool) -> None:
        """Whether host chunks may step during backward ([Note: the early host step]): the strategy says so when
        nothing reads or changes the gradients between backward and the step."""
        host_step = self.engine.host_step if self.engine is not None else None
        if host_step is not None:
            host_step.early = allowed and self.policy.step_during_backward and not self.policy.delay_update

    def after_step(self) -> None:
        if self.engine is not None:
            self.engine.refresh_compute()

    def teardown(self, module: Optional[nn.Module], root_device: torch.device, local_ranks: int,
                 optimizers: Optional[list[torch.optim.Optimizer]] = None) -> None:
        """Make the module whole (from the fp32 masters, in its original dtypes) and hook-free, on the device when
        it fits, else on the host. With ``optimizers``, point them back at the module's whole parameters and drop
        the engine; without, keep the engine's master and optimizer shards, so that a checkpoint saved after fit
        still writes them (its gradients are freed)."""
        engine = self.engine
        if engine is None:
            return
        engine.remove_hooks()
        device, reason = whole_module_device(engine, root_device, self.policy.offload is not None, local_ranks)
        rank_zero_info(f"{self.who} teardown: ZeRO's shards are made whole on {device} ({reason}).")
        engine.unshard(device)
        if device != root_device and module is not None:
            module.to(device)  # its buffers too: one device for the whole module
        for optimizer in optimizers or []:
            if optimizer in engine.optimizer_param_names:  # not those of an earlier fit (validate)
                unshard_optimizer(engine, optimizer)
        engine.close()  # files of optimizer state spilled to disk
        if optimizers is not None:
            self.engine = None

    def abandon(self) -> None:
        """After a failed fit: the optimizers hold ZeRO's pieces, another rank may be gone; close without any
        collective."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
