"""2D tensor-parallel layers (SUMMA) on a 2 x 2 grid of gloo ranks, against the same layers in one process.

Every rank builds the whole model from one seed, runs it in one process for the reference, then runs its 2D blocks;
the loss is a sum over blocks (each rank's part), so every rank's gradients are its blocks of the whole gradients.
Collectives are counted per layer against SUMMA's formula, and the bytes each rank holds against 1/q^2.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_on_ranks
from torch import nn

from lightning_par.comm.summa import Grid2D, summa_ab, summa_abt, summa_atb
from lightning_par.tensor.layers_2d import Embedding2D, LayerNorm2D, Linear2D, RMSNorm2D, activation_block
from lightning_par.topology import Topology

Q = 2
VOCAB, HIDDEN, FFN, BATCH, SEQ = 16, 8, 12, 4, 3


def _grid(rank: int) -> Grid2D:
    """Row and column groups of a q x q grid over the world (every rank creates every group, in order)."""
    topology = Topology(tensor=Q * Q, tensor_mode="2d")
    mine = {}
    for axis in ("tensor_col", "tensor_row"):  # ranks of one row (across columns), of one column (across rows)
        for ranks in topology.groups(axis):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[axis] = group
    return Grid2D(row_group=mine["tensor_col"], col_group=mine["tensor_row"])


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)
        self.rms = nn.RMSNorm(HIDDEN, eps=1e-6)
        with torch.no_grad():  # affine vectors away from their defaults, so a wrong block shows
            for p in (self.norm.weight, self.norm.bias, self.rms.weight):
                p.add_(torch.randn_like(p) * 0.3)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.rms(h + self.down(F.gelu(self.up(h))))


def _model_2d(model: _Model, grid: Grid2D) -> nn.ModuleDict:
    return nn.ModuleDict({"embed": Embedding2D.from_module(model.embed, grid),
                          "norm": LayerNorm2D.from_module(model.norm, grid),
                          "up": Linear2D.from_module(model.up, grid), "down": Linear2D.from_module(model.down, grid),
                          "rms": RMSNorm2D.from_module(model.rms, grid)})


def _forward_2d(m: nn.ModuleDict, ids_block):
    h = m["norm"](m["embed"](ids_block))
    return m["rms"](h + m["down"](F.gelu(m["up"](h))))


@contextlib.contextmanager
def _counting():
    """Count this rank's collective calls and the bytes they carry, by name."""
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    names = ("broadcast", "reduce", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor")
    saved = {name: getattr(dist, name) for name in names}

    def wrap(name):
        def counted(tensor, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            t = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
            sizes[name] = sizes.get(name, 0) + t.numel() * t.element_size()
            return saved[name](tensor, *args, **kwargs)
        return counted

    for name in names:
        setattr(dist, name, wrap(name))
    try:
        yield counts, sizes
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _close(actual, expected, what):
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5), (
        f"{what}: max abs diff {(actual - expected).abs().max().item():.3g}")


def _check(rank, world_size):
    grid = _grid(rank)
    assert (grid.row, grid.col) == divmod(rank, Q)
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(8, 10)
    # The three SUMMA products against torch on blocks.
    _close(summa_ab(activation_block(a, grid), activation_block(b, grid), grid), activation_block(a @ b, grid), "AB")
    c = torch.randn(6, 10)
    _close(summa_abt(activation_block(c, grid), activation_block(b, grid), grid),
           activation_block(c @ b.t(), grid), "AB^T")
    _close(summa_atb(activation_block(a, grid), activation_block(c, grid), grid),
           activation_block(a.t() @ c, grid), "A^TB")

    model = _Model()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    weights = torch.randn(BATCH, SEQ, HIDDEN)  # the loss: a fixed weighted sum of the output
    out = model(ids)
    (out * weights).sum().backward()

    m2 = _model_2d(model, grid)
    ids_block = ids.chunk(Q, 0)[grid.row]
    out2 = _forward_2d(m2, ids_block)
    _close(out2, activation_block(out, grid), "output block")
    (out2 * activation_block(weights, grid)).sum().backward()

    _close(m2["up"].weight.grad, model.up.weight.grad.chunk(Q, 0)[grid.col].chunk(Q, 1)[grid.row], "up.weight grad")
    _close(m2["up"].bias.grad, model.up.bias.grad.chunk(Q, 0)[grid.col], "up.bias grad")
    _close(m2["down"].weight.grad, model.down.weight.grad.chunk(Q, 0)[grid.col].chunk(Q, 1)[grid.row],
           "down.weight grad")
    for name in ("weight", "bias"):
        _close(getattr(m2["norm"], name).grad, getattr(model.norm, name).grad.chunk(Q)[grid.col], f"norm.{name} grad")
    _close(m2["rms"].weight.grad, model.rms.weight.grad.chunk(Q)[grid.col], "rms.weight grad")
    _close(m2["embed"].weight.grad, model.embed.weight.grad.chunk(Q * Q, 1)[grid.col * Q + grid.row],
           "embed.weight grad")

    # Bytes held: every weight matrix 1/q^2, the vectors 1/q (replicated down a column).
    assert m2["up"].weight.numel() * Q * Q == model.up.weight.numel()
    assert m2["embed"].weight.numel() * Q * Q == model.embed.weight.numel()
    assert out2.numel() * Q * Q == out.numel()

    # SUMMA's collectives for one Linear2D (no bias): forward q broadcasts of the input block along the row and q of
    # the weight block down the column; backward q broadcasts + q reduces for dX, the same for dW.
    layer = Linear2D.from_module(nn.Linear(HIDDEN, FFN, bias=False), grid)
    x = activation_block(torch.randn(BATCH * SEQ, HIDDEN), grid).requires_grad_(True)
    with _counting() as (counts, sizes):
        y = layer(x)
    assert counts == {"broadcast": 2 * Q}, counts
    x_bytes, w_bytes = x.numel() * 4, layer.weight.numel() * 4
    assert sizes["broadcast"] == Q * (x_bytes + w_bytes), sizes
    with _counting() as (counts, sizes):
        y.backward(torch.ones_like(y))
    assert counts == {"broadcast": 2 * Q, "reduce": 2 * Q}, counts
    assert sizes["broadcast"] == Q * (w_bytes + x_bytes) and sizes["reduce"] == Q * (x_bytes + w_bytes), sizes
    return True


@pytest.mark.timeout(300)
def test_2d_layers_match_one_process_on_a_2x2_grid():
    assert all(run_on_ranks(_check, Q * Q))


class _GridOf2:
    """A 2 x 2 grid's sizes without processes (the width checks run before any collective)."""

    q, row, col = 2, 0, 0


def test_widths_the_grid_does_not_divide_are_refused_with_the_sizes():
    with pytest.raises(ValueError, match="in_features=3 is not divisible by q=2"):
        Linear2D(3, 4, _GridOf2())
    with pytest.raises(ValueError, match="embedding_dim=6 is not divisible by q\\*q=4"):
        Embedding2D(16, 6, _GridOf2())
    with pytest.raises(ValueError, match="normalized size 5 is not divisible by q=2"):
        LayerNorm2D(5, _GridOf2())
