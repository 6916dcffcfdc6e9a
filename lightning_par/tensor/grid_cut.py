"""How a parameter of a 2D, 2.5D or 3D tensor-parallel layer is cut over its grid: one :class:`GridCut` per
parameter, which everything reads (the layer slicing the whole weights, checkpoint boxes, the gradient norm's groups
and unsharding).

A grid (``comm.summa.Grid2D``, ``comm.cube.Grid3D``) names its axes ("row" / "col"; "x" / "y" / "z") and answers two
questions about each: ``index(axis)``, this rank's coordinate on it, and ``group(axis)``, the ranks that differ from
this one only on it (ordered by that coordinate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Protocol

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from lightning_par.comm.raw_collectives import _all_gather
from lightning_par.pieces import Cuts
from lightning_par.tensor.layers_1d import ShardSpec

_CUT_ATTR = "_lp_grid_cut"


class Grid(Protocol):
    q: int
    axes: tuple[str, ...]

    def index(self, axis: str) -> int: ...

    def group(self, axis: str) -> Optional[ProcessGroup]: ...


@dataclass(frozen=True)
class GridCut:
    """``(spec, axis)`` pairs, innermost first, each cutting by this rank's coordinate on ``axis``. ``spread``:
    ``"grid"`` when the ranks of one grid hold disjoint pieces; ``"shared"`` for a vector cut once (its outermost
    axis) and held alike by every rank with the same coordinate there."""

    cuts: tuple[tuple[ShardSpec, str], ...]
    spread: Literal["grid", "shared"]

    def shard(self, whole: Tensor, grid: Grid) -> Tensor:
        """This rank's piece of the whole tensor."""
        for spec, axis in reversed(self.cuts):
            whole = spec.shard(whole, grid.index(axis))
        return whole

    def unshard(self, local: Tensor, grid: Grid) -> Tensor:
        """The whole tensor from every rank's piece: a collective over the grid."""
        for spec, axis in self.cuts:
            local = spec.unshard(_all_gather(local.contiguous(), spec.dim, grid.group(axis)))
        return local

    def boxes(self, grid: Grid) -> Cuts:
        """The cuts at this rank, for checkpoints (``pieces.Holding``)."""
        return Cuts(tuple((spec, grid.index(axis)) for spec, axis in self.cuts))

    @property
    def shared_axis(self) -> str:
        """For a shared vector: the axis whose group holds its distinct blocks, each once (the gradient norm's)."""
        return self.cuts[-1][1]


def grid_cut(param: Tensor) -> Optional[GridCut]:
    """The :class:`GridCut` of a grid layer's parameter, or None."""
    return getattr(param, _CUT_ATTR, None)


def cut_parameter(shape: tuple[int, ...], cut: GridCut, device, dtype, fill: Optional[float] = None) -> nn.Parameter:
    """A new parameter of the local ``shape`` carrying ``cut`` (uninitialised unless ``fill``: the layer's
    ``from_module`` loads it, or a norm's ones and zeros)."""
    p = nn.Parameter(torch.empty(shape, device=device, dtype=dtype) if fill is None
                     else torch.full(shape, fill, device=device, dtype=dtype))
    setattr(p, _CUT_ATTR, cut)
    return p


def load_piece(param: nn.Parameter, whole: Tensor, grid: Grid) -> None:
    """Fill ``param`` with this rank's piece of ``whole``."""
    with torch.no_grad():
        param.copy_(grid_cut(param).shard(whole.detach(), grid))


def padded(n: int, q: int) -> int:
    return -(-n // q) * q
