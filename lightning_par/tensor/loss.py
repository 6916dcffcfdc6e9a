"""Vocabulary-parallel cross-entropy, and the logits tensor that lets the user's own ``F.cross_entropy`` use it.

[Note: the loss without gathering the logits]
The output layer leaves each rank with ``[..., V/t]`` logits. The user's ``training_step`` is unchanged, typically
``F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))``. The output layer therefore returns
a :class:`VocabParallelLogits`: this rank's shard, presenting the full shape ``[..., V]`` (``size``, ``shape``,
``numel``, ``len``). Shape and dtype operations that keep the vocabulary as the last dim (``reshape``, ``view``,
``flatten`` of leading dims, ``float``, ``to(dtype)``, ``contiguous``) stay on the shard, and ``F.cross_entropy``
runs :func:`vocab_parallel_cross_entropy`: one all-reduce (max) and one all-reduce (sum) of a few numbers per token,
the full logits never exist anywhere. Any other use (softmax, argmax, indexing, printing, ...) gathers the full,
unpadded logits once (an autograd-aware all-gather) and from then on the tensor behaves as that full tensor, so
every result is what the single-process model would compute. Padding rows of the vocabulary never reach a
softmax: the loss reads only the real columns and the gather drops the padding.

The gather is a collective: like the model's forward, it must run on every rank of the tensor group. The strategy
gathers any such tensor a step returns, so callbacks and ``predict`` outputs receive plain tensors.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils._pytree import tree_map

from lightning_par.comm.collectives import gather_along_dim, group_rank, group_size, reduce_from_group


def _all_reduce(x: Tensor, op: dist.ReduceOp, group: Optional[ProcessGroup]) -> Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, start: int, vocab: int, group: Optional[ProcessGroup],
                ignore_index: int, smoothing: float) -> Tensor:
        width = logits.size(-1)
        valid = max(0, min(width, vocab - start))  # real (not padding) columns on this rank
        x = logits[:, :valid].float()
        n = x.size(0)
        row_max = x.max(dim=-1).values if valid else x.new_full((n,), -math.inf)
        _all_reduce(row_max, dist.ReduceOp.MAX, group)
        x = x - row_max.unsqueeze(-1)
        mine = (target >= start) & (target < start + valid)
        index = (target - start).clamp(0, max(valid - 1, 0))
        picked = x.gather(1, index.unsqueeze(-1)).squeeze(-1) if valid else x.new_zeros(n)
        stats = [picked.masked_fill(~mine, 0.0)]
        if smoothing:
            stats.append(x.sum(dim=-1))
        exp = x.exp_()  # x is our own temporary: the exponentials take its place (one [N, V/t] fp32 buffer, not two)
        stats = _all_reduce(torch.stack([exp.sum(dim=-1), *stats]), dist.ReduceOp.SUM, group)
        log_z = stats[0].log()
        loss = log_z - stats[1]
        if smoothing:  # torch: (1 - e) * nll + e * mean over classes of -log p
            loss = (1.0 - smoothing) * loss + smoothing * (log_z - stats[2] / vocab)
        keep = target != ignore_index
        loss = loss.masked_fill(~keep, 0.0)
        probs = exp.div_(stats[0].unsqueeze(-1))
        ctx.save_for_backward(probs, index, mine, keep)
        ctx.used = False
        ctx.width, ctx.vocab, ctx.smoothing, ctx.dtype = width, vocab, smoothing, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.used:
            raise RuntimeError("Backward ran twice through the vocabulary-parallel cross-entropy (retain_graph=True): "
                               "its first backward turned the saved probabilities into the gradient, in place. "
                               "Compute the loss again for a second backward.")
        ctx.used = True
        probs, index, mine, keep = ctx.saved_tensors
        g = probs  # in place, as Megatron does: no copy of the [N, V/t] fp32 probabilities
        if g.size(-1):
            g.scatter_add_(1, index.unsqueeze(-1), -(1.0 - ctx.smoothing) * mine.to(g.dtype).unsqueeze(-1))
        if ctx.smoothing:
            g -= ctx.smoothing / ctx.vocab
        g *= (grad * keep).unsqueeze(-1)
        if ctx.width > g.size(-1):
            g = F.pad(g, (0, ctx.width - g.size(-1)))  # padding columns get zero gradient
        return g.to(ctx.dtype), None, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, *, vocab_start: int, vocab_size: int,
                                 group: Optional[ProcessGroup], ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy`` on logits split by vocabulary: ``logits`` ``[N, V_local]`` holds columns
    ``vocab_start ...`` of the ``vocab_size`` classes (columns past ``vocab_size`` are padding and ignored),
    ``target`` ``[N]`` holds class indices. Every rank of ``group`` calls it and gets the same loss."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'sum', 'none'")
    loss = _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group, ignore_index,
                                            float(label_smoothing))
    loss = loss.to(logits.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


# ----- the logits tensor ----------------------------------------------------------------------------------------

_METADATA = {
    torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
    torch.Tensor.layout.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.dim, torch.Tensor.ndim.__get__,
    torch.Tensor.is_floating_point, torch.Tensor.element_size, torch.Tensor.get_device,
}
_CASTS = {torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.contiguous,
          torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.detach}
_RESHAPES = {torch.Tensor.reshape, torch.Tensor.view, torch.reshape}


class VocabParallelLogits(torch.Tensor):
    """This rank's ``[..., V_local]`` logits, presenting the full ``[..., V]`` shape (see the note above).

    Under 2D tensor parallelism the samples are split too: ``token_group`` (the grid's column) holds the other
    blocks of the leading dim, this rank the contiguous block ``group_rank(token_group)`` of it."""

    _local: Tensor
    _group: Optional[ProcessGroup]
    _vocab: int
    _start: int
    _full: Optional[Tensor]
    _token_group: Optional[ProcessGroup]

    @staticmethod
    def wrap(local: Tensor, group: Optional[ProcessGroup], vocab: int, start: int,
             token_group: Optional[ProcessGroup] = None) -> "VocabParallelLogits":
        out = local.as_subclass(VocabParallelLogits)
        out._local, out._group, out._vocab, out._start, out._full = local, group, vocab, start, None
        out._token_group = token_group
        return out

    def _rewrap(self, local: Tensor) -> "VocabParallelLogits":
        return VocabParallelLogits.wrap(local, self._group, self._vocab, self._start, self._token_group)

    @property
    def _token_blocks(self) -> int:
        return group_size(self._token_group) if self._token_group is not None else 1  # (None: no split, not WORLD)

    def full_shape(self) -> torch.Size:
        lead = self._local.shape[:-1]
        if lead and self._token_blocks > 1:
            lead = (lead[0] * self._token_blocks, *lead[1:])
        return torch.Size((*lead, self._vocab))

    def materialize(self) -> Tensor:
        """The full, unpadded logits as a plain tensor (gathered once, then reused)."""
        if self._full is None:
            full = gather_along_dim(self._local, -1, self._group)[..., : self._vocab]
            self._full = gather_along_dim(full, 0, self._token_group) if self._token_blocks > 1 else full
        return self._full

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], VocabParallelLogits) else None
        if self is not None and self._full is None:
            result = _local_op(self, func, args[1:], kwargs)
            if result is not NotImplemented:
                return result
        if func is F.cross_entropy and isinstance(args[0], VocabParallelLogits) and args[0]._full is None:
            result = _cross_entropy(*args, **kwargs)
            if result is not NotImplemented:
                return result

        def plain(x: Any) -> Any:
            return x.materialize() if isinstance(x, VocabParallelLogits) else x

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


def _local_op(self: VocabParallelLogits, func, rest: tuple, kwargs: dict) -> Any:
    """Answer ``func`` from the shard when the result does not need the other ranks' columns."""
    local = self._local
    full = self.full_shape()
    if func is torch.Tensor.size:
        return full if not rest and not kwargs else full[(rest or (kwargs["dim"],))[0]]
    if func == torch.Tensor.shape.__get__:
        return full
    if func is torch.Tensor.numel:
        return math.prod(full)
    if func is torch.Tensor.__len__:
        return full[0]
    if func in _METADATA:
        return func(local, *rest, **kwargs)
    if func in _CASTS:
        out = func(local, *rest, **kwargs)
        if out.device != local.device:
            return NotImplemented  # moving the shard alone would leave the group behind
        return self._rewrap(out)
    if func in _RESHAPES:
        shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        shape = kwargs.get("shape", shape)
        target = _resolve_shape(tuple(shape), math.prod(full))
        if target is None or target[-1] != full[-1] or math.prod(target[:-1]) != math.prod(full[:-1]):
            return NotImplemented
        blocks = self._token_blocks
        if blocks > 1 and (len(target) < 2 or target[0] % blocks):
            return NotImplemented  # the samples' blocks must stay whole along the leading dim
        lead = (target[0] // blocks, *target[1:-1]) if blocks > 1 else target[:-1]
        return self._rewrap(func(local, (*lead, local.size(-1))))
    if func is torch.Tensor.flatten:
        start = rest[0] if rest else kwargs.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kwargs.get("end_dim", -1)
        if end % local.dim() == local.dim() - 1:
            return NotImplemented
        return self._rewrap(local.flatten(start, end))
    return NotImplemented


def _resolve_shape(shape: tuple, numel: int) -> Optional[tuple[int, ...]]:
    if not all(isinstance(s, int) for s in shape) or list(shape).count(-1) > 1:
        return None
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known == 0 or numel % known:
            return None
        shape = tuple(numel // known if s == -1 else s for s in shape)
    return shape if math.prod(shape) == numel else None


def _cross_entropy(input: VocabParallelLogits, target: Tensor, weight: Optional[Tensor] = None,
                   size_average: Any = None, ignore_index: int = -100, reduce: Any = None, reduction: str = "mean",
                   label_smoothing: float = 0.0) -> Any:
    if (input._local.dim() != 2 or weight is not None or size_average is not None or reduce is not None
            or isinstance(target, VocabParallelLogits) or target.is_floating_point()):
        return NotImplemented  # class weights, probabilities as targets, [N, C, d...] layouts: gather instead
    blocks = input._token_blocks
    if blocks == 1:
        return vocab_parallel_cross_entropy(input._local, target, vocab_start=input._start, vocab_size=input._vocab,
                                            group=input._group, ignore_index=ignore_index, reduction=reduction,
                                            label_smoothing=label_smoothing)
    # 2D: this rank's samples only; the sums over the others come from the token group (the grid's column).
    if target.dim() != 1 or target.shape[0] != input._local.shape[0] * blocks:
        return NotImplemented
    tokens = target.chunk(blocks)[group_rank(input._token_group)]
    loss = vocab_parallel_cross_entropy(input._local, tokens, vocab_start=input._start, vocab_size=input._vocab,
                                        group=input._group, ignore_index=ignore_index, reduction="none",
                                        label_smoothing=label_smoothing)
    if reduction == "none":
        return gather_along_dim(loss, 0, input._token_group)
    total = reduce_from_group(loss.sum(), input._token_group)  # the same on every rank: backward is the identity
    if reduction == "sum":
        return total
    count = (tokens != ignore_index).sum()
    _all_reduce(count, dist.ReduceOp.SUM, input._token_group)
    return total / count


def materialize_logits(output: Any) -> Any:
    """Replace every :class:`VocabParallelLogits` in a step's output by its full tensor."""
    return tree_map(lambda x: x.materialize() if isinstance(x, VocabParallelLogits) else x, output)
