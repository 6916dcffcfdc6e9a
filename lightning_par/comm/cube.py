"""The q x q x q cube of 3D tensor parallelism ("Maximizing Parallelism in Distributed Training for Huge Neural
Networks", Bian et al.; Colossal-AI's 3D), and its linear product.

[Note: the 3D cube]
Rank (x, y, z) sits at coordinate x, y, z of a q x q x q cube. An activation [tokens, hidden] (tokens: whole
samples, the batch dim) is held in one of two layouts, named by the axis its hidden dim is cut along:
- layout "y": samples in block ``x * q + z`` of q^2, hidden block ``y`` of q (the hidden stream: embeddings, norms,
  residuals, every row-parallel output);
- layout "z": samples in block ``x * q + y``, hidden block ``z`` (every column-parallel output: attention heads and
  MLP units are cut along z).
So each rank holds 1/q^3 of every activation. A linear layer ``Y = X W^T`` (torch's W [N, K]) reads X in the layout
of its ``in_axis`` and writes Y in the layout of its ``out_axis`` (column-parallel: y -> z; row-parallel: z -> y).
Rank (x, y, z) holds the block (out-block ``out``, in-block ``in``) of W cut once more along K by x: 1/q^3 of W.

``cube_linear`` forward: all-gather X over the ``out_axis`` group (the samples of block x, whole K block: M/q x
K/q) and W over the x group (N/q x K/q), both at once; multiply; reduce-scatter the partial Y (a sum over the K
blocks) over the ``in_axis`` group, splitting its samples. Backward: all-gather dY over the ``in_axis`` group; dX =
dY W, reduce-scattered over the ``out_axis`` group (a sum over the N blocks), launched before dW = dY^T X is
computed and reduce-scattered over the x group (a sum over the sample blocks), so each travels under the other's
work. Per layer: 3 all-gathers and 3 reduce-scatters over q ranks, each rank sending 2 (q - 1) (MK + NK + MN) / q^3
elements in all, against SUMMA's q-fold steps. The gathered X and W blocks are kept for backward (1/q^2 each)
rather than gathered again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from lightning_par.comm.raw_collectives import _all_gather, _reduce_scatter, group_rank, group_size


@dataclass(frozen=True)
class Grid3D:
    """This rank's place in a q x q x q cube (see [Note: the 3D cube]): the ranks differing from it only in x, only
    in y, only in z (each ordered by that coordinate), and the two planes the layouts need: ``xy_group`` (my z,
    ordered x-major: the samples of layout "z") and ``xz_group`` (my y: the samples of layout "y")."""

    x_group: Optional[ProcessGroup]
    y_group: Optional[ProcessGroup]
    z_group: Optional[ProcessGroup]
    xy_group: Optional[ProcessGroup]
    xz_group: Optional[ProcessGroup]

    axes = ("x", "y", "z")
    d = 1  # no stacked layers (2.5D's depth), for code shared with the 2D grid

    @property
    def q(self) -> int:
        return group_size(self.x_group)

    @property
    def ranks(self) -> int:
        return self.q ** 3

    def index(self, axis: str) -> int:
        """This rank's coordinate on ``axis`` ("x", "y" or "z")."""
        return group_rank(self.group(axis))

    def group(self, axis: str) -> Optional[ProcessGroup]:
        """The ranks that differ from this one only on ``axis``."""
        return {"x": self.x_group, "y": self.y_group, "z": self.z_group}[axis]

    def plane(self, axis: str) -> Optional[ProcessGroup]:
        """The q^2 ranks with my coordinate on ``axis`` ("y" or "z"): those holding the same hidden block in that
        layout, ordered by their samples' block."""
        return {"y": self.xz_group, "z": self.xy_group}[axis]

    def vector_group(self, axis: str) -> Optional[ProcessGroup]:
        """The ranks holding a vector's block cut along ``axis``: that block's plane."""
        return self.plane(axis)

    def samples_block(self, layout: str) -> int:
        """This rank's block (of q^2) of the samples in ``layout`` ("y" or "z")."""
        return self.index("x") * self.q + self.index("z" if layout == "y" else "y")

    @property
    def label(self) -> str:
        q = self.q
        return f"tp3d plan on a {q} x {q} x {q} cube"

    def __deepcopy__(self, memo: dict) -> "Grid3D":
        return self  # a copied layer (a pipeline's meta copy, EMA) lives in the same cube

    def __post_init__(self) -> None:
        sizes = {axis: group_size(self.group(axis)) for axis in self.axes}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"A 3D cube has equal sides; got {sizes}.")


