"""ZeRO settings as small frozen dataclasses, read like FSDP2's policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

Stage = Literal[1, 2, 3]

# Optimizers whose update of an element depends only on that element's gradient and state: they give the same
# result on any flat piece of a parameter as on the whole parameter. Others (LBFGS's line search, Adafactor's
# factored second moments, SparseAdam) see whole tensors and cannot run on shards.
ELEMENTWISE_OPTIMIZERS = (
    "SGD", "Adam", "AdamW", "Adamax", "Adagrad", "Adadelta", "RMSprop", "Rprop", "NAdam", "RAdam", "ASGD",
)


def check_optimizer(optimizer: torch.optim.Optimizer, allow_untested: bool = False) -> None:
    """Accept the element-wise ``torch.optim`` optimizers and their subclasses (a subclass that changes the update
    must stay element-wise: that is the user's to keep), and any optimizer when ``allow_untested``."""
    known = tuple(getattr(torch.optim, name) for name in ELEMENTWISE_OPTIMIZERS)
    if allow_untested or isinstance(optimizer, known):
        return
    kind = type(optimizer).__name__
    raise TypeError(
        f"ZeRO cannot shard the optimizer {kind}: each rank holds flat pieces of the parameters, so only an "
        "element-wise optimizer (each element's update depends on that element's gradient and state alone) gives "
        f"the same result. Known element-wise: torch.optim.{', '.join(ELEMENTWISE_OPTIMIZERS)} and their subclasses: "
        f"derive {kind} from one of them, or, if {kind} is element-wise (no whole-tensor norms, factored moments or "
        "line searches), declare it with ZeroStrategy(allow_untested_optimizer=True)."
    )


@dataclass(frozen=True)
class ZeroPolicy:
    """What is sharded and how chunks are cut.

    stage: 1 shards optimizer state; 2 also gradients; 3 also parameters at rest.
    chunk_numel: elements per chunk (the unit of communication); larger chunks mean fewer, longer collectives.
    allow_oversize: a parameter larger than a chunk gets its own chunk instead of an error.
    reduce_dtype: gradients are reduced in this dtype (fp32 keeps half-precision gradients from losing bits).
    reshard_after_forward: stage 3 frees a chunk once its modules ran forward and gathers it again for backward;
        False keeps it gathered until its gradients are reduced (more memory, one gather fewer per step).
    prefetch: stage 3 starts gathering the next chunk while the current one computes.
    offload: where each chunk's optimizer side (fp32 master, gradient shard, optimizer state, and the optimizer step
        over them) lives. None: on the device. A fraction in [0, 1]: that share of the chunks (the last ones) in pinned
        host memory, the rest on the device; 1.0 is ZeRO-Offload. "auto": measure one step and keep on the device as
        much as fits, the rest on the host (see ``zero/placement.py``).
    device_memory_limit: bytes of device memory "auto" may plan with (default: what the device has free).
    host_memory_limit: bytes of host memory this rank may fill (default: the host's available memory shared by its
        ranks); a plan that needs more is an error before anything is allocated.
    nvme_dir: a directory (on a local NVMe disk) where the optimizer state of host chunks that do not fit in host
        memory lives between steps (ZeRO-Infinity); None keeps everything in memory.
    allow_untested_optimizer: accept an optimizer that is neither one of ``ELEMENTWISE_OPTIMIZERS`` nor a subclass
        of one (the user declares it element-wise, as DeepSpeed's ``zero_allow_untested_optimizer``).
    delay_update: ZeRO-Offload's delayed parameter update: the host chunks' optimizer step of step k runs in the
        background during step k + 1's forward and backward (see [Note: the delayed host step] in
        ``zero/host_step.py``); their parameters lag one more update. Off by default.
    step_during_backward: with offload, each host chunk's optimizer step starts on a worker thread as soon as its
        gradient is on the host, while backward goes on (exact; only where nothing touches the gradients before the
        step: see [Note: the early host step] in ``zero/host_step.py``). Off by default: little gain measured.
    host_grads: the dtype of the gradient shards of host chunks. "fp32" (exact); "compute" keeps them in the bf16
        compute dtype: half the host memory and the copies, cast to fp32 chunk by chunk for the step. Exact at world
        size 1 without accumulation (autograd's gradients are bf16 already); else the reduced sum is rounded to bf16.
    """

    stage: Stage = 2
    chunk_numel: int = 32 * 2**20
    allow_oversize: bool = True
    reduce_dtype: torch.dtype = torch.float32
    reshard_after_forward: bool = True
    prefetch: bool = True
    offload: Union[None, float, Literal["auto"]] = None
    device_memory_limit: Optional[int] = None
    host_memory_limit: Optional[int] = None
    nvme_dir: Optional[str] = None
    host_grads: Literal["fp32", "compute"] = "fp32"
    allow_untested_optimizer: bool = False
    delay_update: bool = False
    step_during_backward: bool = False

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage must be 1, 2 or 3; got {self.stage!r}.")
        if self.chunk_numel < 1:
            raise ValueError(f"chunk_numel must be positive; got {self.chunk_numel}.")
        if self.offload is not None and self.offload != "auto":
            if isinstance(self.offload, bool) or not isinstance(self.offload, (int, float)) or not 0 <= self.offload <= 1:
                raise ValueError(f"offload must be None, 'auto' or a fraction in [0, 1]; got {self.offload!r}.")
        if self.host_grads not in ("fp32", "compute"):
            raise ValueError(f"host_grads must be 'fp32' or 'compute'; got {self.host_grads!r}.")
        if self.delay_update and self.offload is None:
            raise ValueError("delay_update overlaps the host chunks' optimizer step with the next forward and "
                             "backward; without offload there is no host chunk. Set offload (for example 1.0 or "
                             "'auto'), or leave delay_update off.")
        if self.delay_update and (self.nvme_dir is not None or self.host_grads != "fp32"):
            raise ValueError("delay_update is built for host chunks in memory with fp32 gradients; it does not "
                             "combine with nvme_dir or host_grads='compute' yet.")
