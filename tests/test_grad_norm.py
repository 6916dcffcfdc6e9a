"""The global gradient norm from parts (``lightning_par/comm/grad_norm.py``), on a 2 (data) x 2 (tensor) grid of gloo
ranks: gradients cut by tensor parallelism, by ZeRO, by both, replicated, and a tied copy counted once, against the
norm of the whole tensors computed in one process."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from helpers import run_on_ranks

from lightning_par.comm.grad_norm import NormPart, clip_by_global_norm_, global_norm

NORM_TYPES = (2.0, 1.0, 3.0, float("inf"))


def _whole() -> dict[str, torch.Tensor]:
    """Every gradient of the 'model', whole; the same on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in
            {"tensor": (8, 6), "tensor_zero": (8, 6), "zero": (10,), "replicated": (5,), "tied": (3,)}.items()}


def _parts(whole, data_rank, tensor_rank, tensor_group, data_group) -> list[NormPart]:
    """This rank's pieces of ``whole``, cut as each parallelism cuts them (views, so clipping shows in ``whole``)."""
    tensor_shard = whole["tensor"].chunk(2, dim=0)[tensor_rank]  # rows across the tensor group, same on data ranks
    zero_of_shard = whole["tensor_zero"].chunk(2, dim=0)[tensor_rank].reshape(-1).chunk(2)[data_rank]
    zero_range = whole["zero"].chunk(2)[data_rank]  # flat ranges across the data group, same on tensor ranks
    return [
        NormPart([tensor_shard], (tensor_group,)),
        NormPart([zero_of_shard], (tensor_group, data_group)),
        NormPart([zero_range], (data_group,)),
        NormPart([whole["replicated"]]),
        # A tied weight: every rank holds the same gradient, the first tensor rank counts it.
        NormPart([whole["tied"]], (tensor_group,), counted=tensor_rank == 0),
    ]


def _check(rank: int, world_size: int) -> dict:
    data_rank, tensor_rank = divmod(rank, 2)
    tensor_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    data_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tensor_group, data_group = tensor_groups[data_rank], data_groups[tensor_rank]
    out = {}
    for p in NORM_TYPES:
        whole = _whole()
        expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in whole.values()]), p)
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce:
            got = global_norm(_parts(whole, data_rank, tensor_rank, tensor_group, data_group), p)
        out[p] = (float(got), float(expected), all_reduce.call_count)
    # Clipping: every piece this rank holds, counted or not, scaled as torch.nn.utils.clip_grad_norm_ scales the
    # whole tensors in one process.
    reference = {name: t.clone().requires_grad_() for name, t in _whole().items()}
    for t in reference.values():
        t.grad = t.detach().clone()
    norm = torch.nn.utils.clip_grad_norm_(list(reference.values()), max_norm=1.5)
    mine = _parts(_whole(), data_rank, tensor_rank, tensor_group, data_group)
    clip_by_global_norm_(mine, 1.5)
    expected = _parts({n: t.grad for n, t in reference.items()}, data_rank, tensor_rank, None, None)
    errors = [float((a - b).abs().max()) for p, q in zip(mine, expected) for a, b in zip(p.grads, q.grads)]
    out["clip"] = (float(norm), max(errors))
    untouched = _whole()
    clip_by_global_norm_(_parts(untouched, data_rank, tensor_rank, tensor_group, data_group), 1e6)
    out["no_clip"] = all(torch.equal(a, b) for a, b in zip(untouched.values(), _whole().values()))
    return out


def test_global_norm_over_tensor_zero_and_data_axes():
    for result in run_on_ranks(_check, 4):
        for p in NORM_TYPES:
            got, expected, all_reduces = result[p]
            assert got == pytest.approx(expected, rel=1e-6), p
            # One all-reduce per axis of each distinct set of groups: (tensor), (tensor, data), (data).
            assert all_reduces == 4
        norm, error = result["clip"]
        assert norm > 1.5 and error < 1e-6
        assert result["no_clip"]


def test_one_process_needs_no_group():
    whole = _whole()
    parts = [NormPart(list(whole.values()), (None,))]
    expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in whole.values()]))
    assert float(global_norm(parts)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="positive number or 'inf'"):
        global_norm(parts, norm_type=0)
