"""tp1d speed work (issue 11) on 2 gloo ranks: the activation collectives carry bf16 under autocast; the fused
column-parallel linear (input-gradient reduction deferred, launched asynchronously before the weight gradient)
gives the gradients of the unsharded layers, with ONE reduction per shared input; in-place and one-copy collectives
equal the plain ones; the replicated parameters' gradients under sequence parallelism are summed right however
backward calls and reduces interleave; ``sequence_parallel=None`` turns sequence parallelism on where the plan allows
it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lightning_par  # noqa: F401
from helpers import run_on_ranks
from lightning_par import TensorParallel1DStrategy
from lightning_par.comm.collectives import (
    all_gather_along_dim,
    gather_input,
    reduce_from_group,
    reduce_from_group_,
    reduce_scatter_along_dim,
)
from lightning_par.comm.raw_collectives import _all_gather, _reduce_scatter, token_chunks
from lightning_par.tensor import ColumnParallelLinear, RowParallelLinear, TensorGroup, auto_plan, parallelize
from lightning_par.tensor.layers_1d import InputOp, shard_spec
from lightning_par.tensor.replicated_grads import ReplicatedGradSum
from test_tp1d_layers import B, E, T, Recorder, Stack

HALF_TOL = 2e-2  # the bf16 tolerance of tests/test_tp1d.py


def _gather(value, spec, group):
    """The whole tensor of a tensor-parallel shard (a collective over ``group``)."""
    from lightning_par.comm.collectives import gather_along_dim

    return spec.unshard(gather_along_dim(value.contiguous(), spec.dim, group))


def _full_grad(p, tg):
    return _gather(p.grad, shard_spec(p), tg.group) if shard_spec(p) is not None else p.grad


def _check_bf16_collectives(tg: TensorGroup) -> None:
    """Under autocast every activation collective (forward and backward) carries bf16, with Megatron's counts; the
    gradients stay close to the unsharded model's under the same autocast."""
    bsh = B * T * E
    for sp in (False, True):
        torch.manual_seed(0)
        ref = Stack(2)
        stack = copy.deepcopy(ref)
        applied = parallelize(stack, auto_plan(stack, tg.size).plan, tg, sequence_parallel=sp)
        x = torch.randn(B, T, E)
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with Recorder() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
            y = stack(xs)
            forward = rec.take()
            y.float().square().sum().backward()
            backward = rec.take()
        fwd = sorted(c for c in forward if c[1] == bsh)
        bwd = sorted(c for c in backward if c[1] == bsh)
        if not sp:
            # 2 blocks x 2 pairs: one all-reduce forward (row output) and one backward (block input), all bf16.
            assert fwd == bwd == [("all_reduce", bsh, 2)] * 4, (fwd, bwd)
        else:
            # Row outputs reduce-scatter in bf16; their backward all-gathers bf16 gradients; the block inputs'
            # gradients reduce-scatter in bf16 (fused path). In fp32: the block inputs' forward all-gathers, which
            # plan.py's hook runs on the fp32 norm output (see docs/tp1d.md), and the region's boundary gathers
            # (the residual stream outside the blocks is fp32 under autocast).
            assert [c for c in fwd if c[0] == "reduce_scatter"] == [("reduce_scatter", bsh, 2)] * 4, fwd
            assert [c for c in bwd if c[0] == "reduce_scatter"] == [("reduce_scatter", bsh, 2)] * 4, bwd
            assert sorted(c for c in bwd if c[0] == "all_gather") == sorted(
                [("all_gather", bsh, 2)] * 4 + [("all_gather", bsh, 4)]), bwd
            assert len([c for c in fwd if c[0] == "all_gather"]) == 5, fwd
        applied.reduce_replicated_grads()  # what the strategy's post_backward does
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yr = ref(xr)
            yr.float().square().sum().backward()
        assert torch.allclose(y.float(), yr.float(), rtol=HALF_TOL, atol=HALF_TOL)
        scale = xr.grad.abs().max()
        assert (xs.grad - xr.grad).abs().max() <= HALF_TOL * scale
        for name, p in stack.named_parameters():
            g, gr = _full_grad(p, tg), dict(ref.named_parameters())[name].grad
            assert (g - gr).abs().max() <= HALF_TOL * gr.abs().max() + 1e-6, (sp, name)


