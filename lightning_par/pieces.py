"""Where a rank's tensors sit in the global tensors of a checkpoint: boxes, for every axis alike.

[Note: pieces of global tensors]
A checkpoint stores each global tensor (a parameter under its single-process name, or that parameter's optimizer
state) as boxes: (offsets, sizes) in the global tensor's shape, each saved as its own tensor. Every axis says which
boxes it holds, through one :class:`Holding` per tensor a rank keeps:

- a whole tensor (``dp``, a pipeline stage, a replicated parameter): one box, the whole shape;
- a tensor-parallel shard (:class:`~lightning_par.tensor.layers_1d.ShardSpec`): one box per segment along the split
  dim (a fused q/k/v weight gives three), the vocabulary's zero padding left out;
- a ZeRO piece, a flat range [start, stop) of the (tensor-local) parameter: the range in row-major order is at most
  two partial rows and a block of whole rows, recursively, so ``2 * ndim - 1`` boxes at most (:func:`flat_boxes`),
  each then mapped through the tensor shard as above.

A loading rank intersects the boxes it needs with the saved ones (:func:`intersection`), whatever topology wrote
them. Everything here is pure (no process group).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_par.tensor.layers_1d import ShardSpec

Shape = tuple[int, ...]


def box_key(name: str, offsets: Shape, sizes: Shape) -> str:
    """The checkpoint key of one box: ``name|o0,o1+s0,s1`` (``name|+`` for a 0-d tensor)."""
    return f"{name}|{','.join(map(str, offsets))}+{','.join(map(str, sizes))}"


def parse_box_key(key: str) -> tuple[str, Shape, Shape]:
    name, box = key.rsplit("|", 1)
    offsets, sizes = box.split("+")
    return name, _ints(offsets), _ints(sizes)


def _ints(text: str) -> Shape:
    return tuple(int(x) for x in text.split(",")) if text else ()


def flat_boxes(shape: Shape, start: int, stop: int) -> list[tuple[Shape, Shape, int]]:
    """Elements [start, stop) of a row-major tensor of ``shape`` as boxes ``(offsets, sizes, position)``; each box is
    contiguous in that order and begins ``position`` elements after ``start``."""
    if start >= stop:
        return []
    if not shape:
        return [((), (), 0)]
    inner = prod(shape[1:])
    out: list[tuple[Shape, Shape, int]] = []
    pos = start

    def row_part(row: int, lo: int, hi: int) -> None:  # elements [lo, hi) of one row, recursively
        for o, s, f in flat_boxes(shape[1:], lo, hi):
            out.append(((row, *o), (1, *s), pos - start + f))

    if pos % inner:  # a partial first row
        row = pos // inner
        end = min(stop, (row + 1) * inner)
        row_part(row, pos - row * inner, end - row * inner)
        pos = end
    rows = (stop - pos) // inner
    if rows:  # whole rows
        out.append(((pos // inner, *(0,) * (len(shape) - 1)), (rows, *shape[1:]), pos - start))
        pos += rows * inner
    if pos < stop:  # a partial last row
        row = pos // inner
        row_part(row, 0, stop - row * inner)
    return out


def shard_boxes(spec: "ShardSpec", rank: int, offsets: Shape, sizes: Shape) -> list[tuple[Shape, Shape, Shape]]:
    """A box of tensor rank ``rank``'s shard as ``(local offsets, sizes, global offsets)`` parts: one per segment
    of the split dim it touches, the zero padding of a padded segment left out."""
    d = spec.dim
    out = []
    local_start = full_start = 0
    for n, m in zip(spec.segments, spec.local_segments):
        real = max(0, min(m, n - rank * m))  # this rank's elements of the segment that are not padding
        lo, hi = max(offsets[d], local_start), min(offsets[d] + sizes[d], local_start + real)
        if lo < hi:
            local = list(offsets)
            local[d] = lo
            size = list(sizes)
            size[d] = hi - lo
            glob = list(local)
            glob[d] = full_start + rank * m + (lo - local_start)
            out.append((tuple(local), tuple(size), tuple(glob)))
        local_start += m
        full_start += n
    return out


def intersection(a_offsets: Shape, a_sizes: Shape, b_offsets: Shape, b_sizes: Shape) -> Optional[tuple[Shape, Shape]]:
    """The common box of two boxes, or None."""
    lo = tuple(max(a, b) for a, b in zip(a_offsets, b_offsets))
    hi = tuple(min(a + s, b + t) for a, s, b, t in zip(a_offsets, a_sizes, b_offsets, b_sizes))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l for l, h in zip(lo, hi))


def sub_box(view: Tensor, view_offsets: Shape, offsets: Shape, sizes: Shape) -> Tensor:
    """The part of ``view`` (a box at ``view_offsets``) that is the box ``(offsets, sizes)``."""
    for d, (o, vo, s) in enumerate(zip(offsets, view_offsets, sizes)):
        view = view.narrow(d, o - vo, s)
    return view


@dataclass(frozen=True)
class Cuts:
    """A tensor cut along several dims, or along one dim twice (2D tensor parallelism: rows and columns of a grid):
    ``(spec, rank)`` pairs, innermost first; each maps the tensor it is given (local first) to the one before the
    cut. A ``Holding`` with ``Cuts`` as its spec ignores its own ``rank``."""

    cuts: tuple[tuple["ShardSpec", int], ...]

    def full_shape(self, local_shape: torch.Size) -> Shape:
        shape = tuple(local_shape)
        for spec, _ in self.cuts:
            shape = spec.full_shape(torch.Size(shape))
        return shape


@dataclass(frozen=True)
class Holding:
    """One tensor a rank keeps of the global tensor ``name``: the parameter's tensor-local values (shape ``shape``,
    cut by ``spec`` at tensor rank ``rank``, or whole), or with ``span`` the flat range [start, stop) of them that
    ZeRO keeps, as a 1-d tensor."""

    name: str
    shape: Shape
    spec: Optional[Union["ShardSpec", Cuts]] = None
    rank: int = 0
    span: Optional[tuple[int, int]] = None

    @property
    def global_shape(self) -> Shape:
        return self.spec.full_shape(torch.Size(self.shape)) if self.spec is not None else self.shape

    @property
    def local_shape(self) -> Shape:
        return (self.span[1] - self.span[0],) if self.span is not None else self.shape

    def boxes(self, local: Tensor) -> list[tuple[Shape, Tensor]]:
        """``local`` (this holding's values, or where loaded values go) as (global offsets, view) boxes."""
        if self.span is None:
            parts = [((0,) * len(self.shape), self.shape, local)]
        else:
            parts = [(o, s, local[f : f + prod(s)].view(s)) for o, s, f in flat_boxes(self.shape, *self.span)]
        if self.spec is None:
            return [(o, v) for o, _, v in parts]
        cuts = self.spec.cuts if isinstance(self.spec, Cuts) else ((self.spec, self.rank),)
        for spec, rank in cuts:  # local offsets -> the offsets before each cut, one cut at a time
            parts = [(glob, size, sub_box(view, o, lo, size))
                     for o, s, view in parts for lo, size, glob in shard_boxes(spec, rank, o, s)]
        return [(o, v) for o, _, v in parts]
