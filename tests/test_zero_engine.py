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


def _count(name: str, calls: list):
    original = getattr(dist, name)

    def counting(*args, **kwargs):
        calls.append(args[1].numel() if len(args) > 1 else 0)  # input elements
        return original(*args, **kwargs)

    setattr(dist, name, counting)
    return original


def _communication_per_step(rank: int, world_size: int) -> dict:
    """Collectives per step on a 4-chunk model (one Linear(8, 8) per chunk), counted by stage."""
    out = {}
    for stage, reshard in ((2, True), (3, True), (3, False)):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        policy = ZeroPolicy(stage=stage, chunk_numel=72, reshard_after_forward=reshard)
        engine = ZeroEngine(model, dist.group.WORLD, policy, torch.float32, torch.device("cpu"))
        engine.begin_forward()
        gathers, scatters = [], []
        originals = [_count("all_gather_into_tensor", gathers), _count("reduce_scatter_tensor", scatters)]
        try:
            loss = model(torch.randn(2, 8)).sum()
            in_forward = len(gathers)
            loss.backward()
            scatters_in_backward = len(scatters)
            engine.finish_backward()
        finally:
            dist.all_gather_into_tensor, dist.reduce_scatter_tensor = originals
        at_rest = sum(c.compute.untyped_storage().nbytes() for c in engine.chunks)
        out[(stage, reshard)] = dict(gathers_forward=in_forward, gathers_total=len(gathers),
                                     scatters_in_backward=scatters_in_backward, scatters=len(scatters),
                                     scatter_elements=sum(scatters), compute_bytes_at_rest=at_rest)
    return out


def test_collectives_per_step_match_the_stage():
    chunks, padded = 4, 72  # 72 elements per chunk, divisible by 2 ranks: no padding
    for result in run_on_ranks(_communication_per_step, 2):
        for key, r in result.items():
            # One reduce-scatter per chunk, every one started inside backward (overlap), of the whole chunk.
            assert r["scatters"] == r["scatters_in_backward"] == chunks, key
            assert r["scatter_elements"] == chunks * padded
        assert result[(2, True)]["gathers_total"] == 0  # stage 2 keeps parameters
        # Stage 3: each chunk gathered once in forward (prefetch included) and again in backward after resharding...
        assert result[(3, True)]["gathers_forward"] == chunks and result[(3, True)]["gathers_total"] == 2 * chunks
        # ...or kept from forward to its backward.
        assert result[(3, False)]["gathers_total"] == chunks
        assert result[(3, True)]["compute_bytes_at_rest"] == result[(3, False)]["compute_bytes_at_rest"] == 0


def _refresh_is_waited_for_at_first_read(rank: int, world_size: int) -> list[str]:
    """Stage 2: the gathers after the step are launched, not waited for; a layer's forward waits for its own chunk
    only; iterating the parameters waits for the rest, and every rank then holds the updated whole parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])  # one chunk per layer
    engine = ZeroEngine(model, dist.group.WORLD, ZeroPolicy(stage=2, chunk_numel=72), torch.float32,
                        torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.shard_optimizer(optimizer)
    model(torch.randn(2, 8)).sum().backward()
    engine.finish_backward()
    optimizer.step()
    engine.refresh_compute()
    done = []
    if not any(c.gathered for c in engine.chunks) and len(engine._pending_gathers) == 4:
        done.append("launched_not_waited")
    model[0](torch.randn(2, 8))
    if engine.chunks[0].gathered and not any(c.gathered for c in engine.chunks[1:]):
        done.append("first_layer_waits_for_its_chunk_only")
    state = model.state_dict()
    masters = []
    for chunk in engine.chunks:
        whole = torch.empty(chunk.padded)
        dist.all_gather_into_tensor(whole, chunk.master, group=dist.group.WORLD)
        masters.append(whole)
    if all(c.gathered for c in engine.chunks) and all(
            torch.equal(state[f"{i}.weight"].reshape(-1), masters[i][:64]) for i in range(4)):
        done.append("state_dict_waits_and_is_current")
    return done


def test_stage2_refresh_overlaps_the_next_forward():
    expected = ["launched_not_waited", "first_layer_waits_for_its_chunk_only", "state_dict_waits_and_is_current"]
    assert run_on_ranks(_refresh_is_waited_for_at_first_read, 2) == [expected] * 2


def _released_parameters_refuse_value_reads(rank: int, world_size: int) -> list[str]:
    """Stage 3, between steps: a parameter reached by iterating the module keeps its metadata, and a read of its
    values raises ParameterNotGathered naming it, instead of reading freed memory (a segfault)."""
    from lightning_par.zero.params import ParameterNotGathered

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    engine = ZeroEngine(model, dist.group.WORLD, ZeroPolicy(stage=3, chunk_numel=72), torch.float32,
                        torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built from released parameters: metadata only
    engine.shard_optimizer(optimizer)
    done = []
    for step in range(2):
        engine.begin_forward()
        model(torch.randn(2, 8)).sum().backward()
        engine.finish_backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.refresh_compute()
    weight = next(iter(model.parameters()))
    if isinstance(weight, nn.Parameter) and weight.shape == (8, 8) and weight.requires_grad and weight.numel() == 64:
        done.append("metadata")
    for name, read in (("sum", lambda: weight.sum()), ("norm", lambda: torch.linalg.vector_norm(weight)),
                       ("state_dict", lambda: model.state_dict())):
        try:
            read()
        except ParameterNotGathered as e:
            if "0.weight" in str(e) and "full_params" in str(e):
                done.append(name)
    with engine.full_params():
        if torch.isfinite(weight.sum()) and type(weight) is nn.Parameter:
            done.append("full_params")
    engine.begin_forward()
    if torch.isfinite(model(torch.randn(2, 8)).sum()):
        done.append("forward_after")
    return done


def test_released_stage3_parameters_raise_instead_of_crashing():
    expected = ["metadata", "sum", "norm", "state_dict", "full_params", "forward_after"]
    assert run_on_ranks(_released_parameters_refuse_value_reads, 2) == [expected] * 2