def _check_deferred_weight_grads() -> None:
    """With deferral on (the strategy's backward), each weight gradient is computed one layer late, beside the next
    collective; after flush() every gradient equals the unsharded model's (fp32). A weight with a post-accumulate
    hook (tp x dp buckets) is never deferred: its hook sees the gradient arrive once, through autograd."""
    torch.manual_seed(0)
    ref = Stack(2)
    stack = copy.deepcopy(ref)
    tg = TensorGroup(None)
    applied = parallelize(stack, auto_plan(stack, tg.size).plan, tg, sequence_parallel=True)
    # The last row layer's weight: backward reaches it first.
    hooked = [p for n, p in stack.named_parameters() if shard_spec(p) is not None and n.endswith("weight")][-1]
    calls = []
    hooked.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad is not None))
    x = torch.randn(B, T, E)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    tg.weight_grads.active = True
    stack(xs).square().sum().backward()
    waiting = [entry[0] for entry in tg.weight_grads._pending]
    assert waiting == [stack.blocks[0].attn.c_attn.weight] and waiting[0].grad is None  # left for the flush
    assert calls == [True] and hooked.grad is not None  # the hooked weight went through autograd
    tg.weight_grads.flush()
    assert not tg.weight_grads.active and not tg.weight_grads._pending
    applied.reduce_replicated_grads()
    ref(xr).square().sum().backward()
    assert torch.allclose(xs.grad, xr.grad, atol=1e-5)
    for name, p in stack.named_parameters():
        assert torch.allclose(_full_grad(p, tg), dict(ref.named_parameters())[name].grad, atol=1e-5), name


