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

import torch
from torch import Tensor, nn


class DeferredWeightGrads:
    """The weight gradients waiting for the next layer's collective (see the note above), each as the two factors
    of its matmul, so that :meth:`accumulate` can add it to ``.grad`` inside the matmul."""

    def __init__(self) -> None:
        self.active = False
        self._pending: list[tuple[nn.Parameter, Tensor, Tensor]] = []

    def defer(self, param: nn.Parameter, a: Tensor, b: Tensor) -> bool:
        """Keep ``param``'s gradient ``a @ b`` for later; False when ``param`` cannot wait."""
        if (not self.active or not param.is_leaf or param._post_accumulate_grad_hooks
                or param._backward_hooks):
            return False  # a view (a transposed weight): autograd takes its gradient back to the parameter
        self._pending.append((param, a, b))
        return True

    def run(self) -> None:
        """Compute and accumulate every waiting gradient (while a collective is on the wire)."""
        pending, self._pending = self._pending, []
        for param, a, b in pending:
            self.accumulate(param, a, b)

    @staticmethod
    @torch.no_grad()
    def accumulate(param: nn.Parameter, a: Tensor, b: Tensor) -> None:
        """``param.grad += a @ b`` as autograd's accumulation would, but in one matmul where the dtypes allow:
        a bf16 product accumulates into an fp32 ``.grad`` in the matmul's fp32 epilogue (Megatron's gradient
        accumulation fusion), instead of a bf16 result, a cast and an add (18 bytes of memory traffic per element
        against 8)."""
        grad = param.grad
        if grad is None:
            param.grad = _mm_as(a, b, param.dtype)
        elif grad.dtype == a.dtype and grad.is_contiguous():
            grad.addmm_(a, b)
        elif a.is_cuda and grad.dtype == torch.float32 and grad.is_contiguous():
            torch.addmm(grad, a, b, out_dtype=torch.float32, out=grad)
        else:
            grad.add_(a.mm(b))  # the add promotes a bf16 product exactly, as a cast would

    def flush(self) -> None:
        """Run what is left and stop deferring: called when the backward is over."""
        self.run()
        self.active = False

    def clear(self) -> None:
        """Drop what is waiting (after an exception in backward)."""
        self._pending = []
        self.active = False


def _mm_as(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` as a new contiguous tensor of ``dtype`` (bf16 inputs straight to fp32 on CUDA)."""
    if a.dtype != dtype and a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.mm(b).to(dtype, memory_format=torch.contiguous_format)
