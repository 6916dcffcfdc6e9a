"""GradientBucketer on 2 gloo ranks: averaged gradients, accumulation without communication, launches during
backward, unused parameters, and collectives counted."""

from __future__ import annotations

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
        # Accumulation: the first backward must not communicate.
        bucketer.sync = False
        net(xs[rank]).sum().backward()
        assert calls == [], "no collective during an accumulation step"
        bucketer.sync = True
        net(xs[world_size + rank]).sum().backward()
        launched_during_backward = len(calls)
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

    for x in xs:
        (reference(x).sum() / world_size).backward()
    for (name, p), q in zip(net.named_parameters(), reference.parameters()):
        if name.startswith("unused_everywhere"):
            assert p.grad is None and q.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    done.append("averaged_gradients")

    # Unused on one rank only: layer b gets the mean of rank 1's gradient and rank 0's zero.
    net.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    net(xs[rank], use_b=(rank == 1)).sum().backward()
    bucketer.finish()
    reference(xs[1]).sum().backward()
    torch.testing.assert_close(net.b.weight.grad, reference.b.weight.grad / world_size, rtol=1e-6, atol=1e-7)
    assert net.unused_everywhere.weight.grad is None
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
    return done


def test_bucketer_on_two_ranks():
    results = run_on_ranks(_checks, 2)
    for done in results:
        assert done == ["broadcast", "accumulation_and_overlap", "averaged_gradients", "unused_on_some_ranks", "views",
                        "reentrant_refused"]
