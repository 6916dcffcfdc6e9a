"""3D tensor-parallel layers on a 2 x 2 x 2 cube of gloo ranks, against the same layers in one process.

Every rank builds the whole model from one seed, runs it in one process for the reference, then runs its 3D blocks.
Collectives are counted per layer against the 3D method's formula, and the bytes each rank holds against 1/q^3.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_on_ranks
from torch import nn
from test_tp2d_layers import BATCH, FFN, HIDDEN, SEQ, VOCAB, _close, _Model

from lightning_par.comm.cube import Grid3D, cube_linear
from lightning_par.pieces import Holding, sub_box
from lightning_par.tensor.grid_cut import grid_cut
from lightning_par.tensor.layers_3d import (
    Embedding3D, LayerNorm3D, Linear3D, Output3D, RMSNorm3D, VocabParallelEmbedding3D, activation_block_3d,
)
from lightning_par.tensor.plan_2d import parallelize_2d, unparallelize_2d
from lightning_par.topology import Topology

Q = 2


def _cube(rank: int) -> Grid3D:
    """This rank's groups in a q x q x q cube over the world (every rank creates every group, in order)."""
    topology = Topology(tensor=Q ** 3, tensor_mode="3d")
    axes = {"x": "tensor_x", "y": "tensor_y", "z": "tensor_z", "xy": ("tensor_x", "tensor_y"),
            "xz": ("tensor_x", "tensor_z")}
    mine = {}
    for key, axis in axes.items():
        for ranks in topology.groups(axis):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[key] = group
    return Grid3D(*(mine[key] for key in ("x", "y", "z", "xy", "xz")))


@contextlib.contextmanager
def _counting():
    """Count this rank's collectives by kind, and the elements of the tensor each one hands back to this rank."""
    counts: dict[str, int] = {}
    received: dict[str, int] = {}
    kinds = {"all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
             "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
             "all_reduce": "all_reduce", "broadcast": "broadcast", "reduce": "reduce"}
    saved = {name: getattr(dist, name) for name in kinds if hasattr(dist, name)}

    def wrap(name):
        def counted(tensor, *args, **kwargs):
            kind = kinds[name]
            counts[kind] = counts.get(kind, 0) + 1
            received[kind] = received.get(kind, 0) + tensor.numel()  # the output: gathered, or this rank's share
            return saved[name](tensor, *args, **kwargs)
        return counted

    for name in saved:
        setattr(dist, name, wrap(name))
    try:
        yield counts, received
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _model_3d(model: _Model, grid: Grid3D) -> nn.ModuleDict:
    m = nn.ModuleDict({"head": Output3D.from_module(model.head, grid),
                       "wpe": Embedding3D.from_module(model.wpe, grid),
                       "norm": LayerNorm3D.from_module(model.norm, grid),
                       "up": Linear3D.from_module(model.up, grid),
                       "down": Linear3D.from_module(model.down, grid, rowwise=True),
                       "rms": RMSNorm3D.from_module(model.rms, grid)})
    m["wte"] = VocabParallelEmbedding3D.from_module(model.wte, grid, weight=m["head"].weight)  # tied
    return m


def _hidden_3d(m: nn.ModuleDict, ids):
    h = m["norm"](m["wte"](ids) + m["wpe"](torch.arange(ids.shape[1])))
    return m["rms"](h + m["down"](F.gelu(m["up"](h))))


