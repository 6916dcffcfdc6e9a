"""Weight gradients computed one layer late, so that each backward collective has a matmul to hide behind.

[Note: deferred weight gradients]
Under sequence parallelism a transformer block's backward runs two collectives per sub-block (attention, MLP): the
row-parallel layer all-gathers its output gradient before it can multiply, and the column-parallel layer
reduce-scatters its input gradient. The reduce-scatter already overlaps the column layer's own weight-gradient
matmul ([Note: overlapping the input-gradient reduction] in ``layers_1d.py``), but nothing was left for the
all-gather to overlap: it ran exposed, 2 per layer. With deferral each layer's weight gradient is computed by the
*next* layer backward reaches, while that layer's collective is on the wire: the row layer launches its all-gather,
computes the weight gradient the previous column layer left, then waits; the column layer launches its
reduce-scatter and computes the row layer's. Every backward collective then has one weight-gradient matmul beside
it (the same pairing Megatron's and torchtitan's schedules aim at), and no extra collective or copy is added.

The gradient reaches ``param.grad`` outside autograd (accumulated as autograd would), so the strategy turns
deferral on only around its own ``backward`` (``active``) and ``flush()``es before anything reads a gradient. A
parameter with post-accumulate-grad hooks (the data-parallel buckets of tp × dp) or tensor hooks is never
deferred: those hooks must see its gradient arrive through autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class DeferredWeightGrads:
    """The weight gradients waiting for the next layer's collective (see the note above)."""

    def __init__(self) -> None:
        self.active = False
        self._pending: list[tuple[nn.Parameter, Callable[[], Tensor]]] = []

    def defer(self, param: nn.Parameter, compute: Callable[[], Tensor]) -> bool:
        """Keep ``compute`` (which returns ``param``'s gradient) for later; False when ``param`` cannot wait."""
        if (not self.active or not param.is_leaf or param._post_accumulate_grad_hooks
                or param._backward_hooks):
            return False  # a view (a transposed weight): autograd takes its gradient back to the parameter
        self._pending.append((param, compute))
        return True

    @torch.no_grad()
    def run(self) -> None:
        """Compute and accumulate every waiting gradient (while a collective is on the wire)."""
        pending, self._pending = self._pending, []
        for param, compute in pending:
            self.accumulate(param, compute())

    @staticmethod
    @torch.no_grad()
    def accumulate(param: nn.Parameter, grad: Tensor) -> None:
        """Add ``grad`` (any float dtype) into ``param.grad`` as autograd's accumulation would."""
        if param.grad is None:
            param.grad = grad.to(param.dtype, memory_format=torch.contiguous_format)
        else:
            param.grad.add_(grad)  # one kernel: the add promotes a bf16 gradient exactly, as a cast would

    def flush(self) -> None:
        """Run what is left and stop deferring: called when the backward is over."""
        self.run()
        self.active = False

    def clear(self) -> None:
        """Drop what is waiting (after an exception in backward)."""
        self._pending = []
        self.active = False
