"""1D tensor-parallel layers (Megatron-LM): column- and row-parallel Linear, vocabulary-parallel Embedding and output.

Each layer holds this rank's shard of the weights of the module it replaces, under the same parameter names
(``weight``, ``bias``), so a state dict keeps its keys; only the shapes are local. A sharded parameter carries its
:class:`ShardSpec` (``shard_spec(p)``), which says how the full tensor is cut and put back together: checkpoints,
clipping and tests read it.

[Note: where the input collective happens]
A column-parallel layer needs its input on every rank of the tensor group: identity forward and all-reduce of the
gradient backward (``copy_to_group``), or, under sequence parallelism, an all-gather along the sequence (reduce-scatter
backward). Layers that read the same input (q, k and v projections of one attention block, gate and up of a gated
MLP) share one :class:`InputOp`, which runs the collective once per input tensor, so a block costs one collective
whatever its number of column layers (Megatron's formula). A row-parallel layer ends the pair: all-reduce forward,
or reduce-scatter along the sequence under sequence parallelism, and adds its (replicated) bias after the reduction.

[Note: collectives in the autocast dtype]
Under ``torch.autocast`` (bf16-mixed) a Linear computes in bf16 whatever its input's dtype, so the input is cast to
the autocast dtype *before* the input collective: the forward all-gather (sequence parallel) and the backward
all-reduce / reduce-scatter then carry bf16, half the bytes of fp32. The row-parallel output is a bf16 matmul
output already, reduced in place (it is a temporary: no copy). The gradient flowing back into the fp32 activations
is cast up after the reduction, as autocast's own cast would do. Without autocast nothing changes (fp32 parity).

[Note: overlapping the input-gradient reduction]
Column layers run ``column_linear`` (``linear_fns.py``), which computes in the autocast dtype and, when its input
comes from an input collective (:func:`~lightning_par.comm.collectives.gather_input`, or the all-gather a block's
hook runs under sequence parallelism), hands its input gradient to that collective's deferred reduction instead of
to autograd.
Its backward computes the input gradient first; the last layer reading the collective's output launches the one
all-reduce (reduce-scatter) of the summed input gradients asynchronously, then computes its weight and bias
gradients while it runs (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``); the collective's own
backward node waits. See [Note: the deferred input-gradient reduction] in ``collectives.py``. With one column
layer per block input (the demo GPT's fused q/k/v, an MLP's first Linear, the output layer) its whole weight
gradient overlaps; with several (separate q/k/v, gate/up) the last one's does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_par.comm.collectives import (
    gather_along_dim,
    gather_input,
    group_rank,
    group_size,
    reduce_from_group_,
    split_along_dim,
)
from lightning_par.tensor.deferred_grads import DeferredWeightGrads
from lightning_par.tensor.linear_fns import column_linear, row_linear_scatter, to_compute_dtype

_SPEC_ATTR = "_tensor_parallel_spec"


# ----- how a parameter is cut ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """How one tensor dim is split over ``tensor_size`` ranks.

    ``segments`` are the full sizes of the pieces along ``dim`` that are split independently: ``(E, E, E)`` for a
    fused q/k/v weight gives every rank its own heads of q, of k and of v (local layout ``[q_r; k_r; v_r]``), so
    the module's own ``chunk(3)`` still finds them. With ``pad``, each segment is padded with zeros up to a multiple
    of ``tensor_size`` (vocabularies).
    """

    dim: int
    segments: tuple[int, ...]
    tensor_size: int
    pad: bool = False

    def padded(self, n: int) -> int:
        t = self.tensor_size
        return -(-n // t) * t if self.pad else n

    @property
    def local_segments(self) -> tuple[int, ...]:
        return tuple(self.padded(n) // self.tensor_size for n in self.segments)

    @property
    def local_size(self) -> int:
        return sum(self.local_segments)

    @property
    def full_size(self) -> int:
        return sum(self.segments)

    def check(self) -> None:
        if not self.pad:
            bad = [n for n in self.segments if n % self.tensor_size]
            if bad:
                raise ValueError(f"size {bad[0]} along dim {self.dim} is not divisible by tensor size {self.tensor_size}")

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.full_size
        return tuple(shape)

    def shard(self, full: Tensor, rank: int) -> Tensor:
        """This rank's piece of ``full`` (a new contiguous tensor)."""
        self.check()
        if full.size(self.dim) != self.full_size:
            raise ValueError(f"expected size {self.full_size} along dim {self.dim}, got shape {tuple(full.shape)}")
        pieces = []
        for n, piece, m in zip(self.segments, full.split(list(self.segments), self.dim), self.local_segments):
            if self.padded(n) > n:
                pad_shape = list(piece.shape)
                pad_shape[self.dim] = self.padded(n) - n
                piece = torch.cat([piece, piece.new_zeros(pad_shape)], self.dim)
            pieces.append(piece.narrow(self.dim, rank * m, m))
        return torch.cat(pieces, self.dim).clone(memory_format=torch.contiguous_format)

    def unshard(self, gathered: Tensor) -> Tensor:
        """The full tensor from the ranks' pieces concatenated along ``dim`` in rank order (padding dropped)."""
        per_rank = [r.split(list(self.local_segments), self.dim) for r in gathered.split(self.local_size, self.dim)]
        out = [
            torch.cat([pieces[i] for pieces in per_rank], self.dim).narrow(self.dim, 0, n)
            for i, n in enumerate(self.segments)
        ]
        return torch.cat(out, self.dim) if len(out) > 1 else out[0]


