"""Autograd collectives and pipeline p2p, checked forward and backward against single-process torch math.

Spawning ranks is the slow part, so one rank function runs every check and is launched once per world size.
Every rank builds every rank's tensors from fixed seeds, so each can compute the expected result locally.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from helpers import run_on_ranks

from lightning_par import comm
from lightning_par.comm import (
    all_gather_along_dim,
    broadcast_from,
    copy_to_group,
    gather_along_dim,
    group_rank,
    group_size,
    irecv_tensors,
    isend_tensors,
    recv_tensors,
    reduce_from_group,
    reduce_scatter_along_dim,
    reduce_to,
    send_tensors,
    split_along_dim,
)

FULL = (4, 8, 12)  # every dim divisible by 2 and 4
DIMS = (0, 1, -1)
PRIMITIVES = (
    "copy_to_group",
    "reduce_from_group",
    "split_along_dim",
    "gather_along_dim",
    "reduce_scatter_along_dim",
    "all_gather_along_dim",
    "broadcast_from",
    "reduce_to",
)
_COMM_FUNCS = (
    "all_reduce",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "barrier",
)


def _val(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _int_val(shape, seed, dtype=torch.bfloat16):
    # Small integers: sums of a few are exact in bf16, so bf16 results can be compared exactly.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def X(g, shape=FULL):  # rank g's input
    return _val(shape, 1000 + g)


def U(g, shape=FULL):  # rank g's upstream gradient
    return _val(shape, 2000 + g)


def _numel_to(dim):  # the number of "tokens" of FULL for the token layout along dim: the dims up to dim flattened
    return math.prod(FULL[: dim % len(FULL) + 1])


def _chunk_shape(dim, n):
    shape = list(FULL)
    shape[dim] //= n
    return tuple(shape)


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def _round_trip(op, value, expected, upstream, expected_grad, contiguous=False):
    """``op`` on a leaf holding ``value`` gives ``expected``; backward of ``upstream`` gives ``expected_grad``."""
    x = _leaf(value)
    y = op(x)
    _close(y, expected)
    if contiguous:
        assert y.is_contiguous()
    y.backward(upstream)
    _close(x.grad, expected_grad)


@contextlib.contextmanager
def _no_comm():
    """Any torch.distributed communication inside the block fails the check."""

    def forbidden(*args, **kwargs):
        raise AssertionError("communication where none was expected")

    saved = {name: getattr(dist, name) for name in _COMM_FUNCS if hasattr(dist, name)}
    for name in saved:
        setattr(dist, name, forbidden)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _leaf(t):
    return t.clone().requires_grad_(True)


# ---- per-group primitive checks ---------------------------------------------------------------------------------


def _check_primitives(group, members, me, label, done):
    n, gr = len(members), members.index(me)
    assert group_size(group) == n and group_rank(group) == gr

    x = _leaf(X(me))
    y = copy_to_group(x, group)
    _close(y, X(me))
    y.backward(U(me))
    _close(x.grad, sum(U(m) for m in members))
    done.append(f"copy_to_group[{label}]")

    x = _leaf(X(me))
    y = reduce_from_group(x, group)
    _close(y, sum(X(m) for m in members))
    y.backward(U(me))
    _close(x.grad, U(me))
    assert torch.equal(x, X(me)), "reduce_from_group wrote into its input"
    done.append(f"reduce_from_group[{label}]")

    for dim in DIMS:
        cs = _chunk_shape(dim, n)
        cat = lambda parts: torch.cat(parts, dim)  # noqa: E731
        _round_trip(lambda x: split_along_dim(x, dim, group), X(me), X(me).chunk(n, dim)[gr],
                    U(me, cs), cat([U(m, cs) for m in members]), contiguous=True)
        _round_trip(lambda x: gather_along_dim(x, dim, group), X(me, cs), cat([X(m, cs) for m in members]),
                    U(me), U(me).chunk(n, dim)[gr], contiguous=True)
        _round_trip(lambda x: reduce_scatter_along_dim(x, dim, group), X(me),
                    sum(X(m) for m in members).chunk(n, dim)[gr], U(me, cs), cat([U(m, cs) for m in members]),
                    contiguous=True)
        _round_trip(lambda x: all_gather_along_dim(x, dim, group), X(me, cs), cat([X(m, cs) for m in members]),
                    U(me), sum(U(m) for m in members).chunk(n, dim)[gr])
    for name in ("split_along_dim", "gather_along_dim", "reduce_scatter_along_dim", "all_gather_along_dim"):
        done.append(f"{name}[{label}]")

    # the token layout (chunks k): the memory cut into k chunks of n blocks, rank g holding block g of every chunk,
    # in the chunk's shape; the wholes put the blocks back in place (see [Note: token-sharded sequence parallelism]).
    for dim, chunks in ((1, 1), (-1, 1), (1, 2), (-1, 3)):
        cs = _chunk_shape(dim, n)
        k = chunks if _numel_to(dim) % (chunks * n) == 0 else 1
        block = lambda t, g: t.reshape(k, n, -1)[:, g].reshape(cs)  # noqa: E731
        whole = lambda parts: torch.stack([p.reshape(k, -1) for p in parts], 1).reshape(FULL)  # noqa: E731

        _round_trip(lambda x: split_along_dim(x, dim, group, chunks=chunks), X(me), block(X(me), gr),
                    U(me, cs), whole([U(m, cs) for m in members]))
        _round_trip(lambda x: gather_along_dim(x, dim, group, chunks=chunks), X(me, cs),
                    whole([X(m, cs) for m in members]), U(me), block(U(me), gr))
        _round_trip(lambda x: reduce_scatter_along_dim(x, dim, group, chunks=chunks), X(me),
                    block(sum(X(m) for m in members), gr), U(me, cs), whole([U(m, cs) for m in members]))
        _round_trip(lambda x: all_gather_along_dim(x, dim, group, chunks=chunks), X(me, cs),
                    whole([X(m, cs) for m in members]), U(me), block(sum(U(m) for m in members), gr))
    done.append(f"token_layout[{label}]")

    for root in range(n):
        x = _leaf(X(me))
        y = broadcast_from(x, root, group)
        assert y is not x
        _close(y, X(members[root]))
        y.backward(U(me))
        expected = sum(U(m) for m in members) if gr == root else torch.zeros(FULL, dtype=torch.float64)
        _close(x.grad, expected)

        x = _leaf(X(me))
        y = reduce_to(x, root, group)
        expected = sum(X(m) for m in members) if gr == root else torch.zeros(FULL, dtype=torch.float64)
        _close(y, expected)
        y.backward(U(me))
        _close(x.grad, U(members[root]))
    done += [f"broadcast_from[{label}]", f"reduce_to[{label}]"]


def _check_bf16(group, members, me, label, done):
    n, gr = len(members), members.index(me)
    full, cs = (4, 8), (4, 8 // n)
    xi = lambda g, shape=full: _int_val(shape, 3000 + g)  # noqa: E731
    ui = lambda g, shape=full: _int_val(shape, 4000 + g)  # noqa: E731

    x = _leaf(xi(me))
    y = reduce_from_group(x, group)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, sum(xi(m).float() for m in members).bfloat16())

    x = _leaf(xi(me))
    y = reduce_scatter_along_dim(x, 1, group)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, sum(xi(m).float() for m in members).chunk(n, 1)[gr].bfloat16())
    y.backward(ui(me, cs))
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, torch.cat([ui(m, cs) for m in members], 1))

    x = _leaf(xi(me, cs))
    y = all_gather_along_dim(x, 1, group)
    assert torch.equal(y, torch.cat([xi(m, cs) for m in members], 1))
    y.backward(ui(me))
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, sum(ui(m).float() for m in members).chunk(n, 1)[gr].bfloat16())

    x = _leaf(xi(me))
    y = broadcast_from(x, n - 1, group)
    assert torch.equal(y, xi(members[-1]))
    y.backward(ui(me))
    assert x.grad.dtype == torch.bfloat16
    done.append(f"bf16[{label}]")


def _check_tensor_parallel_mlp(group, members, me, label, done):
    """The pairs composed as Megatron uses them, against the unsharded MLP (both replicated and sequence-parallel)."""
    n, gr = len(members), members.index(me)
    seq, hidden, ffn = 4, 6, 8
    x_full, w1, w2, target = _val((seq, hidden), 1), _val((hidden, ffn), 2), _val((ffn, hidden), 3), _val((seq, hidden), 4)

    ref_x, ref_w1, ref_w2 = _leaf(x_full), _leaf(w1), _leaf(w2)
    ref_y = torch.tanh(ref_x @ ref_w1) @ ref_w2
    (ref_y * target).sum().backward()

    # Replicated activations: copy_to_group / column-parallel / row-parallel / reduce_from_group.
    x, w1_l, w2_l = _leaf(x_full), _leaf(w1.chunk(n, 1)[gr]), _leaf(w2.chunk(n, 0)[gr])
    y = reduce_from_group(torch.tanh(copy_to_group(x, group) @ w1_l) @ w2_l, group)
    _close(y, ref_y.detach())
    (y * target).sum().backward()
    _close(x.grad, ref_x.grad)
    _close(w1_l.grad, ref_w1.grad.chunk(n, 1)[gr])
    _close(w2_l.grad, ref_w2.grad.chunk(n, 0)[gr])

    # Sequence-parallel activations: all_gather_along_dim in, reduce_scatter_along_dim out.
    x, w1_l, w2_l = _leaf(x_full.chunk(n, 0)[gr]), _leaf(w1.chunk(n, 1)[gr]), _leaf(w2.chunk(n, 0)[gr])
    y = reduce_scatter_along_dim(torch.tanh(all_gather_along_dim(x, 0, group) @ w1_l) @ w2_l, 0, group)
    _close(y, ref_y.detach().chunk(n, 0)[gr])
    (y * target.chunk(n, 0)[gr]).sum().backward()
    _close(x.grad, ref_x.grad.chunk(n, 0)[gr])
    _close(w1_l.grad, ref_w1.grad.chunk(n, 1)[gr])
    _close(w2_l.grad, ref_w2.grad.chunk(n, 0)[gr])

    # split then gather of a replicated tensor is the identity; rank k's chunk gradient comes from rank k's upstream.
    x = _leaf(X(0))
    y = gather_along_dim(split_along_dim(x, 2, group) * 3.0, 2, group)
    _close(y, 3.0 * X(0))
    y.backward(U(me))
    _close(x.grad, 3.0 * torch.cat([U(m).chunk(n, 2)[k] for k, m in enumerate(members)], 2))
    done.append(f"tp_mlp[{label}]")


def _check_errors(group, me, label, done):
    n = group_size(group)
    with _no_comm():
        for fn in (split_along_dim, reduce_scatter_along_dim):
            with pytest.raises(ValueError, match=rf"dim 1 has size {2 * n + 1}.*group size {n}"):
                fn(torch.zeros(3, 2 * n + 1, requires_grad=True), 1, group)
            with pytest.raises(ValueError, match="out of range"):
                fn(torch.zeros(4 * n), 1, group)
        with pytest.raises(ValueError, match=f"src={n}"):
            broadcast_from(torch.zeros(2), n, group)
        with pytest.raises(ValueError, match="dst=-1"):
            reduce_to(torch.zeros(2), -1, group)
    # The ranks are still in step after the refusals.
    _close(reduce_from_group(torch.ones(2, dtype=torch.float64), group), torch.full((2,), float(n), dtype=torch.float64))
    done.append(f"errors[{label}]")


def _check_single(group, done):
    assert group_size(group) == 1 and group_rank(group) == 0
    x = _leaf(X(0))
    with _no_comm():
        outs = [
            copy_to_group(x, group),
            reduce_from_group(x, group),
            split_along_dim(x, 1, group),
            gather_along_dim(x, 1, group),
            reduce_scatter_along_dim(x, -1, group),
            all_gather_along_dim(x, 0, group),
            broadcast_from(x, 0, group),
            reduce_to(x, 0, group),
        ]
    assert all(out is x for out in outs)
    done.append("single")


# ---- p2p checks -------------------------------------------------------------------------------------------------


def _payload(g):
    return (
        _val((2, 3), 5000 + g, torch.float32).requires_grad_(True),
        _val((4,), 5100 + g, torch.bfloat16),
        torch.tensor(7 + g),  # 0-dim int64
        torch.tensor([True, g % 2 == 0, False]),
        torch.empty(0, 5, dtype=torch.float64),  # no payload message at all
        _val((1, 1, 2), 5200 + g, torch.float16).requires_grad_(True),
        _val((3, 5), 5300 + g, torch.float32).t(),  # non-contiguous on the sender
        torch.arange(6, dtype=torch.int32).reshape(2, 3) * (g + 1),
    )


def _check_received(got, sent):
    assert isinstance(got, tuple) and len(got) == len(sent)
    for r, s in zip(got, sent):
        assert r.dtype == s.dtype and r.shape == s.shape, (r.dtype, r.shape, s.dtype, s.shape)
        assert torch.equal(r, s.detach())
        assert r.requires_grad == s.requires_grad and r.is_leaf


def _check_p2p(world, me, n, pair_group, pair_members, done):
    nxt, prv = (me + 1) % n, (me - 1) % n

    # Ring with posted sends and blocking receives.
    handle = isend_tensors(_payload(me), nxt, world)
    got = recv_tensors(prv, world)
    handle.wait()
    _check_received(got, _payload(prv))
    # The receiving stage can backprop into what required grad on the sender.
    (got[0] * 2.0).sum().backward()
    assert torch.equal(got[0].grad, torch.full((2, 3), 2.0))
    done.append("p2p_ring_tuple")

    # Ring with receives posted before the sends; a lone tensor comes back as a Tensor, a 1-tuple as a tuple.
    handle_recv = irecv_tensors(prv, world, device="cpu")
    handle_send = isend_tensors(_val((3,), 6000 + me).requires_grad_(True), nxt, world)
    got = handle_recv.wait()
    handle_send.wait()
    assert isinstance(got, torch.Tensor) and got.requires_grad
    assert torch.equal(got, _val((3,), 6000 + prv))
    assert handle_recv.wait() is got
    handle_recv = irecv_tensors(prv, world)
    handle_send = isend_tensors((torch.tensor(1.5 * me),), nxt, world)
    got = handle_recv.wait()
    handle_send.wait()
    assert isinstance(got, tuple) and len(got) == 1 and got[0].shape == () and got[0].item() == 1.5 * prv
    assert not got[0].requires_grad
    done.append("p2p_ring_async")

    # Blocking both ways inside a pair group: ranks given within the group, not globally.
    gr, other = pair_members.index(me), pair_members[1 - pair_members.index(me)]
    if gr == 0:
        send_tensors(_payload(me), 1, pair_group)
        got = recv_tensors(1, pair_group)
    else:
        got = recv_tensors(0, pair_group)
        send_tensors(_payload(me), 0, pair_group)
    _check_received(got, _payload(other))
    with pytest.raises(ValueError, match="this rank"):
        send_tensors(torch.zeros(1), gr, pair_group)
    with pytest.raises(ValueError, match="empty"):
        send_tensors((), 1 - gr, pair_group)
    done.append("p2p_pair_group")


# ---- the rank function ------------------------------------------------------------------------------------------


def _groups(n):
    """Create the same groups, in the same order, on every rank: (label, members) for each."""
    specs = [("single", [r]) for r in range(n)]
    if n == 4:
        specs += [("pair", [0, 1]), ("pair", [2, 3]), ("strided", [0, 2]), ("strided", [1, 3])]
    return [(label, members, dist.new_group(members)) for label, members in specs]


def _rank_fn(rank, world_size):
    done = []
    world = dist.group.WORLD
    everyone = list(range(world_size))
    mine = [(label, members, group) for label, members, group in _groups(world_size) if rank in members]

    _check_primitives(world, everyone, rank, "world", done)
    _check_bf16(world, everyone, rank, "world", done)
    _check_tensor_parallel_mlp(world, everyone, rank, "world", done)
    _check_errors(world, rank, "world", done)
    for label, members, group in mine:
        if label == "single":
            _check_single(group, done)
        else:
            # Both pairs of a kind run concurrently on disjoint ranks: the explicit group must keep them apart.
            _check_primitives(group, members, rank, label, done)
            _check_tensor_parallel_mlp(group, members, rank, label, done)
            _check_bf16(group, members, rank, label, done)

    if world_size == 2:
        pair_members, pair_group = everyone, world
    else:
        # Strided pairs: group rank 1 is global rank 2 or 3, so group-vs-global rank mix-ups show.
        _, pair_members, pair_group = next(s for s in mine if s[0] == "strided")
    _check_p2p(world, rank, world_size, pair_group, pair_members, done)
    return done


def _expected(world_size):
    labels = ["world"] + (["pair", "strided"] if world_size == 4 else [])
    names = [f"{p}[{label}]" for label in labels for p in (*PRIMITIVES, "token_layout", "bf16", "tp_mlp")]
    names += ["errors[world]", "single", "p2p_ring_tuple", "p2p_ring_async", "p2p_pair_group"]
    return sorted(names)


@pytest.mark.parametrize("world_size", [2, 4])
def test_comm_on_ranks(world_size):
    results = run_on_ranks(_rank_fn, world_size)
    assert len(results) == world_size
    for rank, done in enumerate(results):
        assert sorted(done) == _expected(world_size), f"rank {rank} ran {sorted(done)}"


def test_single_process_without_dist():
    # No process group at all: group=None means this process alone, and every op passes its input through.
    assert not dist.is_initialized()
    assert group_size(None) == 1 and group_rank(None) == 0
    x = torch.randn(2, 4, requires_grad=True)
    for out in (
        copy_to_group(x, None),
        reduce_from_group(x, None),
        split_along_dim(x, 1, None),
        gather_along_dim(x, 1, None),
        reduce_scatter_along_dim(x, 1, None),
        all_gather_along_dim(x, 0, None),
        broadcast_from(x, 0, None),
        reduce_to(x, 0, None),
    ):
        assert out is x
    with pytest.raises(ValueError, match="out of range"):
        split_along_dim(x, 2, None)
    assert set(comm.__all__) >= set(PRIMITIVES)
