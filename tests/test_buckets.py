"""GradientBucketer on 2 gloo ranks: averaged gradients, accumulation without communication, launches during
backward, unused parameters, collectives counted, and no device read-back or element write on the common path."""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from helpers import run_on_ranks
from lightning_par.comm.buckets import GradientBucketer, broadcast_module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # Registered first, so its bucket is last in launch order (buckets follow reverse registration order).
        self.unused_everywhere = nn.Linear(8, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x, use_b: bool = True):
        x = torch.relu(self.a(x))
        if use_b:
            x = torch.relu(self.b(x))
        return self.head(x)


def _count_all_reduce(counter: list[int]):
    original = dist.all_reduce

    def counting(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    return original


def _accumulate_then_sync(bucketer: GradientBucketer, net: Net, xs: list, rank: int, world_size: int,
                          calls: list[int]) -> int:
    """An accumulation backward, which must not communicate, then a synchronising one; returns how many
    all-reduces the second launched during backward."""
    bucketer.sync = False
    net(xs[rank]).sum().backward()
    assert calls == [], "no collective during an accumulation step"
    bucketer.sync = True
    net(xs[world_size + rank]).sum().backward()
    return len(calls)


def _assert_averaged(net: Net, reference: Net, xs: list, world_size: int) -> None:
    """``net``'s gradients are the average over the ranks of backward on all of ``xs``: compare with ``reference``
    run on them in one process (layer ``unused_everywhere`` keeps no gradient in either)."""
    for x in xs:
        (reference(x).sum() / world_size).backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        if name.startswith("unused_everywhere"):
            assert p.grad is None and q.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def _assert_b_used_on_rank1_only(net: Net, reference: Net, xs: list, world_size: int) -> None:
    """After a step where only rank 1 used layer b: b gets the mean of rank 1's gradient and the others' zero."""
    reference(xs[1]).sum().backward()
    torch.testing.assert_close(net.b.weight.grad, reference.b.weight.grad / world_size, rtol=1e-6, atol=1e-7)
    assert net.unused_everywhere.weight.grad is None


def _checks(rank: int, world_size: int) -> list[str]:
    done = []
    torch.manual_seed(rank)  # different weights per rank on purpose: broadcast_module must fix that
    net = Net()
    broadcast_module(net, dist.group.WORLD)
    torch.manual_seed(0)
    reference = Net()
    reference.load_state_dict(net.state_dict())
    gathered = [torch.empty(1) for _ in range(world_size)]
    dist.all_gather(gathered, net.a.weight.flatten()[:1].contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered)
    done.append("broadcast")

    xs = [torch.randn(4, 8) for _ in range(2 * world_size)]  # same on every rank (seed 0)
    # Buckets of ~one Linear each: several buckets, so order and overlap are exercised.
    bucketer = GradientBucketer(net.named_parameters(), dist.group.WORLD, bucket_bytes=300)
    assert len(bucketer.buckets) >= 3
    calls: list[int] = []
    original = _count_all_reduce(calls)
    try:
        launched_during_backward = _accumulate_then_sync(bucketer, net, xs, rank, world_size, calls)
        bucketer.finish()
        # Buckets start in order inside backward up to the first one holding an unused parameter; that one and
        # the rest can only start in finish().
        unused = {id(p) for p in net.unused_everywhere.parameters()}
        first_blocked = next(i for i, b in enumerate(bucketer.buckets) if any(id(p) in unused for p in b.params))
        assert first_blocked >= 1
        assert launched_during_backward == first_blocked
        assert len(calls) == len(bucketer.buckets)
        done.append("accumulation_and_overlap")
    finally:
        dist.all_reduce = original

    _assert_averaged(net, reference, xs, world_size)
    done.append("averaged_gradients")

    # Unused on one rank only: layer b gets the mean of rank 1's gradient and rank 0's zero.
    net.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    net(xs[rank], use_b=(rank == 1)).sum().backward()
    bucketer.finish()
    _assert_b_used_on_rank1_only(net, reference, xs, world_size)
    done.append("unused_on_some_ranks")

    # Gradients are views into the bucket buffers after a sync: no copy for the next accumulation.
    bucket, i = bucketer._where[net.a.weight]
    assert net.a.weight.grad.data_ptr() == bucket.views[i].data_ptr()
    bucketer.remove()
    done.append("views")

    # Reentrant activation checkpointing delivers a second gradient for a parameter used inside and outside the
    # checkpointed function: refused with a clear error instead of averaging half a gradient.
    from torch.utils.checkpoint import checkpoint

    bucketer = GradientBucketer(net.named_parameters(), dist.group.WORLD, bucket_bytes=300)
    net.zero_grad(set_to_none=True)
    x = xs[0].requires_grad_(True)
    try:
        out = checkpoint(lambda h: net.a(h), net.a(x), use_reentrant=True)
        out.sum().backward()
    except RuntimeError as error:
        assert "received its gradient twice" in str(error) and "use_reentrant=False" in str(error)
        done.append("reentrant_refused")
    bucketer.reset()
    bucketer.remove()

    # reduce_dtype: the all-reduce carries a bf16 copy; the fp32 gradients receive the average (rounded to bf16).
    net.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    bucketer = GradientBucketer(net.named_parameters(), dist.group.WORLD, bucket_bytes=300,
                                reduce_dtype=torch.bfloat16)
    sent = []
    original = dist.all_reduce
    dist.all_reduce = lambda tensor, *args, **kwargs: (sent.append(tensor.dtype), original(tensor, *args, **kwargs))[1]
    try:
        net(xs[rank]).sum().backward()
        bucketer.finish()
    finally:
        dist.all_reduce = original
    assert sent == [torch.bfloat16] * len(bucketer.buckets)
    for x in xs[:world_size]:
        (reference(x).sum() / world_size).backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        if not name.startswith("unused_everywhere"):
            assert p.grad.dtype == torch.float32
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
    bucketer.remove()
    done.append("bf16_wire")
    return done + _grouped_checks(rank, world_size, net, reference, xs)


def _grouped_checks(rank: int, world_size: int, net: Net, reference: Net, xs: list) -> list[str]:
    """grouped=True: the same averages, reduced where autograd left the gradients (no flat buffer, no copy)."""
    done = []
    net.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    bucketer = GradientBucketer(net.named_parameters(), dist.group.WORLD, bucket_bytes=300, grouped=True)
    assert all(b.buffer is None and b.views is None for b in bucketer.buckets)
    calls: list[int] = []
    original = _count_all_reduce(calls)
    try:
        launched_during_backward = _accumulate_then_sync(bucketer, net, xs, rank, world_size, calls)
        grads_before = {p: p.grad.data_ptr() for p in net.parameters() if p.grad is not None}
        bucketer.finish()
    finally:
        dist.all_reduce = original
    # One all-reduce per gradient plus one for the flags, per bucket; launched in backward up to the first bucket
    # holding a parameter no rank uses.
    unused = {id(p) for p in net.unused_everywhere.parameters()}
    first_blocked = next(i for i, b in enumerate(bucketer.buckets) if any(id(p) in unused for p in b.params))
    assert launched_during_backward == sum(len(b.params) + 1 for b in bucketer.buckets[:first_blocked])
    assert len(calls) == sum(len(b.params) + 1 for b in bucketer.buckets)
    assert all(p.grad.data_ptr() == ptr for p, ptr in grads_before.items()), "reduced in place, not copied"
    _assert_averaged(net, reference, xs, world_size)
    done.append("grouped_averaged_in_place")

    # Unused on one rank only, with no read-back or element write on the rank that used everything.
    net.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    counts = Counter()
    with _spy_tensor_methods(counts):
        net(xs[rank], use_b=(rank == 1)).sum().backward()
        bucketer.finish()
    reads = sum(counts[name] for name in _READS)
    assert reads == 1 and counts["__setitem__"] == 0, counts  # both ranks read: unused_everywhere is unused here
    _assert_b_used_on_rank1_only(net, reference, xs, world_size)
    bucketer.remove()
    done.append("grouped_unused_on_some_ranks")

    # A sparse gradient (nn.Embedding(sparse=True)) is averaged dense, flat or grouped.
    for grouped in (False, True):
        torch.manual_seed(0)
        embedding = nn.Embedding(10, 4, sparse=True)
        bucketer = GradientBucketer(embedding.named_parameters(), dist.group.WORLD, grouped=grouped)
        embedding(torch.tensor([rank, 3])).sum().backward()
        bucketer.finish()
        expected = torch.zeros(10, 4)
        expected[[0, 1]] = 1 / world_size
        expected[3] = 1.0
        torch.testing.assert_close(embedding.weight.grad, expected)
        bucketer.remove()
    done.append("sparse_gradients_averaged_dense")

    try:
        GradientBucketer(net.named_parameters(), dist.group.WORLD, grouped=True, reduce_dtype=torch.bfloat16)
    except ValueError as error:
        assert "grouped=False with reduce_dtype" in str(error)
        done.append("grouped_refuses_reduce_dtype")
    return done


def test_bucketer_on_two_ranks():
    results = run_on_ranks(_checks, 2)
    for done in results:
        assert done == ["broadcast", "accumulation_and_overlap", "averaged_gradients", "unused_on_some_ranks", "views",
                        "reentrant_refused", "bf16_wire", "grouped_averaged_in_place",
                        "grouped_unused_on_some_ranks", "sparse_gradients_averaged_dense",
                        "grouped_refuses_reduce_dtype"]


# Tensor methods that read a device value on the host (a synchronisation on CUDA), or write a Python value into a
# tensor element (a copy from pageable host memory on CUDA), plus the flag writes, whose number is checked too.
_SPIED = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "__setitem__", "fill_",
          "zero_")