def shard_spec(param: Tensor) -> Optional[ShardSpec]:
    """The :class:`ShardSpec` of a tensor-parallel parameter, or None for a replicated one."""
    return getattr(param, _SPEC_ATTR, None)


def make_shard(param: nn.Parameter, spec: ShardSpec, rank: int) -> nn.Parameter:
    shard = nn.Parameter(spec.shard(param.detach(), rank), requires_grad=param.requires_grad)
    setattr(shard, _SPEC_ATTR, spec)
    return shard


# A hook for the plan: shards a parameter once, so tied parameters stay one Parameter (see plan.py).
ShardFn = Callable[[nn.Parameter, ShardSpec], nn.Parameter]


# ----- the process group, shared and rebindable -------------------------------------------------------------------


class TensorGroup:
    """The tensor-parallel group that all layers of one sharded model read; rebound when a new ``fit`` builds new
    process groups (``bind``). ``token_chunks``: the chunks of the sequence-parallel token layout (see [Note:
    token-sharded sequence parallelism] in ``raw_collectives.py``), which every sequence-parallel site of the model
    must share; more than 1 lets the row-parallel layers overlap their collectives with their matmuls."""

    def __init__(self, group: Optional[ProcessGroup], token_chunks: int = 1) -> None:
        if token_chunks < 1:
            raise ValueError(f"token_chunks must be at least 1, got {token_chunks}")
        self.token_chunks = token_chunks
        self.weight_grads = DeferredWeightGrads()  # see [Note: deferred weight gradients]
        self.bind(group)

    def bind(self, group: Optional[ProcessGroup]) -> None:
        self.group = group
        self.size = group_size(group)
        self.rank = group_rank(group)

    def __deepcopy__(self, memo: dict) -> "TensorGroup":
        return self  # a copied layer (EMA, SWA) lives in the same process group


def _as_tensor_group(group: Union[ProcessGroup, TensorGroup, None]) -> TensorGroup:
    return group if isinstance(group, TensorGroup) else TensorGroup(group)


