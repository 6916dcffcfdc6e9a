"""Splitting by tracing the forward (``split="trace"``): in one process, the parts compose to the full model's output
and gradients, only the crossing values travel, parameters stay with the parts that read them, and an untraceable
forward gets an error that says what to do; on 2 gloo ranks through Lightning's Trainer, modules without a blocks
container (six layers as attributes; the same with skip connections over the cuts) match one process step by step
(fp32, SGD) under several schedules.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from helpers import free_port, run_on_ranks
from lightning_par import PipelineStrategy
from lightning_par.demo.model import GPT
from lightning_par.pipeline.partition import PartitionError, StageExit
from lightning_par.pipeline.trace_split import TracePartition
from parity import Run, fit, relative_gap

VOCAB, WIDTH = 32, 16
TOL = 1e-5


class TracedLM(LightningModule):
    """No blocks container: six layers as attributes called in sequence; ``residual`` adds skip connections, one of
    them from the embedding over every layer (it crosses every cut)."""

    def __init__(self, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.emb = nn.Embedding(VOCAB, WIDTH)
        for i in range(1, 7):
            setattr(self, f"l{i}", nn.Linear(WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)
        self.recorded: list[float] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        skip = x
        x = F.gelu(self.l1(x))
        x = F.gelu(self.l2(x))
        x = F.gelu(self.l3(x))
        if self.residual:  # a Python bool: fixed when traced
            x = x + F.gelu(self.l4(x))
        else:
            x = F.gelu(self.l4(x))
        x = F.gelu(self.l5(x))
        x = F.gelu(self.l6(x))
        if self.residual:
            x = x + skip
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("val_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.recorded.append(outputs["loss"].item())  # the step loss, the same on every rank

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # depends on the data: fx cannot trace it
            return self.a(x)
        return self.b(x)


def _compose(partition: TracePartition, module: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Run every part in turn through the module's own forward, as the executor does; also the crossing counts."""
    received, sizes = None, []
    for part in range(partition.num_parts):
        with partition.stage(part, received):
            try:
                return module(idx), sizes
            except StageExit as stop:
                received = tuple(t.detach().requires_grad_(t.requires_grad) for t in stop.output)
                sizes.append(len(received))
                # Backward needs one graph here: keep the real outputs instead of fresh leaves.
                received = stop.output
    raise AssertionError("the last part did not return")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("parts", [2, 3, 4])
def test_parts_compose_to_the_full_model(residual, parts):
    torch.manual_seed(0)
    model = TracedLM(residual)
    reference = copy.deepcopy(model)
    idx = torch.randint(0, VOCAB, (2, 5))
    expected = reference(idx)
    expected.square().sum().backward()
    partition = TracePartition(model, parts, range(parts))
    out, sizes = _compose(partition, model, idx)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # Only what crosses a cut travels: the hidden state, plus the embedding's skip when residual.
    assert sizes == [2 if residual else 1] * (parts - 1), sizes
    assert all(len(partition.crossing(k)) == size for k, size in zip(range(1, parts), sizes))


def test_each_rank_keeps_only_the_parameters_its_parts_read():
    torch.manual_seed(0)
    full = TracedLM(residual=True)
    names = set(full.state_dict())
    held = set()
    for part in range(3):
        model = copy.deepcopy(full)
        partition = TracePartition(model, 3, [part])
        local = set(model.state_dict())
        assert local == {n for n, _ in model.named_parameters()}  # no buffers here; names unchanged
        assert all(part in partition.parts_holding(n) for n in local)
        held |= local
        with pytest.raises(RuntimeError, match="split into pipeline stages"):
            model(torch.zeros(1, 3, dtype=torch.long))  # outside a pipeline step
    assert held == names
    # Balanced by parameter count: the embedding and l1 start, the head ends; cut by module name on request.
    model = copy.deepcopy(full)
    partition = TracePartition(model, 2, [0, 1], split_points=["l5"])
    assert "l5.weight" in set(n for n in names if partition.parts_holding(n) == frozenset({1}))
    assert partition.parts_holding("l4.weight") == frozenset({0})


