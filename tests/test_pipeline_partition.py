"""Splitting a standard module into pipeline parts by its blocks, in one process: the parts compose to the full
model (forward and gradients), names are unchanged, balancing and split points, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_par.demo.model import GPT
from lightning_par.pipeline.partition import (
    Partition,
    PartitionError,
    StageExit,
    balance,
    choose_split_points,
    find_blocks,
    measure_block_times,
)


def _gpt(layers=4):
    torch.manual_seed(0)
    return GPT(vocab_size=32, block_size=16, n_layer=layers, n_head=2, n_embd=32)


def _run_parts(partitions, parts_per_rank, idx, target=None):
    """Run every part in order on the rank that holds it, passing activations by hand; backward if target given.
    Returns the output of the last part (and the per-rank modules hold the gradients)."""
    x, inputs, outputs = None, [], []
    num_parts = partitions[0].num_parts
    for part in range(num_parts):
        rank = next(r for r, ps in enumerate(parts_per_rank) if part in ps)
        with partitions[rank].stage(part, x):
            try:
                out = partitions[rank].module(idx)
            except StageExit as stop:
                out = stop.output
        outputs.append(out)
        x = out.detach().requires_grad_()
        inputs.append(x)
    if target is not None:
        loss = nn.functional.cross_entropy(outputs[-1].reshape(-1, 32), target.reshape(-1))
        loss.backward()
        for part in range(num_parts - 2, -1, -1):
            outputs[part].backward(inputs[part].grad)
    return outputs[-1]


@pytest.mark.parametrize("parts_per_rank", [[[0]], [[0], [1]], [[0], [1], [2], [3]], [[0, 2], [1, 3]], [[0, 3], [1, 2]]])
def test_parts_compose_to_the_full_model_forward_and_gradients(parts_per_rank):
    full = _gpt()
    layout = find_blocks(full)
    num_parts = sum(len(p) for p in parts_per_rank)
    starts = choose_split_points(full, layout, num_parts)
    partitions = [Partition(copy.deepcopy(full), layout, starts, ps) for ps in parts_per_rank]
    idx, target = torch.randint(0, 32, (3, 16)), torch.randint(0, 32, (3, 16))

    out = _run_parts(partitions, parts_per_rank, idx, target)
    reference = full(idx)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    nn.functional.cross_entropy(reference.reshape(-1, 32), target.reshape(-1)).backward()

    # A tied parameter gets gradient on every rank that holds it; the sum is the full model's gradient.
    summed: dict[str, torch.Tensor] = {}
    for partition in partitions:
        seen = set()
        for name, p in partition.module.named_parameters(remove_duplicate=False):
            if id(p) in seen or p.grad is None:
                continue
            seen.add(id(p))
            canonical = "wte.weight" if name == "lm_head.weight" else name
            summed[canonical] = summed.get(canonical, 0) + p.grad
    full_grads = {n: p.grad for n, p in full.named_parameters()}
    assert summed.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(summed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_names_are_unchanged_and_the_parts_add_up_to_the_full_state_dict():
    full = _gpt()
    layout = find_blocks(full)
    starts = choose_split_points(full, layout, 2)
    partitions = [Partition(copy.deepcopy(full), layout, starts, [k]) for k in range(2)]
    union = {}
    for partition in partitions:
        union.update(partition.module.state_dict())
    reference = full.state_dict()
    assert union.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(union[key], reference[key], rtol=0, atol=0)
    # Only the owner holds parameters: no ghost owns any, and the blocks are split.
    first = dict(partitions[0].module.named_parameters())
    assert "wte.weight" in first and "blocks.0.ln_1.weight" in first and "blocks.2.ln_1.weight" not in first
    assert "ln_f.weight" not in first and "lm_head.weight" in dict(partitions[1].module.named_parameters())


def test_which_parts_hold_each_parameter():
    full = _gpt()
    full.extra = nn.Parameter(torch.zeros(1))  # on the root, not in a child: every part keeps it
    layout = find_blocks(full)
    partition = Partition(full, layout, (0, 1, 2, 3), [0])
    assert partition.parts_holding("wte.weight") == {0}
    assert partition.parts_holding("lm_head.weight") == {3}  # the same tensor as wte.weight: tied across parts
    assert partition.parts_holding("blocks.2.mlp.c_fc.weight") == {2}
    assert partition.parts_holding("extra") == {0, 1, 2, 3}


def test_balance_by_parameter_count_and_by_time():
    assert balance([1, 1, 1, 1], 2) == (0, 2)
    assert balance([1, 1, 1, 1], 2, first=2) == (0, 1)  # a heavy embedding makes part 0 take fewer blocks
    assert balance([1, 1, 1, 1], 2, last=2) == (0, 3)
    assert balance([5, 1, 1, 1, 1, 1], 2) == (0, 1)
    assert balance([1, 2, 3, 4], 4) == (0, 1, 2, 3)
    full = _gpt(layers=6)
    layout = find_blocks(full)
    assert choose_split_points(full, layout, 3, block_times=[1, 1, 1, 1, 1, 5]) == (0, 2, 5)  # ties: earliest cut


def test_split_points_from_the_user():
    full = _gpt(layers=6)
    layout = find_blocks(full)
    assert choose_split_points(full, layout, 3, split_points=[1, 5]) == (0, 1, 5)
    for bad in ([5, 1], [0, 3], [2, 6], [2], [3, 3]):
        with pytest.raises(PartitionError, match="increasing block indices between 1 and 5"):
            choose_split_points(full, layout, 3, split_points=bad)


def test_more_parts_than_layers_is_refused():
    full = _gpt(layers=2)
    layout = find_blocks(full)
    with pytest.raises(PartitionError, match="Cannot split 2 blocks into 4 pipeline parts"):
        choose_split_points(full, layout, 4)
    with pytest.raises(PartitionError, match="Cannot split 2 blocks into 3 pipeline parts"):
        Partition(full, layout, (0, 1, 2), [0])


def test_finding_the_blocks():
    class Wrapped(nn.Module):  # a LightningModule-like holder: the blocks are found inside the child
        def __init__(self):
            super().__init__()
            self.model = _gpt()

    layout = find_blocks(Wrapped())
    assert (layout.root, layout.blocks, layout.before, layout.after) == (
        "model", "blocks", ("wte", "wpe", "drop"), ("ln_f", "lm_head"))
    assert find_blocks(Wrapped(), "model.blocks") == layout
    with pytest.raises(PartitionError, match="has no submodule 'model.layers'"):
        find_blocks(Wrapped(), "model.layers")
    with pytest.raises(PartitionError, match="is a Linear"):
        find_blocks(Wrapped(), "model.lm_head")
    with pytest.raises(PartitionError, match="no nn.ModuleList or nn.Sequential"):
        find_blocks(nn.Linear(2, 2))


class SequentialNet(nn.Module):
    """Blocks called as one nn.Sequential, with a block argument other than the hidden state not used."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Linear(4, 8)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def test_an_nn_sequential_called_as_a_whole():
    full = SequentialNet()
    layout = find_blocks(full)
    assert layout.blocks == "body"
    starts = choose_split_points(full, layout, 3)
    partitions = [Partition(copy.deepcopy(full), layout, starts, [k]) for k in range(3)]
    x = torch.randn(5, 4)
    torch.testing.assert_close(_run_parts(partitions, [[0], [1], [2]], x), full(x), rtol=0, atol=0)


def test_a_split_model_called_outside_the_pipeline_says_how_to_use_it():
    full = _gpt()
    layout = find_blocks(full)
    partition = Partition(full, layout, (0, 2), [0])
    with pytest.raises(RuntimeError, match="split into pipeline stages"):
        full(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="iterate over the blocks"):
        full.blocks[0]
    with pytest.raises(ValueError, match="part 1 is not on this rank"):
        with partition.stage(1):
            pass


def test_measured_block_times():
    full = _gpt(layers=3)
    layout = find_blocks(full)
    idx = torch.randint(0, 32, (2, 16))
    times = measure_block_times(full, layout, lambda: full(idx), repeats=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert all(p.grad is None for p in full.parameters())
