"""The ZeRO engine below Lightning, on 2 gloo ranks: a step skipped on every rank when any rank overflows (fp16
dynamic loss scaling), and the chunk layout's arithmetic (no processes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import run_on_ranks
from lightning_par.zero.engine import ZeroEngine
from lightning_par.zero.layout import Piece, build_layout
from lightning_par.zero.policy import ZeroPolicy


def _overflow_on_one_rank(rank: int, world_size: int) -> list[str]:
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    engine = ZeroEngine(model, dist.group.WORLD, ZeroPolicy(stage=2, chunk_numel=40), torch.float32,
                        torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.shard_optimizer(optimizer)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**8, process_group=dist.group.WORLD)
    x = torch.randn(4, 8)
    done = []

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        engine.finish_backward()
        if poison and rank == 1:  # only one rank sees the overflow in its shard
            next(q for g in optimizer.param_groups for q in g["params"]).grad[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
        engine.refresh_compute()

    before = [c.master.clone() for c in engine.chunks]
    step(poison=True)
    assert all(torch.equal(b, c.master) for b, c in zip(before, engine.chunks)), "the step must be skipped"
    assert scaler.get_scale() == 2.0**7
    done.append("skipped_everywhere")
    step(poison=False)
    assert any(not torch.equal(b, c.master) for b, c in zip(before, engine.chunks))
    done.append("steps_again")
    return done


def test_fp16_overflow_on_one_rank_skips_the_step_on_all():
    assert run_on_ranks(_overflow_on_one_rank, 2) == [["skipped_everywhere", "steps_again"]] * 2


def test_layout_worked_example():
    layout = build_layout([("a", 6), ("b", 4), ("c", 5)], chunk_numel=10, world_size=2)
    assert layout.chunk_numels == (10, 5)
    assert [layout.padded_numel(c) for c in range(2)] == [10, 6]
    assert layout.pieces(1) == [Piece("a", 0, 5, 6, 0), Piece("b", 0, 0, 4, 1), Piece("c", 1, 3, 5, 0)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_layout_pieces_tile_every_parameter_exactly_once(world_size):
    numels = [("w%d" % i, n) for i, n in enumerate([7, 1, 30, 12, 0, 5, 64, 3])]
    layout = build_layout(numels, chunk_numel=16, world_size=world_size)
    covered = {name: [] for name, _ in numels}
    for rank in range(world_size):
        for piece in layout.pieces(rank):
            assert 0 <= piece.shard_offset and piece.shard_offset + piece.numel <= layout.shard_numel(piece.chunk)
            covered[piece.name].append((piece.start, piece.stop))
    for name, numel in numels:
        spans = sorted(covered[name])
        assert sum(b - a for a, b in spans) == numel
        assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    oversized = next(s.chunk for s in layout.slots if s.name == "w6")
    assert layout.chunk_numels[oversized] == 64  # an oversized parameter gets a chunk of its own


def test_layout_refuses_oversize_when_asked():
    with pytest.raises(ValueError, match="'big' has 20 elements, more than chunk_numel=10.*chunk_numel >= 20"):
        build_layout([("small", 3), ("big", 20)], chunk_numel=10, world_size=2, allow_oversize=False)
