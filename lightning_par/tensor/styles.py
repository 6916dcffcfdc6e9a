"""The styles a tensor-parallel plan maps module names to (see ``plan.py``), and the error for a size that does not
divide."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "VocabParallel", "ParallelBlock",
           "ParallelAttention", "SequenceParallelRegion", "Replicate", "STYLES", "Plan", "as_style", "divisors",
           "indivisible"]

# ----- styles ---------------------------------------------------------------------------------------------------


class ParallelStyle:
    """What a plan entry asks of one module."""

    name = "?"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class ColwiseParallel(ParallelStyle):
    """``nn.Linear`` -> :class:`ColumnParallelLinear`. ``segments``: a fused output split piece by piece (an int for
    equal pieces, e.g. 3 for q/k/v, or their sizes, e.g. ``(E, kv, kv)`` with grouped-query attention)."""

    segments: Union[int, tuple[int, ...], None] = None
    gather_output: bool = False
    name = "colwise"

    def describe(self) -> str:
        extra = f", segments {self.segments}" if self.segments is not None else ""
        return f"colwise{extra}" + (", gather output" if self.gather_output else "")


@dataclass(frozen=True)
class RowwiseParallel(ParallelStyle):
    """``nn.Linear`` -> :class:`RowParallelLinear`; ``input_is_parallel=False`` splits a whole input first."""

    input_is_parallel: bool = True
    name = "rowwise"


@dataclass(frozen=True)
class VocabParallel(ParallelStyle):
    """``nn.Embedding`` -> :class:`VocabParallelEmbedding`; ``nn.Linear`` (the output layer) ->
    :class:`VocabParallelOutput`. The vocabulary is padded to a multiple of the tensor size, invisibly."""

    name = "vocab"


@dataclass(frozen=True)
class ParallelBlock(ParallelStyle):
    """A module whose column-parallel layers read one input (an attention or MLP block): the input collective runs
    once for all of them, and under sequence parallelism the block's input (its first tensor argument) is
    all-gathered as it enters, so the block's own code sees the whole sequence. ``divide``: integer attributes that
    the block reads as counts or widths of its local part (``n_head``), divided by the tensor size."""

    divide: tuple[str, ...] = ()
    name = "block"

    def describe(self) -> str:
        return "block" + (f", divide {', '.join(self.divide)}" if self.divide else "")


@dataclass(frozen=True)
class ParallelAttention(ParallelStyle):
    """``nn.MultiheadAttention`` -> :class:`ParallelMultiheadAttention` (heads split over the group)."""

    name = "mha"


@dataclass(frozen=True)
class SequenceParallelRegion(ParallelStyle):
    """An ``nn.ModuleList`` / ``nn.Sequential`` of blocks run one after the other: with sequence parallelism the
    activations between its blocks are split along ``seq_dim`` (None: the strategy's ``sequence_dim``), each rank
    holding a block of the tokens in memory order (see [Note: token-sharded sequence parallelism] in
    ``comm/raw_collectives.py``). The blocks must work token by token between their inputs and the attention."""

    seq_dim: Optional[int] = None
    name = "sequence_region"


@dataclass(frozen=True)
class Replicate(ParallelStyle):
    """Leave the module as it is (documents a choice; the same as no entry)."""

    name = "replicate"


STYLES: dict[str, type[ParallelStyle]] = {
    cls.name: cls
    for cls in (ColwiseParallel, RowwiseParallel, VocabParallel, ParallelBlock, ParallelAttention,
                SequenceParallelRegion, Replicate)
}
Plan = Mapping[str, Union[str, ParallelStyle]]


def as_style(value: Union[str, ParallelStyle]) -> ParallelStyle:
    if isinstance(value, ParallelStyle):
        return value
    if isinstance(value, str) and value in STYLES:
        return STYLES[value]()
    raise ValueError(f"Unknown plan style {value!r}; use a style object or one of: {', '.join(STYLES)}.")


# ----- errors -----------------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def indivisible(module_name: str, what: str, value: int, tensor_size: int, works: Optional[list[int]] = None) -> ValueError:
    works = works if works is not None else divisors(value)
    return ValueError(
        f"{module_name or '<root>'}: {what} = {value} cannot be split over tensor size {tensor_size}. "
        f"Tensor sizes that would work: {', '.join(map(str, works))}."
    )
