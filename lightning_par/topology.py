"""Parallel degrees, validated against the world size, and the one DeviceMesh built from them.

Naming (after torchtitan): an *axis* is a mesh axis ("data", "pipeline", "tensor", ...), a *dim* is a tensor
dimension. Ranks are laid out row-major over the axes ``data, pipeline, <tensor axes>``, so tensor ranks are
innermost: the ranks of one tensor group are contiguous and, on a multi-GPU host, share the fastest links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TensorMode = Literal["1d", "2d", "2.5d", "3d"]
TENSOR_MODES: tuple[str, ...] = ("1d", "2d", "2.5d", "3d")


def _integer_root(value: int, power: int) -> int | None:
    """The integer ``q`` with ``q**power == value``, or None."""
    root = round(value ** (1.0 / power))
    for candidate in (root - 1, root, root + 1):
        if candidate >= 1 and candidate**power == value:
            return candidate
    return None


def tensor_axes(mode: str, tensor: int, depth: int = 1) -> tuple[tuple[str, int], ...]:
    """The mesh axes (name, size) that a tensor group of ``tensor`` ranks is split into for ``mode``.

    1D keeps one axis; 2D (SUMMA) a q x q grid; 2.5D (Tesseract) ``depth`` stacked q x q grids; 3D a q x q x q cube.
    Raises ValueError, naming the sizes that would work, when ``tensor`` does not have the mode's shape.
    """
    if mode == "1d":
        return (("tensor", tensor),)
    if mode == "2d":
        q = _integer_root(tensor, 2)
        if q is None:
            raise ValueError(
                f"Tensor mode '2d' needs a square number of tensor ranks (q*q: 1, 4, 9, 16, ...); got tensor={tensor}."
            )
        return (("tensor_row", q), ("tensor_col", q))
    if mode == "2.5d":
        if depth < 1 or tensor % depth:
            raise ValueError(
                f"Tensor mode '2.5d' needs tensor = depth*q*q; depth={depth} does not divide tensor={tensor}."
            )
        q = _integer_root(tensor // depth, 2)
        if q is None:
            raise ValueError(
                f"Tensor mode '2.5d' needs tensor = depth*q*q; tensor={tensor} with depth={depth} leaves "
                f"{tensor // depth}, which is not a square. With depth={depth}, tensor could be "
                f"{', '.join(str(depth * k * k) for k in range(1, 5))}."
            )
        return (("tensor_depth", depth), ("tensor_row", q), ("tensor_col", q))
    if mode == "3d":
        q = _integer_root(tensor, 3)
        if q is None:
            raise ValueError(
                f"Tensor mode '3d' needs a cube number of tensor ranks (q*q*q: 1, 8, 27, 64, ...); got tensor={tensor}."
            )
        return (("tensor_x", q), ("tensor_y", q), ("tensor_z", q))
    raise ValueError(f"Unknown tensor mode {mode!r}; choose one of {', '.join(TENSOR_MODES)}.")


def rank_groups(axis_sizes: dict[str, int], axes: str | tuple[str, ...]) -> list[list[int]]:
    """All process groups along ``axes`` of a row-major rank grid: a pure function, no processes needed.

    ``axis_sizes`` is ordered outermost to innermost. A group holds the ranks that differ only in the named axes;
    with several axes the group is their flattening (row-major in the order of ``axis_sizes``).

    Worked example, ``{"data": 2, "pipeline": 1, "tensor": 4}`` (8 ranks)::

        rank_groups(sizes, "tensor") == [[0, 1, 2, 3], [4, 5, 6, 7]]   # contiguous: tensor is innermost
        rank_groups(sizes, "data")   == [[0, 4], [1, 5], [2, 6], [3, 7]]

    and with 2D tensor axes ``{"data": 1, "pipeline": 1, "tensor_row": 2, "tensor_col": 2}``::

        rank_groups(sizes, "tensor_col") == [[0, 1], [2, 3]]   # ranks of one row, across columns
        rank_groups(sizes, "tensor_row") == [[0, 2], [1, 3]]
    """
    if isinstance(axes, str):
        axes = (axes,)
    names = list(axis_sizes)
    unknown = [axis for axis in axes if axis not in axis_sizes]
    if unknown:
        raise KeyError(f"Unknown axis {unknown}; the grid has axes {names}.")
    grid = torch.arange(math.prod(axis_sizes.values())).reshape(tuple(axis_sizes.values()))
    group_axes = [names.index(axis) for axis in names if axis in axes]  # keep grid order
    other_axes = [i for i in range(len(names)) if i not in group_axes]
    group_size = math.prod(axis_sizes[names[i]] for i in group_axes)
    groups = grid.permute(*other_axes, *group_axes).reshape(-1, group_size)
    return groups.tolist()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Topology:
    """Degrees of parallelism. ``data * pipeline * tensor`` must equal the world size.

    ``tensor_mode`` chooses how the tensor ranks are arranged (1d line, 2d square, 2.5d stacked squares of
    ``depth``, 3d cube). ``validate(world_size)`` says in words what is wrong before any collective runs.
    """

    data: int = 1
    pipeline: int = 1
    tensor: int = 1
    tensor_mode: TensorMode = "1d"
    depth: int = 1

    def __post_init__(self) -> None:
        for name in ("data", "pipeline", "tensor", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Topology.{name} must be a positive integer; got {value!r}.")
        if self.tensor_mode not in TENSOR_MODES:
            raise ValueError(f"Unknown tensor_mode {self.tensor_mode!r}; choose one of {', '.join(TENSOR_MODES)}.")
        if self.depth != 1 and self.tensor_mode != "2.5d":
            raise ValueError(f"depth={self.depth} only applies to tensor_mode '2.5d'; got '{self.tensor_mode}'.")
        tensor_axes(self.tensor_mode, self.tensor, self.depth)  # raises with the sizes that would work

    @property
    def world_size(self) -> int:
        return self.data * self.pipeline * self.tensor

    @property
    def data_enabled(self) -> bool:
        return self.data > 1

    @property
    def pipeline_enabled(self) -> bool:
        return self.pipeline > 1

    @property
    def tensor_enabled(self) -> bool:
        return self.tensor > 1

    def validate(self, world_size: int) -> None:
        """Raise ValueError unless the degrees multiply to ``world_size``, listing every degree and what would fit."""
        if self.world_size == world_size:
            return
        hint = ""
        if world_size % (self.pipeline * self.tensor) == 0:
            hint = f" With pipeline={self.pipeline}, tensor={self.tensor}, data={world_size // (self.pipeline * self.tensor)} would fit."
        else:
            hint = f" Degrees must divide the world size; its divisors are {_divisors(world_size)}."
        raise ValueError(
            f"Topology data={self.data} x pipeline={self.pipeline} x tensor={self.tensor} = {self.world_size} ranks, "
            f"but the world size is {world_size}.{hint}"
        )

    def axis_sizes(self) -> dict[str, int]:
        """Mesh axes outermost to innermost, with their sizes."""
        return {"data": self.data, "pipeline": self.pipeline, **dict(tensor_axes(self.tensor_mode, self.tensor, self.depth))}

    def groups(self, axes: str | tuple[str, ...]) -> list[list[int]]:
        """Rank groups along ``axes``; ``"tensor"`` names the whole tensor group in every mode."""
        if axes == "tensor":
            axes = tuple(name for name, _ in tensor_axes(self.tensor_mode, self.tensor, self.depth))
        return rank_groups(self.axis_sizes(), axes)

    def coordinates(self, rank: int) -> dict[str, int]:
        """The position of ``rank`` on every axis."""
        coords = {}
        for name, size in reversed(self.axis_sizes().items()):
            coords[name] = rank % size
            rank //= size
        return dict(reversed(coords.items()))

    def build_mesh(self, device_type: str):
        """One DeviceMesh over all ranks; for 2D/2.5D/3D also a flattened "tensor" axis over the tensor sub-axes.

        Needs an initialised default process group whose world size matches (call ``validate`` first).
        """
        from torch.distributed.device_mesh import init_device_mesh

        sizes = self.axis_sizes()
        mesh = init_device_mesh(device_type, tuple(sizes.values()), mesh_dim_names=tuple(sizes))
        sub_axes = tuple(name for name in sizes if name.startswith("tensor_"))
        if sub_axes:
            # DeviceMesh has no public flatten in torch 2.11; `_flatten` registers the combined axis on the root
            # mesh so that `mesh["tensor"]` works like any other axis.
            mesh[sub_axes]._flatten("tensor")
        if self.tensor_mode == "2.5d":
            # 2.5D's layer (one q x q grid) and stack (a column across every layer), see comm/summa.Grid2D.
            mesh[("tensor_row", "tensor_col")]._flatten("tensor_layer")
            mesh[("tensor_depth", "tensor_row")]._flatten("tensor_stack")
        if self.tensor_mode == "3d":
            # The cube's two planes (comm/cube.Grid3D): the samples of layout "z" and of layout "y".
            mesh[("tensor_x", "tensor_y")]._flatten("tensor_xy")
            mesh[("tensor_x", "tensor_z")]._flatten("tensor_xz")
        return mesh

    @classmethod
    def for_world(cls, world_size: int, *, pipeline: int = 1, tensor: int = 1, tensor_mode: TensorMode = "1d",
                  depth: int = 1) -> "Topology":
        """The topology that gives every rank not used by pipeline and tensor to data parallel."""
        if world_size % (pipeline * tensor):
            raise ValueError(
                f"pipeline={pipeline} x tensor={tensor} = {pipeline * tensor} does not divide the world size "
                f"{world_size}; its divisors are {_divisors(world_size)}."
            )
        return cls(world_size // (pipeline * tensor), pipeline, tensor, tensor_mode, depth)