class InputOp:
    """Makes a column layer's input whole on every rank: ``copy_to_group`` (``seq_dim=None``) or an all-gather along
    ``seq_dim`` of the ranks' token blocks (see [Note: token-sharded sequence parallelism] in ``raw_collectives.py``).
    Several layers may share one: the collective then runs once per distinct input tensor, until ``clear()``
    (called when the owning block's forward ends)."""

    def __init__(self, tg: TensorGroup, seq_dim: Optional[int] = None) -> None:
        self.tg, self.seq_dim = tg, seq_dim
        self._key: Optional[Tensor] = None
        self._value: Optional[Tensor] = None

    def __call__(self, x: Tensor) -> Tensor:
        if x is self._key:
            return self._value  # type: ignore[return-value]
        # Cast first: the collectives then carry the autocast dtype (see [Note: collectives in the autocast dtype]).
        y = gather_input(to_compute_dtype(x), self.tg.group, self.seq_dim, chunks=self.tg.token_chunks)
        self._key, self._value = x, y
        return y

    def clear(self) -> None:
        self._key = self._value = None


def _prepare_input(tg: TensorGroup, input_op: Optional[InputOp], x: Tensor) -> Tensor:
    return input_op(x) if input_op is not None and tg.size > 1 else x


def shard_fn(tg: TensorGroup, shard: Optional[ShardFn]) -> ShardFn:
    return shard or (lambda p, s: make_shard(p, s, tg.rank))


# ----- layers ---------------------------------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2 and relatives): a Linear whose weight is stored
    transposed, ``(in_features, out_features)`` = ``(nx, nf)``. Recognised without importing transformers."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def linear_dims(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """``(in_features, out_features, transposed)`` of an ``nn.Linear`` or a Hugging Face ``Conv1D``; None else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module) and tuple(module.weight.shape) == (module.nx, module.nf):
        return module.nx, module.nf, True
    return None


