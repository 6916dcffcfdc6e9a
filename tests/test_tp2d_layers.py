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
from lightning_par.tensor.layers_2d import (
    Embedding2D, LayerNorm2D, Linear2D, Output2D, RMSNorm2D, VocabParallelEmbedding2D, activation_block,
)
from lightning_par.tensor.grid_cut import grid_cut
from lightning_par.pieces import Holding, sub_box
from lightning_par.tensor.loss import VocabParallelLogits
from lightning_par.tensor.plan_2d import parallelize_2d, unparallelize_2d
from lightning_par.topology import Topology

Q = 2
VOCAB, HIDDEN, FFN, BATCH, SEQ = 15, 8, 12, 4, 4  # a vocabulary q does not divide: padded


def _grid(rank: int, depth: int = 1) -> Grid2D:
    """This rank's groups on a q x q grid over the world, or on ``depth`` stacked grids (2.5D); every rank creates
    every group, in order."""
    topology = Topology(tensor=depth * Q * Q, tensor_mode="2.5d" if depth > 1 else "2d", depth=depth)
    axes = {"row": "tensor_col", "col": "tensor_row"}  # ranks of one row (across columns), of one column
    if depth > 1:
        axes.update(depth="tensor_depth", layer=("tensor_row", "tensor_col"), stack=("tensor_depth", "tensor_row"))
    mine = {}
    for key, axis in axes.items():
        for ranks in topology.groups(axis):
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[key] = group
    return Grid2D(row_group=mine["row"], col_group=mine["col"], depth_group=mine.get("depth"),
                  layer_group=mine.get("layer"), stack_group=mine.get("stack"))


