"""LayerNorm and RMS norms over the hidden stream of a grid layout (2D, 2.5D, 3D): the hidden dim is cut along one
axis of the grid (``axis``, set by each mode's subclass: a 2D grid's columns, a 3D cube's y), so the mean and
variance are sums over that axis's group (one all-reduce each, forward and backward), and the affine vectors are
cut along it too, held by every rank with the same coordinate there (their gradients summed over those ranks:
``grid.vector_group``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lightning_par.comm.collectives import copy_to_group
from lightning_par.comm.summa import sum_over_group
from lightning_par.tensor.grid_cut import GridCut, cut_parameter, load_piece
from lightning_par.tensor.layers_1d import ShardSpec


class GridNorm(nn.Module):
    axis: str  # the grid axis that cuts the hidden stream

    def __init__(self, normalized_shape: int, grid, eps: float, affine: bool, bias: bool,
                 device: Optional[torch.device], dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        if normalized_shape % grid.q:
            raise ValueError(f"{type(self).__name__}: normalized_size={normalized_shape} is not divisible by "
                             f"q={grid.q}.")
        self.normalized_shape, self.grid, self.eps = normalized_shape, grid, eps
        local = (normalized_shape // grid.q,)
        cut = GridCut(((ShardSpec(0, (normalized_shape,), grid.q), self.axis),), "shared")
        self.weight = cut_parameter(local, cut, device, dtype, fill=1.0) if affine else None
        self.bias = cut_parameter(local, cut, device, dtype, fill=0.0) if affine and bias else None

    def _copy_affine(self, norm: nn.Module) -> None:
        for name in ("weight", "bias"):
            mine = getattr(self, name)
            if mine is not None:
                load_piece(mine, getattr(norm, name), self.grid)

    def _affine(self, y: Tensor) -> Tensor:
        if self.weight is not None:
            y = y * copy_to_group(self.weight, self.grid.vector_group(self.axis))
        if self.bias is not None:
            y = y + copy_to_group(self.bias, self.grid.vector_group(self.axis))
        return y

    def _mean_over_hidden(self, x: Tensor) -> Tensor:
        return sum_over_group(x.sum(-1, keepdim=True), self.grid.group(self.axis)) / self.normalized_shape


class GridLayerNorm(GridNorm):
    """``nn.LayerNorm`` over the hidden stream's last dim, cut along the grid's ``axis``."""

    def __init__(self, normalized_shape: int, grid, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(normalized_shape, grid, eps, elementwise_affine, bias, device, dtype)

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, grid) -> "GridLayerNorm":
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"{cls.__name__} normalises the last dim only; got "
                             f"normalized_shape={norm.normalized_shape}.")
        weight = norm.weight
        layer = cls(norm.normalized_shape[0], grid, norm.eps, norm.elementwise_affine, norm.bias is not None,
                    device=weight.device if weight is not None else None,
                    dtype=weight.dtype if weight is not None else None)
        layer._copy_affine(norm)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        centred = x - self._mean_over_hidden(x)
        variance = self._mean_over_hidden(centred * centred)
        return self._affine((centred * torch.rsqrt(variance + self.eps)).to(dtype))


class GridRMSNorm(GridNorm):
    """``nn.RMSNorm`` (and Llama-style RMS norms) over the hidden stream, cut along the grid's ``axis``."""

    def __init__(self, normalized_shape: int, grid, eps: float = 1e-6, elementwise_affine: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(normalized_shape, grid, eps, elementwise_affine, False, device, dtype)

    @classmethod
    def from_module(cls, norm: nn.Module, grid) -> "GridRMSNorm":
        weight = norm.weight
        shape = getattr(norm, "normalized_shape", None) or (weight.shape[-1],)
        eps = getattr(norm, "eps", None)
        if eps is None:  # Hugging Face's name, else torch's default for nn.RMSNorm(eps=None)
            eps = getattr(norm, "variance_epsilon", None) or torch.finfo(weight.dtype).eps
        layer = cls(shape[-1], grid, eps, weight is not None, device=weight.device, dtype=weight.dtype)
        layer._copy_affine(norm)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        return self._affine((x * torch.rsqrt(self._mean_over_hidden(x * x) + self.eps)).to(dtype))