class Qkv(nn.Module):
    """Three column layers read one input (separate q/k/v), plus a non-column use of the gathered input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E, bias=False)
        self.o = nn.Linear(E, E)

    def forward(self, x, extra: bool = False, drop_v: bool = False):
        h = self.q(x) * torch.sigmoid(self.k(x))
        v = self.v(x)  # with drop_v computed but unused: its backward never runs
        if not drop_v:
            h = h + v
        out = self.o(h)
        return out + x.sum() * 0.1 if extra else out  # the gathered input used by something else


def _token_block(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    """This rank's sequence-parallel piece of a ``[B, T, C]`` tensor: its block of every chunk of the B*T tokens in
    memory order, viewed as ``[B, T/t, C]`` (see [Note: token-sharded sequence parallelism])."""
    k = token_chunks(x.size(0) * x.size(1), tg.size, tg.token_chunks)
    return x.reshape(k, tg.size, -1)[:, tg.rank].reshape(x.size(0), -1, x.size(-1))


def _check_fused_column_gradients(tg: TensorGroup) -> None:
    """The fused path's gradients equal the unsharded module's (fp32); three column layers sharing one InputOp
    cost one reduction, launched asynchronously; a consumer that gets no gradient, or a non-column consumer of the
    gathered input, still gives the exact gradient."""
    for seq_dim in (None, 1):
        for extra, drop_v in ((False, False), (True, False), (False, True)):
            torch.manual_seed(1)
            ref = Qkv()
            par = copy.deepcopy(ref)
            op = InputOp(tg, seq_dim)
            for name in ("q", "k", "v"):
                setattr(par, name, ColumnParallelLinear.from_linear(getattr(par, name), tg, input_op=op))
            par.o = RowParallelLinear.from_linear(par.o, tg, seq_dim=seq_dim)
            x = torch.randn(B, T, E)
            xr = x.clone().requires_grad_()
            xp = (x if seq_dim is None else _token_block(x, tg)).clone().requires_grad_()
            yr = ref(xr, extra=False, drop_v=drop_v)
            if extra:  # the non-column consumer sees the whole input on every rank: reference sums x once per rank
                yr = yr + xr.sum() * 0.1
            if seq_dim is not None:
                yr = _token_block(yr, tg)
            yr.square().sum().backward()

            calls = []
            saved_ar = dist.all_reduce

            def spy(*args, **kwargs):
                calls.append(("all_reduce", kwargs.get("async_op", False)))
                return saved_ar(*args, **kwargs)

            dist.all_reduce = spy
            try:
                if extra:
                    whole = op(xp)
                    yp = par(xp, drop_v=drop_v) + whole.sum() * 0.1
                else:
                    yp = par(xp, drop_v=drop_v)
                op.clear()
                calls.clear()
                yp.square().sum().backward()
            finally:
                dist.all_reduce = saved_ar
            if seq_dim is None:
                assert torch.allclose(yp, yr, atol=1e-6)
                if not extra and not drop_v:
                    assert calls == [("all_reduce", True)], calls  # one reduction for q, k and v, asynchronous
                ref_x_grad = xr.grad
            else:
                assert torch.allclose(yp, yr, atol=1e-6)
                # Sequence-parallel reference: the rank's loss covers its chunk only; the true gradient of the sum
                # over ranks is the sum over ranks.
                ref_x_grad = xr.grad.clone()
                dist.all_reduce(ref_x_grad, group=tg.group)
                ref_x_grad = _token_block(ref_x_grad, tg)
            if extra and seq_dim is None:
                # copy_to_group's contract: a consumer of the whole input is taken as sharded, so a replicated one
                # (the extra term) is counted once per rank, as in the plain path.
                ref_x_grad = ref_x_grad + (tg.size - 1) * 0.2 * yr.detach().sum()
            assert torch.allclose(xp.grad, ref_x_grad, atol=1e-5), (seq_dim, extra, drop_v)
            for name, p in par.named_parameters():
                if drop_v and name.startswith("v."):
                    assert p.grad is None and dict(ref.named_parameters())[name].grad is None
                    continue
                g = _full_grad(p, tg)
                gr = dict(ref.named_parameters())[name].grad
                if seq_dim is not None and shard_spec(p) is None:
                    g = g.clone()
                    dist.all_reduce(g, group=tg.group)  # what ReplicatedGradSum does for a region
                    gr = gr.clone()
                    dist.all_reduce(gr, group=tg.group)
                elif seq_dim is not None:
                    gr = gr.clone()
                    dist.all_reduce(gr, group=tg.group)
                assert torch.allclose(g, gr, atol=1e-5), (seq_dim, extra, drop_v, name)


def _check_replicated_grad_sum(tg: TensorGroup) -> None:
    """Under sequence parallelism the replicated parameters' gradients equal the unsharded module's (fp32) after
    ``reduce_replicated_grads``, however backward calls and reduces interleave: accumulation (two backward calls, one
    reduce), several reduced backward calls per step, gradients zeroed in place or set to None in between. A
    parameter without a gradient on some rank gets the sum on every rank; one without a gradient anywhere keeps
    None."""
    torch.manual_seed(3)
    ref = Stack(2)
    stack = copy.deepcopy(ref)
    applied = parallelize(stack, auto_plan(stack, tg.size).plan, tg, sequence_parallel=True)
    xs = [torch.randn(B, T, E) for _ in range(3)]

    def backward(i):
        stack(xs[i]).square().sum().backward()
        ref(xs[i]).square().sum().backward()

    def check(label):
        for name, p in stack.named_parameters():
            gr = dict(ref.named_parameters())[name].grad
            assert torch.allclose(_full_grad(p, tg), gr, rtol=1e-5, atol=1e-5), (label, name)

    backward(0)
    backward(1)
    applied.reduce_replicated_grads()
    check("accumulated, one reduce")
    backward(2)
    applied.reduce_replicated_grads()
    check("a second reduced backward in the same step")
    stack.zero_grad(set_to_none=False)
    ref.zero_grad(set_to_none=True)
    backward(0)
    applied.reduce_replicated_grads()
    check("zeroed in place")
    stack.zero_grad()
    ref.zero_grad()
    backward(1)
    applied.reduce_replicated_grads()
    check("set to None")

    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    summed = ReplicatedGradSum([a, b], tg)
    if tg.rank == 0:  # the only rank with a gradient for a; none has one for b
        (a * 2).sum().backward()
    summed.reduce()
    assert torch.equal(a.grad, torch.full((3,), 2.0)) and b.grad is None


def _check_collective_variants(tg: TensorGroup) -> None:
    """The one-copy all-gather / reduce-scatter equal the definition; the in-place all-reduce equals the copying
    one and writes into its input."""
    g, t, r = tg.group, tg.size, tg.rank
    torch.manual_seed(10 + r)
    for shape, dim in (((3, 4 * t, 5), 1), ((1, 2 * t, 3), 1), ((2 * t, 3), 0), ((2, 3, 2 * t), 2)):
        x = torch.randn(shape)
        parts = [torch.empty_like(x) for _ in range(t)]
        dist.all_gather(parts, x, group=g)
        assert torch.equal(_all_gather(x, dim, g), torch.cat(parts, dim))
        total = x.clone()
        dist.all_reduce(total, group=g)
        assert torch.allclose(_reduce_scatter(x, dim, g), total.chunk(t, dim)[r], atol=1e-6)
        # autograd wrappers: all_gather_along_dim's backward (no column consumer) is the reduce-scatter
        xg = x.clone().requires_grad_()
        y = all_gather_along_dim(xg, dim, g)
        (y * 2).sum().backward()
        assert torch.allclose(xg.grad, torch.full_like(x, 2.0 * t))
        xs = torch.randn(shape).requires_grad_() if shape[dim] % t == 0 else None
        ys = reduce_scatter_along_dim(xs, dim, g)
        ys.sum().backward()
        assert torch.equal(xs.grad, torch.ones_like(xs))
    a = torch.randn(4, 6, requires_grad=True)
    y1 = reduce_from_group(a * 3, g)
    tmp = a * 3
    ptr = tmp.data_ptr()
    y2 = reduce_from_group_(tmp, g)
    assert y2.data_ptr() == ptr and torch.equal(y1, y2)
    y2.sum().backward()
    assert torch.equal(a.grad, torch.full_like(a, 3.0))
    # gather_input without a column consumer: copy_to_group's backward (an all-reduce of the gradient)
    b = torch.randn(4, 6, requires_grad=True)
    (gather_input(b, g) * (r + 1)).sum().backward()
    assert torch.equal(b.grad, torch.full_like(b, float(sum(range(1, t + 1)))))


def _on_two_ranks(rank: int, world: int) -> bool:
    tg = TensorGroup(None)
    _check_collective_variants(tg)
    _check_fused_column_gradients(tg)
    _check_fused_column_gradients(TensorGroup(None, token_chunks=2))  # row layers overlapping in 2 chunks
    _check_bf16_collectives(tg)
    _check_deferred_weight_grads()
    _check_replicated_grad_sum(tg)
    return True


def test_bf16_collectives_fused_column_and_collective_variants_on_two_ranks():
    assert all(run_on_ranks(_on_two_ranks, 2))


def test_sequence_parallel_default_is_on_where_the_plan_allows_it(caplog):
    strategy = TensorParallel1DStrategy()
    assert strategy.tensor_axis.sequence_parallel is None
    plan = auto_plan(Stack(2), 2).plan
    assert strategy.tensor_axis.resolve_sequence_parallel(plan, 2) is True
    assert strategy.tensor_axis.resolve_sequence_parallel(plan, 1) is False
    no_region = {k: v for k, v in plan.items() if v.name != "sequence_region"}
    assert strategy.tensor_axis.resolve_sequence_parallel(no_region, 2) is False  # off, with an info line
    assert strategy.tensor_axis.resolve_sequence_parallel({"blocks": "sequence_region"}, 2) is True
    assert TensorParallel1DStrategy(sequence_parallel=False).tensor_axis.resolve_sequence_parallel(plan, 2) is False
    assert TensorParallel1DStrategy(sequence_parallel=True).tensor_axis.resolve_sequence_parallel(no_region, 2) is True


def test_fused_column_linear_equals_linear_in_one_process():
    from lightning_par.tensor.linear_fns import column_linear

    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    x = torch.randn(2, 3, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    y1 = lin(x)
    y2 = column_linear(x2, w2, b2)
    assert torch.allclose(y1, y2, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(lin.weight.grad, w2.grad, atol=1e-6)
    assert torch.allclose(lin.bias.grad, b2.grad, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y3 = column_linear(x2, w2, b2)
        y4 = lin(x)
    assert y3.dtype == y4.dtype == torch.bfloat16 and torch.equal(y3, y4)
    y3.float().sum().backward()
    assert w2.grad.dtype == torch.float32 and x2.grad.dtype == torch.float32