class _Model(nn.Module):
    """A GPT-shaped stack: tied token embedding and output layer, position embedding, LayerNorm, MLP, RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(SEQ, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)
        self.rms = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.wte.weight = self.head.weight
        with torch.no_grad():  # affine vectors away from their defaults, so a wrong block shows
            for p in (self.norm.weight, self.norm.bias, self.rms.weight):
                p.add_(torch.randn_like(p) * 0.3)

    def hidden(self, ids):
        h = self.norm(self.wte(ids) + self.wpe(torch.arange(ids.shape[1])))
        return self.rms(h + self.down(F.gelu(self.up(h))))

    def forward(self, ids):
        return self.head(self.hidden(ids))


def _model_2d(model: _Model, grid: Grid2D) -> nn.ModuleDict:
    m = nn.ModuleDict({"head": Output2D.from_module(model.head, grid),
                       "wpe": Embedding2D.from_module(model.wpe, grid),
                       "norm": LayerNorm2D.from_module(model.norm, grid),
                       "up": Linear2D.from_module(model.up, grid), "down": Linear2D.from_module(model.down, grid),
                       "rms": RMSNorm2D.from_module(model.rms, grid)})
    m["wte"] = VocabParallelEmbedding2D.from_module(model.wte, grid, weight=m["head"].weight)  # tied, one Parameter
    return m


def _hidden_2d(m: nn.ModuleDict, ids):
    h = m["norm"](m["wte"](ids) + m["wpe"](torch.arange(ids.shape[1])))
    return m["rms"](h + m["down"](F.gelu(m["up"](h))))


def _logits_2d(m: nn.ModuleDict, ids, grid: Grid2D) -> VocabParallelLogits:
    return m["head"](_hidden_2d(m, ids))


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


def _check(rank, world_size, depth=1):
    grid = _grid(rank, depth)
    assert (grid.depth, grid.row, grid.col) == (rank // (Q * Q), rank % (Q * Q) // Q, rank % Q)
    if depth == 1:
        _check_summa(grid)
    _check_layers(grid)
    _check_demo_gpt(grid)
    _check_bf16(grid)
    return True


def _check_summa(grid: Grid2D) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(8, 10)
    # The three SUMMA products against torch on blocks.
    _close(summa_ab(activation_block(a, grid), activation_block(b, grid), grid), activation_block(a @ b, grid), "AB")
    c = torch.randn(6, 10)
    _close(summa_abt(activation_block(c, grid), activation_block(b, grid), grid),
           activation_block(c @ b.t(), grid), "AB^T")
    _close(summa_atb(activation_block(a, grid), activation_block(c, grid), grid),
           activation_block(a.t() @ c, grid), "A^TB")


def _check_layers(grid: Grid2D) -> None:
    torch.manual_seed(0)
    model = _Model()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    targets = torch.randint(0, VOCAB, (BATCH, SEQ))
    hidden = model.hidden(ids)
    loss = F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()

    m2 = _model_2d(model, grid)
    # Each parameter's Cut2D: unsharding gives the whole tensor back, and its checkpoint boxes tile it.
    wholes = {"head": model.head, "wpe": model.wpe, "norm": model.norm, "up": model.up, "down": model.down,
              "rms": model.rms}
    for layer_name, whole_layer in wholes.items():
        for name, p in m2[layer_name].named_parameters():
            whole = getattr(whole_layer, name)
            _close(grid_cut(p).unshard(p.detach(), grid), whole.detach(), f"{layer_name}.{name} unsharded")
            holding = Holding(name, tuple(p.shape), grid_cut(p).boxes(grid))
            assert holding.global_shape == tuple(whole.shape)
            for offsets, view in holding.boxes(p.detach()):
                _close(view, sub_box(whole.detach(), (0,) * whole.dim(), offsets, tuple(view.shape)),
                       f"{layer_name}.{name} box at {offsets}")
    _close(_hidden_2d(m2, ids), activation_block(hidden.detach(), grid), "hidden block")
    logits = _logits_2d(m2, ids, grid)
    assert logits.shape == (BATCH, SEQ, VOCAB)
    loss2 = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    _close(loss2, loss.detach(), "loss")  # the same on every rank
    loss2.backward()

    def block(grad, p):
        return grid_cut(p).shard(grad, grid)

    # The tied table: the embedding's and the output layer's gradients, both in one Parameter.
    _close(m2["head"].weight.grad, block(model.head.weight.grad, m2["head"].weight), "head/wte weight grad")
    _close(m2["up"].weight.grad, block(model.up.weight.grad, m2["up"].weight), "up.weight grad")
    _close(m2["up"].bias.grad, model.up.bias.grad.chunk(Q, 0)[grid.col], "up.bias grad")
    _close(m2["down"].weight.grad, block(model.down.weight.grad, m2["down"].weight), "down.weight grad")
    for name in ("weight", "bias"):
        _close(getattr(m2["norm"], name).grad, getattr(model.norm, name).grad.chunk(Q)[grid.col], f"norm.{name} grad")
    _close(m2["rms"].weight.grad, model.rms.weight.grad.chunk(Q)[grid.col], "rms.weight grad")
    _close(m2["wpe"].weight.grad, model.wpe.weight.grad.chunk(Q * Q, 1)[grid.col * Q + grid.row], "wpe.weight grad")
    with torch.no_grad():
        _close(_logits_2d(m2, ids, grid).materialize(), model(ids), "materialized logits")

    # Bytes held: every weight matrix 1/q^2, the vectors 1/q (replicated down a column); every activation between
    # layers 1/q^2, and 1/(d q^2) in a 2.5D stack of d layers (Tesseract's bounds).
    assert _hidden_2d(m2, ids).numel() * grid.d * Q * Q == hidden.numel()
    assert m2["up"].weight.numel() * Q * Q == model.up.weight.numel()
    assert m2["wpe"].weight.numel() * Q * Q == model.wpe.weight.numel()
    assert m2["head"].weight.numel() * Q * Q == (VOCAB + 1) * HIDDEN  # one zero row of padding

    # SUMMA's collectives for one Linear2D (no bias), Y = X W^T: forward q broadcasts of the weight block down the
    # column and q reduces of the partial outputs along the row; backward dX = dY W (q broadcasts of dY's block
    # along the row, q of W's down the column) and dW = dY^T X (q broadcasts of dY's block, q reduces of dW's).
    # 2.5D adds one all-reduce of the weight block's gradient over the depth (Tesseract's), nothing forward.
    layer = Linear2D.from_module(nn.Linear(HIDDEN, FFN, bias=False), grid)
    x = activation_block(torch.randn(BATCH * SEQ, HIDDEN), grid).requires_grad_(True)
    with _counting() as (counts, sizes):
        y = layer(x)
    w_bytes, y_bytes = layer.weight.numel() * 4, y.numel() * 4
    assert counts == {"broadcast": Q, "reduce": Q}, counts
    assert sizes == {"broadcast": Q * w_bytes, "reduce": Q * y_bytes}, sizes
    with _counting() as (counts, sizes):
        y.backward(torch.ones_like(y))
    depth = {"all_reduce": 1} if grid.d > 1 else {}
    assert counts == {"broadcast": 3 * Q, "reduce": Q, **depth}, counts
    depth_bytes = {"all_reduce": w_bytes} if grid.d > 1 else {}
    assert sizes == {"broadcast": Q * (2 * y_bytes + w_bytes), "reduce": Q * w_bytes, **depth_bytes}, sizes


def _check_bf16(grid: Grid2D) -> None:
    """Under bf16 autocast the SUMMA products run in bf16 (fp32 weights cast, as torch's autocast casts a Linear's),
    and the loss and gradients stay within bf16's rounding of one process's."""
    from lightning_par.demo.model import DemoGPT

    torch.manual_seed(1)
    whole = DemoGPT(vocab_size=31, block_size=8, n_layer=2, n_head=4, n_embd=16)
    torch.manual_seed(1)
    cut = DemoGPT(vocab_size=31, block_size=8, n_layer=2, n_head=4, n_embd=16)
    parallelize_2d(cut, grid)
    x, y = torch.randint(0, 31, (BATCH, 8)), torch.randint(0, 31, (BATCH, 8))
    losses = []
    for module in (whole, cut):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module._loss((x, y))
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[1] - losses[0]) <= 2e-2 * abs(losses[0]), losses
    grad = cut.model.blocks[0].mlp.c_fc.weight.grad
    assert grad.dtype == torch.float32
    expected = grid_cut(cut.model.blocks[0].mlp.c_fc.weight).shard(whole.model.blocks[0].mlp.c_fc.weight.grad, grid)
    assert (grad - expected).norm() <= 2e-2 * expected.norm(), ((grad - expected).norm(), expected.norm())


def _check_demo_gpt(grid: Grid2D) -> None:
    """The demo GPT cut by the automatic 2D plan trains like one process: SGD, loss step by step (every rank)."""
    from lightning_par.demo.model import DemoGPT

    def make():
        torch.manual_seed(1)
        return DemoGPT(vocab_size=31, block_size=8, n_layer=2, n_head=4, n_embd=16, optimizer="sgd")

    whole, cut = make(), make()
    entries = dict(parallelize_2d(cut, grid))
    assert entries["model.wte"] == "VocabParallelEmbedding2D (tied)" and entries["model.lm_head"] == "Output2D"
    assert entries["model.blocks.0.attn.c_attn"] == "Linear2D" and entries["model.wpe"] == "Embedding2D"
    assert cut.model.blocks[0].attn.n_head == 4 // Q
    assert not any(isinstance(m, nn.Linear) for m in cut.modules())  # nothing left whole
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (whole, cut)]
    torch.manual_seed(2)
    for step in range(4):
        if step == 3:  # undo the cut: the whole module and its optimizer state continue as in one process
            unparallelize_2d(cut, [optimizers[1]])
            assert sum(isinstance(m, nn.Linear) for m in cut.modules()) == sum(
                isinstance(m, nn.Linear) for m in whole.modules())
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


@pytest.mark.timeout(300)
def test_2d_layers_and_the_demo_gpt_match_one_process_on_a_2x2_grid():
    assert all(run_on_ranks(_check, Q * Q))


@pytest.mark.timeout(300)
def test_2p5d_layers_and_the_demo_gpt_match_one_process_on_two_layers_of_2x2():
    """2.5D (Tesseract): two stacked 2 x 2 grids, each with every weight block and half of the samples."""
    assert all(run_on_ranks(_check, 2 * Q * Q, 2))


class _GridOf2:
    """A 2 x 2 grid's sizes without processes (the width checks run before any collective)."""

    q, row, col = 2, 0, 0


def test_widths_the_grid_does_not_divide_are_refused_with_the_sizes():
    with pytest.raises(ValueError, match="in_features=3 is not divisible by q=2"):
        Linear2D(3, 4, _GridOf2())
    with pytest.raises(ValueError, match="embedding_dim=6 is not divisible by q\\*q=4"):
        Embedding2D(16, 6, _GridOf2())
    with pytest.raises(ValueError, match="normalized_size=5 is not divisible by q=2"):
        LayerNorm2D(5, _GridOf2())