def _check(rank, world_size):
    grid = _cube(rank)
    assert (grid.index("x"), grid.index("y"), grid.index("z")) == (rank // 4, rank // 2 % 2, rank % 2)
    _check_product(grid)
    _check_layers(grid)
    _check_demo_gpt(grid)
    _check_bf16(grid)
    return True


def _check_product(grid: Grid3D) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(8, 12), torch.randn(6, 12)
    for in_axis, out_axis in (("y", "z"), ("z", "y")):
        xb = activation_block_3d(x, grid, in_axis).requires_grad_(True)
        cut = Linear3D(12, 6, grid, bias=False, rowwise=in_axis == "z").weight
        wb = grid_cut(cut).shard(w, grid).requires_grad_(True)
        y = cube_linear(xb, wb, grid, in_axis, out_axis)
        _close(y, activation_block_3d(x @ w.t(), grid, out_axis), f"X W^T, {in_axis} -> {out_axis}")
        dy = torch.randn(8, 6)
        y.backward(activation_block_3d(dy, grid, out_axis))
        _close(xb.grad, activation_block_3d(dy @ w, grid, in_axis), f"dX, {in_axis} -> {out_axis}")
        _close(wb.grad, grid_cut(cut).shard(dy.t() @ x, grid), f"dW, {in_axis} -> {out_axis}")


def _check_layers(grid: Grid3D) -> None:
    torch.manual_seed(0)
    model = _Model()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))
    hidden = model.hidden(ids)
    loss = F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()

    m3 = _model_3d(model, grid)
    wholes = {"head": model.head, "wpe": model.wpe, "norm": model.norm, "up": model.up, "down": model.down,
              "rms": model.rms}
    for layer_name, whole_layer in wholes.items():
        for name, p in m3[layer_name].named_parameters():
            whole = getattr(whole_layer, name)
            _close(grid_cut(p).unshard(p.detach(), grid), whole.detach(), f"{layer_name}.{name} unsharded")
            holding = Holding(name, tuple(p.shape), grid_cut(p).boxes(grid))
            assert holding.global_shape == tuple(whole.shape)
            for offsets, view in holding.boxes(p.detach()):
                _close(view, sub_box(whole.detach(), (0,) * whole.dim(), offsets, tuple(view.shape)),
                       f"{layer_name}.{name} box at {offsets}")
    _close(_hidden_3d(m3, ids), activation_block_3d(hidden.detach(), grid), "hidden block (layout y)")
    logits = m3["head"](_hidden_3d(m3, ids))
    assert logits.shape == (BATCH, SEQ, VOCAB)
    loss3 = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    _close(loss3, loss.detach(), "loss")
    loss3.backward()
    for layer_name, whole_layer in wholes.items():
        for name, p in m3[layer_name].named_parameters():
            expected = grid_cut(p).shard(getattr(whole_layer, name).grad, grid)
            _close(p.grad, expected, f"{layer_name}.{name} grad")  # head's: the tied table's two uses summed
    with torch.no_grad():
        _close(m3["head"](_hidden_3d(m3, ids)).materialize(), model(ids), "materialized logits")

    # Bytes held: every weight matrix and position table 1/q^3, the vectors 1/q; every activation between layers
    # 1/q^3, in both layouts.
    q3 = Q ** 3
    assert _hidden_3d(m3, ids).numel() * q3 == hidden.numel()
    assert m3["up"](_hidden_3d(m3, ids)).numel() * q3 == BATCH * SEQ * FFN
    assert m3["up"].weight.numel() * q3 == model.up.weight.numel()
    assert m3["down"].weight.numel() * q3 == model.down.weight.numel()
    assert m3["wpe"].weight.numel() * q3 == model.wpe.weight.numel()
    assert m3["head"].weight.numel() * q3 == (VOCAB + 1) * HIDDEN  # one zero row of padding
    assert m3["up"].bias.numel() * Q == FFN

    # The 3D method's collectives for one Linear3D (no bias), Y = X W^T with X [M, K], W [N, K]: forward all-gathers
    # X's block over the output axis (M/q x K/q back) and W's over x (N/q x K/q back), and reduce-scatters the
    # partial Y over the input axis (M N / q^3 back); backward all-gathers dY (M/q x N/q) and reduce-scatters dX
    # (M K / q^3) and dW (N K / q^3). Each rank sends 2 (q - 1) (MK + NK + MN) / q^3 elements in all.
    m_, k_, n_ = BATCH * SEQ, FFN, HIDDEN
    for rowwise in (False, True):
        layer = Linear3D(k_, n_, grid, bias=False, rowwise=rowwise)
        layer.weight.data.normal_()
        x = activation_block_3d(torch.randn(m_, k_), grid, layer.in_axis).requires_grad_(True)
        with _counting() as (counts, received):
            y = layer(x)
        assert counts == {"all_gather": 2, "reduce_scatter": 1}, counts
        assert received == {"all_gather": (m_ * k_ + n_ * k_) // Q ** 2, "reduce_scatter": m_ * n_ // q3}, received
        with _counting() as (counts, received):
            y.backward(torch.ones_like(y))
        assert counts == {"all_gather": 1, "reduce_scatter": 2}, counts
        assert received == {"all_gather": m_ * n_ // Q ** 2, "reduce_scatter": (m_ * k_ + n_ * k_) // q3}, received


def _demo(optimizer: str = "adamw"):
    from lightning_par.demo.model import DemoGPT

    torch.manual_seed(1)
    return DemoGPT(vocab_size=31, block_size=8, n_layer=2, n_head=4, n_embd=16, optimizer=optimizer)


def _check_demo_gpt(grid: Grid3D) -> None:
    """The demo GPT cut by the automatic plan with the cube's layers trains like one process (SGD with momentum, the
    loss step by step on every rank), and is made whole again with its momentum."""
    whole, cut = _demo("sgd"), _demo("sgd")
    entries = dict(parallelize_2d(cut, grid))
    assert entries["model.wte"] == "VocabParallelEmbedding3D (tied)" and entries["model.lm_head"] == "Output3D"
    assert entries["model.blocks.0.attn.c_attn"] == "Linear3D" and entries["model.wpe"] == "Embedding3D"
    assert cut.model.blocks[0].attn.c_proj.in_axis == "z" and cut.model.blocks[0].attn.c_attn.in_axis == "y"
    assert not any(isinstance(m, nn.Linear) for m in cut.modules())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (whole, cut)]
    torch.manual_seed(2)
    for step in range(4):
        if step == 3:
            unparallelize_2d(cut, [optimizers[1]])
            assert cut.model.wte.weight is cut.model.lm_head.weight and cut.model.blocks[0].attn.n_head == 4
            for (name, p), q in zip(cut.named_parameters(), whole.parameters()):
                _close(p.detach(), q.detach(), f"{name} after unsharding")
                _close(optimizers[1].state[p]["momentum_buffer"], optimizers[0].state[q]["momentum_buffer"],
                       f"{name} momentum after unsharding")
        x, y = torch.randint(0, 31, (BATCH, 8)), torch.randint(0, 31, (BATCH, 8))
        losses = []
        for module, optimizer in zip((whole, cut), optimizers):
            loss = module._loss((x, y))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        _close(losses[1], losses[0], f"demo GPT loss at step {step}")


def _check_bf16(grid: Grid3D) -> None:
    """Under bf16 autocast the cube's gathers and products run in bf16; loss and gradients stay within bf16's
    rounding of one process's."""
    whole, cut = _demo(), _demo()
    parallelize_2d(cut, grid)
    x, y = torch.randint(0, 31, (BATCH, 8)), torch.randint(0, 31, (BATCH, 8))
    losses = []
    for module in (whole, cut):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module._loss((x, y))
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0]), losses
    weight = cut.model.blocks[0].mlp.c_fc.weight
    assert weight.grad.dtype == torch.float32
    expected = grid_cut(weight).shard(whole.model.blocks[0].mlp.c_fc.weight.grad, grid)
    assert (weight.grad - expected).norm() <= 2e-2 * expected.norm(), ((weight.grad - expected).norm(),
                                                                       expected.norm())


@pytest.mark.timeout(300)
def test_3d_layers_and_the_demo_gpt_match_one_process_on_a_2x2x2_cube():
    assert all(run_on_ranks(_check, Q ** 3))


class _CubeOf2:
    """A 2 x 2 x 2 cube's sizes without processes (the width checks run before any collective)."""

    q = 2

    @staticmethod
    def index(axis):
        return 0


def test_widths_the_cube_does_not_divide_are_refused_with_the_sizes():
    with pytest.raises(ValueError, match="in_features=6 is not divisible by q\\*q=4"):
        Linear3D(6, 4, _CubeOf2())
    with pytest.raises(ValueError, match="embedding_dim=12 is not divisible by q\\*q\\*q=8"):
        Embedding3D(16, 12, _CubeOf2())
    with pytest.raises(ValueError, match="normalized_size=5 is not divisible by q=2"):
        LayerNorm3D(5, _CubeOf2())