def _gather(x: Tensor, dim: int, group: Optional[ProcessGroup]) -> tuple[Callable[[], Tensor], Any]:
    """Launch the all-gather of ``x`` along ``dim``; returns (finish, work): ``finish()`` after ``work`` is done."""
    if group_size(group) == 1:
        return (lambda: x), None
    return _all_gather(x, dim, group, async_op=True)


def _scatter(x: Tensor, dim: int, group: Optional[ProcessGroup]) -> tuple[Tensor, Any]:
    """Launch the reduce-scatter (sum) of ``x`` along ``dim``; returns (out, work)."""
    if group_size(group) == 1:
        return x, None
    return _reduce_scatter(x, dim, group, async_op=True)


def _wait(*works: Any) -> None:
    for work in works:
        if work is not None:
            work.wait()  # on NCCL: the current stream waits, the host does not


class _CubeLinear(torch.autograd.Function):
    """``y = x @ w^T`` on the cube's blocks (``x`` [m, K/q] in layout ``in_axis``, ``w`` [N/q, K/q^2]), computed
    in ``dtype`` (the autocast dtype: the gathers and products in bf16); gradients in the inputs' own dtypes."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, grid: Grid3D, in_axis: str, out_axis: str, dtype: torch.dtype) -> Tensor:
        ctx.grid, ctx.axes, ctx.dtypes = grid, (in_axis, out_axis), (x.dtype, w.dtype)
        x_finish, x_work = _gather(x.to(dtype), 0, grid.group(out_axis))
        w_finish, w_work = _gather(w.to(dtype), 1, grid.group("x"))
        _wait(x_work, w_work)
        x_full, w_full = x_finish(), w_finish()
        ctx.save_for_backward(x_full, w_full)
        with torch.autocast(x.device.type, enabled=False):
            partial = x_full @ w_full.t()
        y, work = _scatter(partial, 0, grid.group(in_axis))
        _wait(work)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_full, w_full = ctx.saved_tensors
        grid, (in_axis, out_axis) = ctx.grid, ctx.axes
        finish, work = _gather(grad.to(w_full.dtype).contiguous(), 0, grid.group(in_axis))
        _wait(work)
        grad_full = finish()
        dx = dw = dx_work = dw_work = None
        if ctx.needs_input_grad[0]:
            dx, dx_work = _scatter(grad_full @ w_full, 0, grid.group(out_axis))
        if ctx.needs_input_grad[1]:
            dw, dw_work = _scatter(grad_full.t() @ x_full, 1, grid.group("x"))
        _wait(dx_work, dw_work)
        dx = dx.to(ctx.dtypes[0]) if dx is not None else None
        dw = dw.to(ctx.dtypes[1]) if dw is not None else None
        return dx, dw, None, None, None, None


def cube_linear(x: Tensor, w: Tensor, grid: Grid3D, in_axis: str, out_axis: str) -> Tensor:
    """This rank's block of ``X @ W^T`` (``F.linear``), in the layout of ``out_axis``, for its block ``x`` [m, K/q]
    of X in the layout of ``in_axis`` and ``w`` [N/q, K/q^2] of W (torch's [out, in] layout), differentiable in
    both (see [Note: the 3D cube])."""
    dtype = x.dtype
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return _CubeLinear.apply(x, w, grid, in_axis, out_axis, dtype)