def test_a_tied_weight_is_held_by_both_parts_that_read_it():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, WIDTH)
            self.l1, self.l2 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

        def forward(self, idx):
            x = self.l2(F.gelu(self.l1(self.emb(idx))))
            return F.linear(x, self.emb.weight)  # the output layer reads the embedding

    torch.manual_seed(0)
    full = Tied()
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    partition = TracePartition(first, 2, [0])
    TracePartition(last, 2, [1])
    assert partition.parts_holding("emb.weight") == frozenset({0, 1})
    assert "emb.weight" in dict(last.named_parameters()) and "emb.weight" in dict(first.named_parameters())
    assert "l2.weight" in dict(last.named_parameters()) and "l2.weight" not in dict(first.named_parameters())


def test_untraceable_forwards_and_impossible_splits_say_what_to_do():
    with pytest.raises(PartitionError, match="nn.ModuleList / nn.Sequential") as error:
        TracePartition(Branchy(), 2, [0])
    assert "control flow" in str(error.value)
    with pytest.raises(PartitionError, match="Cannot split GPT"):  # `if T > block_size` in its forward
        TracePartition(GPT(vocab_size=VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=16), 2, [0])
    with pytest.raises(PartitionError, match="reads parameters at only 8 places"):
        TracePartition(TracedLM(), 9, [0])
    with pytest.raises(PartitionError, match="no call of a module named 'l9'"):
        TracePartition(TracedLM(), 2, [0], split_points=["l9"])
    with pytest.raises(PartitionError, match="not called after the previous"):
        TracePartition(TracedLM(), 3, [0], split_points=["l4", "l2"])


# ----- through Lightning's Trainer on 2 ranks --------------------------------------------------------------------


def _configs():
    return {
        "1f1b": (dict(schedule="1f1b"), {}),
        "gpipe_split_points": (dict(schedule="gpipe", split="trace", split_points=["l4"]), {}),
        "interleaved": (dict(schedule="interleaved"), {}),  # 4 parts on 2 ranks
        "zero_bubble_residual": (dict(schedule="zero_bubble"), {"residual": True}),
        "chimera_residual": (dict(schedule="chimera"), {"residual": True}),
    }


def _eval_loader():
    from parity import token_dataset
    from torch.utils.data import DataLoader

    return DataLoader(token_dataset(8, seed=99), batch_size=4)


def _train_all(rank, world_size, port):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    out = {}
    for name, (kwargs, module_kwargs) in _configs().items():
        trainers = []
        run = Run(steps=4, module_kwargs=module_kwargs)
        losses = fit(run, PipelineStrategy(microbatches=4, **kwargs), world_size, 1, trainers=trainers,
                     module_class=TracedLM)
        val = trainers[0].validate(trainers[0].lightning_module, _eval_loader(), verbose=False)
        out[name] = (losses, val[0]["val_loss"])
    try:
        fit(Run(steps=1), PipelineStrategy(microbatches=2, split="trace"), world_size, 1)  # the demo GPT
    except PartitionError as error:
        out["gpt_error"] = str(error)
    return out


def test_modules_without_blocks_match_a_single_process():
    per_rank = run_on_ranks(_train_all, 2, free_port())
    for name, (_, module_kwargs) in _configs().items():
        trainers = []
        run = Run(steps=4, module_kwargs=module_kwargs)
        reference = fit(run, "auto", 1, 1, trainers=trainers, module_class=TracedLM)
        expected_val = trainers[0].validate(trainers[0].lightning_module, _eval_loader(), verbose=False)
        # Training moves the loss (the deep plain stack learns slowly in 4 steps; the residual one falls fast).
        assert len(reference) == 4 and len(set(reference)) == 4
        for rank in range(2):
            losses, val = per_rank[rank][name]
            assert relative_gap(losses, reference) <= TOL, (name, rank, losses, reference)
            assert val == pytest.approx(expected_val[0]["val_loss"], rel=TOL), name
    assert "Cannot split" in per_rank[0]["gpt_error"] and "nn.ModuleList" in per_rank[0]["gpt_error"]