class _ParallelLinear(nn.Module):
    """``transposed``: the weight is stored ``(in, out)`` as Hugging Face's ``Conv1D`` stores it (the state dict
    keeps that layout, so a checkpoint loads into the original model); the layer multiplies by its transpose."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter],
                 group: Union[ProcessGroup, TensorGroup, None], transposed: bool = False) -> None:
        super().__init__()
        self.tg = _as_tensor_group(group)
        self.weight = weight
        self.bias = bias
        self.transposed = transposed
        self.in_features = weight.size(0 if transposed else 1)
        self.out_features = weight.size(1 if transposed else 0)

    def _matrix(self) -> Tensor:
        """The weight as ``F.linear`` takes it, ``(out, in)``."""
        return self.weight.t() if self.transposed else self.weight


class ColumnParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with ``A`` split by rows (output features): each rank computes its slice of ``y``.

    ``out_features`` is the local width (what the code calling the layer sees); ``segments`` splits a fused output
    (q/k/v, gate/up) piece by piece. ``input_op`` makes the input whole first (None: the caller did already);
    ``gather_output`` all-gathers the output back to full width.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group: Union[ProcessGroup, TensorGroup, None],
                 input_op: Union[InputOp, None, Literal["own"]] = "own", gather_output: bool = False,
                 seq_dim: Optional[int] = None, transposed: bool = False) -> None:
        super().__init__(weight, bias, group, transposed)
        # "own": a private copy_to_group (all-gather along ``seq_dim`` if given), released after every call; a shared
        # InputOp is released by its block; None: the input is whole already.
        self._owns_input_op = input_op == "own"
        self.input_op = InputOp(self.tg, seq_dim) if input_op == "own" else input_op
        self.gather_output = gather_output

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Union[ProcessGroup, TensorGroup, None],
                    segments: Union[int, tuple[int, ...], None] = None,
                    input_op: Union[InputOp, None, Literal["own"]] = "own", gather_output: bool = False,
                    seq_dim: Optional[int] = None, shard: Optional[ShardFn] = None) -> "ColumnParallelLinear":
        tg = _as_tensor_group(group)
        _, out_features, transposed = _dims(linear)
        pieces = output_segments(out_features, segments)
        shard = shard_fn(tg, shard)
        bias = shard(linear.bias, ShardSpec(0, pieces, tg.size)) if linear.bias is not None else None
        weight = shard(linear.weight, ShardSpec(1 if transposed else 0, pieces, tg.size))
        return cls(weight, bias, tg, input_op, gather_output, seq_dim, transposed)

    def forward(self, x: Tensor) -> Tensor:
        if self.tg.size == 1:
            return F.linear(x, self._matrix(), self.bias)
        x = _prepare_input(self.tg, self.input_op, x)
        if self._owns_input_op:
            self.input_op.clear()
        y = column_linear(x, self._matrix(), self.bias, self.tg.weight_grads)
        if self.gather_output and self.tg.size > 1:
            spec = shard_spec(self.weight)
            y = gather_along_dim(y, -1, self.tg.group)
            if spec is not None and len(spec.segments) > 1:
                y = ShardSpec(y.dim() - 1, spec.segments, spec.tensor_size).unshard(y)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (local), tensor={self.tg.size}"


class RowParallelLinear(_ParallelLinear):
    """``y = x A^T + b`` with ``A`` split by columns (input features): each rank multiplies its slice of ``x`` and
    the partial products are summed (all-reduce), or summed and scattered along ``seq_dim`` (sequence parallel, in
    token blocks: [Note: token-sharded sequence parallelism] in ``raw_collectives.py``).
    The bias is added once, after the reduction. ``in_features`` is the local width."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], group: Union[ProcessGroup, TensorGroup, None],
                 seq_dim: Optional[int] = None, input_is_parallel: bool = True, transposed: bool = False) -> None:
        super().__init__(weight, bias, group, transposed)
        self.seq_dim = seq_dim
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Union[ProcessGroup, TensorGroup, None], seq_dim: Optional[int] = None,
                    input_is_parallel: bool = True, shard: Optional[ShardFn] = None) -> "RowParallelLinear":
        tg = _as_tensor_group(group)
        shard = shard_fn(tg, shard)
        in_features, _, transposed = _dims(linear)
        weight = shard(linear.weight, ShardSpec(0 if transposed else 1, (in_features,), tg.size))
        return cls(weight, linear.bias, tg, seq_dim, input_is_parallel, transposed)

    def forward(self, x: Tensor) -> Tensor:
        g = self.tg.group
        if self.tg.size == 1:
            return F.linear(x, self._matrix(), self.bias)
        if not self.input_is_parallel:
            x = split_along_dim(x, -1, g)
        if self.seq_dim is None:
            y = F.linear(x, self._matrix())  # a fresh temporary (bf16 under autocast): reduced in place, no copy
            y = reduce_from_group_(y, g)
        else:
            y = row_linear_scatter(x, self.weight, self.transposed, self.seq_dim, self.tg)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        mode = "all-reduce" if self.seq_dim is None else f"reduce-scatter(dim {self.seq_dim})"
        return f"in_features={self.in_features} (local), out_features={self.out_features}, {mode}, tensor={self.tg.size}"


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by rows (tokens), padded to a multiple of the tensor size.

    Each rank looks up the tokens it owns, zeros the others, and an all-reduce sums the ranks' rows: every rank ends
    with the full embeddings. ``num_embeddings`` is the real (unpadded) vocabulary."""

    def __init__(self, weight: nn.Parameter, num_embeddings: int, group: Union[ProcessGroup, TensorGroup, None],
                 padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.tg = _as_tensor_group(group)
        self.weight = weight
        self.num_embeddings = num_embeddings
        self.embedding_dim = weight.size(1)
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, group: Union[ProcessGroup, TensorGroup, None],
                       shard: Optional[ShardFn] = None) -> "VocabParallelEmbedding":
        tg = _as_tensor_group(group)
        shard = shard_fn(tg, shard)
        spec = ShardSpec(0, (embedding.num_embeddings,), tg.size, pad=True)
        return cls(shard(embedding.weight, spec), embedding.num_embeddings, tg, embedding.padding_idx)

    @property
    def vocab_start(self) -> int:
        return self.tg.rank * self.weight.size(0)

    def forward(self, ids: Tensor) -> Tensor:
        if self.tg.size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        start, rows = self.vocab_start, self.weight.size(0)
        outside = (ids < start) | (ids >= start + rows)
        local_ids = (ids - start).masked_fill(outside, 0)
        pad = self.padding_idx
        local_pad = pad - start if pad is not None and start <= pad < start + rows else None
        out = F.embedding(local_ids, self.weight, local_pad)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group_(out, self.tg.group)  # `out` is a temporary: in place

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local rows={self.weight.size(0)}, tensor={self.tg.size}"


class VocabParallelOutput(_ParallelLinear):
    """The output layer (``hidden -> vocabulary``) split by vocabulary, padded like the embedding it may be tied to.

    It returns this rank's logits wrapped as :class:`~lightning_par.tensor.loss.VocabParallelLogits`, which looks
    like the full ``[..., vocab]`` tensor to the user's code: ``F.cross_entropy`` on it runs the vocabulary-parallel
    loss and never gathers the logits; any other use gathers them once. With ``vocab_parallel_loss=False`` it
    returns the gathered logits (a plain tensor). ``out_features`` is the real vocabulary."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], vocab_size: int,
                 group: Union[ProcessGroup, TensorGroup, None], input_op: Optional[InputOp] = None,
                 vocab_parallel_loss: bool = True) -> None:
        super().__init__(weight, bias, group)
        self.out_features = vocab_size
        self.input_op = input_op if input_op is not None else InputOp(self.tg)  # SP: the head's input is whole
        self.vocab_parallel_loss = vocab_parallel_loss

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Union[ProcessGroup, TensorGroup, None],
                    vocab_parallel_loss: bool = True, shard: Optional[ShardFn] = None) -> "VocabParallelOutput":
        tg = _as_tensor_group(group)
        shard = shard_fn(tg, shard)
        spec = ShardSpec(0, (linear.out_features,), tg.size, pad=True)
        bias = shard(linear.bias, spec) if linear.bias is not None else None
        return cls(shard(linear.weight, spec), bias, linear.out_features, tg, vocab_parallel_loss=vocab_parallel_loss)

    def forward(self, x: Tensor) -> Tensor:
        from lightning_par.tensor.loss import VocabParallelLogits

        if self.tg.size == 1:
            return F.linear(x, self.weight, self.bias)
        x = self.input_op(x)
        self.input_op.clear()  # nothing else shares it; do not keep the activation alive
        # Its input gradient's all-reduce overlaps a weight-gradient matmul (see column_linear).
        local = column_linear(x, self.weight, self.bias, self.tg.weight_grads)
        start = self.tg.rank * self.weight.size(0)
        if self.vocab_parallel_loss:
            return VocabParallelLogits.wrap(local, self.tg.group, self.out_features, start)
        return gather_along_dim(local, -1, self.tg.group)[..., : self.out_features]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, vocab={self.out_features}, local rows={self.weight.size(0)}, "
                f"tensor={self.tg.size}, vocab_parallel_loss={self.vocab_parallel_loss}")


def _dims(module: nn.Module) -> tuple[int, int, bool]:
    dims = linear_dims(module)
    if dims is None:
        raise TypeError(f"expected an nn.Linear or a Hugging Face Conv1D, got {type(module).__name__}")
    return dims


def output_segments(size: int, segments: Union[int, tuple[int, ...], None]) -> tuple[int, ...]:
    if segments is None:
        return (size,)
    if isinstance(segments, int):
        if size % segments:
            raise ValueError(f"{size} output features cannot be cut into {segments} equal segments")
        return (size // segments,) * segments
    if sum(segments) != size:
        raise ValueError(f"segments {tuple(segments)} do not add up to the {size} output features")
    return tuple(segments)

