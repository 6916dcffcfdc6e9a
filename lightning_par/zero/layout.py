"""Chunk layout: parameters packed, in execution order, into fixed-size flat chunks sharded evenly over ranks.

Pure arithmetic, no tensors or processes: unit-testable, and shared by the engine and by checkpoint resharding.

Worked example: params of 6, 4 and 5 elements, ``chunk_numel=10``, 2 ranks::

    chunk 0: a[0:6] b[6:10]        numel 10, padded 10, shard 5: rank 0 owns [0, 5), rank 1 owns [5, 10)
    chunk 1: c[0:5]                numel 5,  padded 6,  shard 3: rank 0 owns [0, 3), rank 1 owns [3, 6)

    rank 1's pieces: a flat [5:6] (chunk 0 at 5), b flat [0:4] (chunk 0 at 6), c flat [3:5] (chunk 1 at 3)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives: ``chunk``, its ``offset`` in the chunk, its ``numel``."""

    name: str
    chunk: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Piece:
    """The part of parameter ``name`` that one rank owns: flat range [start, stop) of the parameter, found at
    ``shard_offset`` in that rank's shard of ``chunk``."""

    name: str
    chunk: int
    start: int
    stop: int
    shard_offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ChunkLayout:
    slots: tuple[Slot, ...]
    chunk_numels: tuple[int, ...]
    world_size: int

    def padded_numel(self, chunk: int) -> int:
        return self.shard_numel(chunk) * self.world_size

    def shard_numel(self, chunk: int) -> int:
        return -(-self.chunk_numels[chunk] // self.world_size)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_numels)

    def slots_in(self, chunk: int) -> list[Slot]:
        return [s for s in self.slots if s.chunk == chunk]

    def pieces(self, rank: int) -> list[Piece]:
        """The pieces of every parameter that ``rank`` owns, in slot order."""
        out = []
        for s in self.slots:
            shard = self.shard_numel(s.chunk)
            lo, hi = rank * shard, (rank + 1) * shard
            start, stop = max(s.offset, lo), min(s.offset + s.numel, hi)
            if start < stop:
                out.append(Piece(s.name, s.chunk, start - s.offset, stop - s.offset, start - lo))
        return out


def build_layout(named_numels: list[tuple[str, int]], chunk_numel: int, world_size: int,
                 allow_oversize: bool = True) -> ChunkLayout:
    """Pack parameters greedily, in the given order, into chunks of at most ``chunk_numel`` elements.

    A parameter larger than ``chunk_numel`` gets a chunk of its own when ``allow_oversize``; otherwise it is an
    error naming the parameter and the chunk size that would fit.
    """
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel must be positive; got {chunk_numel}.")
    if world_size < 1:
        raise ValueError(f"world_size must be positive; got {world_size}.")
    largest = max((numel for _, numel in named_numels), default=0)
    if largest > chunk_numel and not allow_oversize:
        name = next(n for n, numel in named_numels if numel == largest)
        raise ValueError(
            f"Parameter '{name}' has {largest} elements, more than chunk_numel={chunk_numel}, and oversized chunks "
            f"are not allowed. Use chunk_numel >= {largest} or allow_oversize=True."
        )
    slots: list[Slot] = []
    numels: list[int] = []
    for name, numel in named_numels:
        if not numels or numels[-1] + numel > chunk_numel and numels[-1] > 0:
            numels.append(0)
        slots.append(Slot(name, len(numels) - 1, numels[-1], numel))
        numels[-1] += numel
    return ChunkLayout(tuple(slots), tuple(numels), world_size)