@contextmanager
def _spy_tensor_methods(counts: Counter):
    originals = {name: getattr(torch.Tensor, name) for name in _SPIED}

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


_READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def _sync_free_checks(rank: int, world_size: int) -> list[str]:
    done = []
    torch.manual_seed(0)
    net = Net()
    used = [(n, p) for n, p in net.named_parameters() if not n.startswith("unused_everywhere")]
    bucketer = GradientBucketer(used, dist.group.WORLD, bucket_bytes=300)
    xs = [torch.randn(4, 8) for _ in range(world_size)]

    def step(use_b: bool = True, sync: bool = True) -> Counter:
        counts = Counter()
        bucketer.sync = sync
        with _spy_tensor_methods(counts):
            net(xs[rank], use_b=use_b).sum().backward()
            if sync:
                bucketer.finish()
        bucketer.sync = True
        return counts

    # Every parameter has a gradient (fresh tensors: the hooks copy them into the buckets): no read, no element
    # write, no per-bucket or per-parameter flag write (the flags are reset by multi-tensor kernels).
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        counts = step()
        assert sum(counts[name] for name in _READS) == 0, counts
        assert counts["__setitem__"] == 0 and counts["zero_"] == 0, counts
        assert counts["fill_"] == 0, counts
        for _, p in used:
            bucket, i = bucketer._where[p]
            assert p.grad is not None and p.grad.data_ptr() == bucket.views[i].data_ptr()
    done.append("no_read_all_used")

    # Gradients kept allocated (zero_grad(set_to_none=False)): the same, autograd accumulates into the views.
    net.zero_grad(set_to_none=False)
    counts = step()
    assert sum(counts[name] for name in _READS) == 0 and counts["__setitem__"] == 0, counts
    done.append("no_read_set_to_none_false")

    # Layer b used only in the accumulation step: it still has a gradient at the boundary, so no read either.
    net.zero_grad(set_to_none=True)
    step(use_b=True, sync=False)
    counts = step(use_b=False)
    assert sum(counts[name] for name in _READS) == 0 and counts["__setitem__"] == 0, counts
    assert net.b.weight.grad is not None
    done.append("no_read_after_accumulation")

    # Layer b used on rank 1 only: rank 0 reads the flags once (and only once); rank 1 does not read. Rank 0's b
    # gets the average (rank 1 used it), not None.
    net.zero_grad(set_to_none=True)
    counts = step(use_b=(rank == 1))
    reads = sum(counts[name] for name in _READS)
    assert reads == (1 if rank == 0 else 0), counts
    assert counts["__setitem__"] == 0, counts
    assert net.b.weight.grad is not None and net.b.bias.grad is not None
    done.append("one_read_when_unused_here")

    # Layer b used on no rank: one read on every rank, and b keeps grad = None.
    net.zero_grad(set_to_none=True)
    counts = step(use_b=False)
    assert sum(counts[name] for name in _READS) == 1, counts
    assert net.b.weight.grad is None and net.b.bias.grad is None
    assert net.a.weight.grad is not None
    # ... and the next step with b used everywhere needs no read again.
    net.zero_grad(set_to_none=True)
    counts = step()
    assert sum(counts[name] for name in _READS) == 0, counts
    assert net.b.weight.grad is not None
    bucketer.remove()
    done.append("unused_everywhere_then_used")

    # A small first bucket (DDP's trick) so communication starts early; the same layout on every rank.
    bucketer = GradientBucketer(used, dist.group.WORLD, bucket_bytes=10_000, first_bucket_bytes=100)
    assert [len(b.params) for b in bucketer.buckets] == [3, 3]  # head.bias, head.weight, b.bias | the rest
    assert bucketer.buckets[0].params[1] is net.head.weight
    bucketer.remove()
    bucketer = GradientBucketer(used, dist.group.WORLD, bucket_bytes=10_000)  # default: min(1 MiB, bucket_bytes)
    assert len(bucketer.buckets) == 1
    bucketer.remove()
    done.append("first_bucket")

    # Nothing trainable (everything frozen): no bucket, and a sync is a no-op.
    frozen = nn.Linear(2, 2).requires_grad_(False)
    bucketer = GradientBucketer(frozen.named_parameters(), dist.group.WORLD)
    assert bucketer.buckets == []
    bucketer.finish()
    bucketer.reset()
    bucketer.remove()
    done.append("nothing_trainable")
    return done


def test_bucketer_reads_nothing_back_when_every_gradient_is_present():
    results = run_on_ranks(_sync_free_checks, 2)
    for done in results:
        assert done == ["no_read_all_used", "no_read_set_to_none_false", "no_read_after_accumulation",
                        "one_read_when_unused_here", "unused_everywhere_then_used", "first_bucket",
                        "nothing_trainable"]
