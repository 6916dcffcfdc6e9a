"""The box geometry of checkpoints (lightning_par/pieces.py): every axis's pieces tile the global tensor exactly."""

import random

import pytest
import torch

from lightning_par.pieces import Holding, box_key, flat_boxes, intersection, parse_box_key
from lightning_par.tensor.layers_1d import ShardSpec


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)])
def test_flat_boxes_tile_every_range(shape):
    numel = max(1, torch.Size(shape).numel())
    full = torch.arange(numel, dtype=torch.float32).reshape(shape)
    rng = random.Random(0)
    for _ in range(40):
        start = rng.randrange(numel)
        stop = rng.randrange(start + 1, numel + 1)
        boxes = flat_boxes(shape, start, stop)
        assert len(boxes) <= max(1, 2 * len(shape) - 1)
        flat = full.reshape(-1)[start:stop]
        seen = torch.zeros(numel, dtype=torch.int32)
        for offsets, sizes, position in boxes:
            region = full
            for d, (o, s) in enumerate(zip(offsets, sizes)):
                region = region.narrow(d, o, s)
            count = region.numel()
            # each box is contiguous in row-major order, at `position` of the range
            assert torch.equal(region.reshape(-1), flat[position : position + count])
            seen[region.reshape(-1).long()] += 1
        assert seen[start:stop].eq(1).all() and seen.sum() == stop - start


@pytest.mark.parametrize("spec", [ShardSpec(0, (12,), 2), ShardSpec(1, (6, 6, 6), 3),
                                  ShardSpec(0, (10,), 4, pad=True), ShardSpec(1, (5, 7), 2, pad=True)])
@pytest.mark.parametrize("zero_ranks", [0, 1, 3])
def test_holdings_of_every_rank_rebuild_the_tensor(spec, zero_ranks):
    """Tensor shards (segments, padding), each optionally cut again into ZeRO's flat ranges, put back."""
    full_shape = [5, 5]
    full_shape[spec.dim] = spec.full_size
    full = torch.randn(full_shape)
    rebuilt = torch.full_like(full, float("nan"))
    for rank in range(spec.tensor_size):
        local = spec.shard(full, rank)
        spans = [None]
        if zero_ranks:
            step = -(-local.numel() // zero_ranks)
            spans = [(a, min(a + step, local.numel())) for a in range(0, local.numel(), step)]
        for span in spans:
            holding = Holding("w", tuple(local.shape), spec, rank, span)
            assert holding.global_shape == tuple(full.shape)
            values = local.reshape(-1)[span[0] : span[1]] if span else local
            for offsets, view in holding.boxes(values):
                target = rebuilt
                for d, (o, s) in enumerate(zip(offsets, view.shape)):
                    target = target.narrow(d, o, s)
                assert target.isnan().all(), "boxes of different holders overlap"
                target.copy_(view)
    assert torch.equal(rebuilt, full)


def test_keys_and_intersections():
    assert parse_box_key(box_key("a.b|c", (1, 2), (3, 4))) == ("a.b|c", (1, 2), (3, 4))
    assert parse_box_key(box_key("s", (), ())) == ("s", (), ())
    assert intersection((0, 0), (4, 4), (2, 3), (4, 4)) == ((2, 3), (2, 1))
    assert intersection((0,), (2,), (2,), (2,)) is None


def _holdings(module):
    from lightning_par.checkpoint import HeldTensor, Holdings

    named = list(module.named_parameters())
    return Holdings([HeldTensor(Holding(n, tuple(p.shape)), p.data) for n, p in named], [n for n, _ in named])


def test_loading_is_strict_unless_the_module_says_otherwise(tmp_path):
    """A missing or an extra parameter is an error naming it; with strict=False (Lightning's strict_loading) the
    parameters the checkpoint holds load and the others keep their values."""
    from lightning_par import checkpoint

    saved = torch.nn.Linear(4, 3)
    holdings = _holdings(saved)
    checkpoint.save({"state_dict": checkpoint.model_pieces(holdings), "optimizer_states": []}, tmp_path / "c",
                    holdings=holdings, is_global_zero=True, barrier=lambda: None)
    bigger = torch.nn.Linear(4, 3)
    bigger.extra = torch.nn.Parameter(torch.full((2,), 7.0))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['extra'\]"):
        checkpoint.load(tmp_path / "c", _holdings(bigger))
    checkpoint.load(tmp_path / "c", _holdings(bigger), strict=False)
    assert torch.equal(bigger.weight, saved.weight) and torch.equal(bigger.bias, saved.bias)
    assert bigger.extra.eq(7.0).all()
    smaller = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match=r"not in the model: \['bias'\]"):
        checkpoint.load(tmp_path / "c", _holdings(smaller))
    checkpoint.load(tmp_path / "c", _holdings(smaller), strict=False)
    assert torch.equal(smaller.weight, saved.weight)
