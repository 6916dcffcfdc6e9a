"""The executor on gloo ranks: every schedule's gradients (after summing shared parameters) and outputs equal one
process's backward over the same batch; the I/W split (W: the deferred weight matmuls) equals a full
backward in one process."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers import run_on_ranks
from lightning_par.demo.model import GPT, Block, GPTConfig
from lightning_par.pipeline import build_schedule
from lightning_par.pipeline.executor import PipelineExecutor
from lightning_par.pipeline.partition import Partition, StageExit, choose_split_points, find_blocks
from lightning_par.pipeline.shared import SharedGradients, canonical_names, parameter_holders
from lightning_par.pipeline.split_backward import DeferMatmulWeights, explain_checkpoint_errors
from lightning_par.pipeline.weight_casts import CastLinearWeights, CastWeightsOnce, StepCasts
from lightning_par.tensor.deferred_grads import DeferredWeightGrads

BATCH, SEQ, VOCAB = 8, 8, 32


def _model():
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, block_size=SEQ, n_layer=8, n_head=2, n_embd=16)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _configs(p):
    """(name, schedule, microbatches, chunks, defer_weights)"""
    yield "1f1b", "1f1b", 4, 1, False
    yield "1f1b_deferred", "1f1b", 4, 1, True  # weight gradients after the send, outside autograd
    yield "gpipe", "gpipe", 4, 1, False
    yield "interleaved", "interleaved", 2 * p, 2, False
    yield "zero_bubble", "zero_bubble", 2 * p, 1, False
    if p % 2 == 0:
        yield "chimera_deferred", "chimera", 2 * p if 2 * p <= BATCH else p, 1, True


def _train_every_schedule(rank, world_size):
    out = {}
    idx, target = _data()
    for name, kind, m, chunks, defer in _configs(world_size):
        schedule = build_schedule(kind, world_size, m, chunks)
        model = _model()
        layout = find_blocks(model)
        canonical = canonical_names(model)
        partition = Partition(model, layout, choose_split_points(model, layout, schedule.parts),
                              schedule.parts_of(rank))
        shared = SharedGradients(model, canonical, parameter_holders(canonical, partition, schedule), rank,
                                 dist.group.WORLD)
        xs, ys = idx.chunk(m), target.chunk(m)

        def forward(stage, mb, received):
            with partition.stage(schedule.stage_part[stage], received):
                try:
                    return model(xs[mb])
                except StageExit as stop:
                    return stop.output

        def loss(stage, mb, logits):
            return F.cross_entropy(logits.reshape(-1, VOCAB), ys[mb].reshape(-1)) / m

        results = PipelineExecutor(schedule, rank, dist.group.WORLD, defer_weights=defer).run(
            forward, loss, params=lambda stage: list(model.parameters()))
        shared.sum_()
        grads = {}
        for alias, p in model.named_parameters(remove_duplicate=False):
            grads[canonical[alias]] = p.grad.clone()
        out[name] = (grads, results)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_schedule_gives_the_single_process_gradients(world_size):
    per_rank = run_on_ranks(_train_every_schedule, world_size)
    idx, target = _data()
    reference = _model()
    logits = reference(idx)
    F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    for name, _, m, _, _ in _configs(world_size):
        seen = set()
        outputs = {}
        for rank in range(world_size):
            grads, results = per_rank[rank][name]
            for param, grad in grads.items():
                # fp32, different summation order (per microbatch, then across holders): a few ulps.
                torch.testing.assert_close(grad, expected[param], rtol=1e-4, atol=1e-6, msg=f"{name} {param}")
                seen.add(param)
            outputs.update(results)
        assert seen == set(expected), (name, set(expected) - seen)
        assert sorted(outputs) == list(range(m)), name
        torch.testing.assert_close(torch.cat([outputs[i] for i in range(m)]), logits.detach(), rtol=1e-5, atol=1e-6)


def _split(stage, params, inputs, grad_fn):
    """Forward under DeferMatmulWeights, then I (backward with the store taking weight gradients); returns W."""
    mode = DeferMatmulWeights(params, StepCasts())
    weights = mode.store = DeferredWeightGrads()
    with mode:
        out = stage(*inputs)
    weights.active = True
    out.backward(grad_fn(out))
    weights.active = False
    return weights


def test_split_backward_equals_a_full_backward():
    torch.manual_seed(0)
    stage = torch.nn.Sequential(Block(GPTConfig(n_embd=16, n_head=2)), torch.nn.LayerNorm(16))
    reference = copy.deepcopy(stage)
    x = torch.randn(2, 5, 16, requires_grad=True)
    grad = torch.randn(2, 5, 16)
    reference(x).backward(grad)
    hooked = stage[0].attn.c_proj.weight  # a gradient bucket's hook: its gradient must come through autograd, in I
    fired = []
    hooked.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    x2 = x.detach().requires_grad_()
    weights = _split(stage, stage.parameters(), [x2], lambda out: grad)
    torch.testing.assert_close(x2.grad, x.grad)
    linear_weights = {m.weight for m in stage.modules() if isinstance(m, torch.nn.Linear)} - {hooked}
    assert len(linear_weights) == 3
    for name, p in stage.named_parameters():  # I: all but the linear weights (W's matmuls)
        assert (p.grad is None) == (p in linear_weights), name
    assert fired == [hooked]
    weights.run()
    for (name, p), q in zip(stage.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class _Conv1D(torch.nn.Module):
    """Hugging Face GPT-2's layer: weight stored (in, out), computed with torch.addmm."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out))
        self.bias = torch.nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


def test_split_backward_of_a_parameter_used_twice_a_conv1d_a_tied_head_and_autocast():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(4, 4), _Conv1D(4, 4)
    params = [*lin.parameters(), *conv.parameters()]

    def stage(x):  # lin used twice; the head reuses lin's weight through F.linear with keywords
        h = conv(torch.tanh(lin(torch.tanh(lin(x)))))
        return F.linear(input=h, weight=lin.weight) * 2

    x = torch.randn(3, 4, requires_grad=True)
    stage(x).sum().backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    x2 = x.detach().requires_grad_()
    weights = _split(stage, params, [x2], torch.ones_like)
    assert lin.weight.grad is None and conv.weight.grad is None and conv.bias.grad is not None
    weights.run()
    torch.testing.assert_close(x2.grad, x.grad)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    # Under autocast the deferred matmuls compute in bf16 as F.linear / addmm would; the gradients keep fp32.
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stage(x).float().sum().backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = _split(stage, params, [x.detach()], lambda out: torch.ones_like(out))
    weights.run()
    for p, g in zip(params, expected):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, g, rtol=2e-2, atol=2e-2)


def test_split_backward_under_activation_checkpointing():

    torch.manual_seed(0)
    block = Block(GPTConfig(n_embd=16, n_head=2))
    reference = copy.deepcopy(block)
    x = torch.randn(2, 5, 16, requires_grad=True)
    reference(x).sum().backward()
    # Reentrant: the forward runs without grad (nothing deferred), backward recomputes with the plain ops.
    weights = _split(lambda x: checkpoint(block, x, use_reentrant=True), block.parameters(), [x], torch.ones_like)
    weights.run()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # Non-reentrant: the recomputation cannot match a forward whose weights were detached; the error says so.
    with pytest.raises(RuntimeError, match="use_reentrant=True"), explain_checkpoint_errors("schedule='zero_bubble'"):
        _split(lambda x: checkpoint(block, x, use_reentrant=False), block.parameters(), [x], torch.ones_like)


@pytest.mark.parametrize("kind", ["module_hooks", "function_mode"])
def test_weights_are_cast_once_per_step_and_only_under_grad_mode(kind):
    torch.manual_seed(0)
    stage = torch.nn.Sequential(Block(GPTConfig(n_embd=16, n_head=2)), torch.nn.LayerNorm(16))
    reference = copy.deepcopy(stage)
    xs = [torch.randn(2, 5, 16) for _ in range(2)]
    casts = StepCasts()
    if kind == "module_hooks":  # the executor's: one per stage and step, closed at the step's end
        mode = CastLinearWeights(list(stage.modules()), stage.parameters(), casts)
    else:  # the base of zero bubble's DeferMatmulWeights
        mode = CastWeightsOnce(stage.parameters(), casts)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # as Lightning's bf16-mixed
        for x in xs:  # two microbatches, a backward each
            reference(x).float().sum().backward()
        with torch.no_grad(), mode:
            stage(xs[0])  # no_grad: nothing cached (a cast without a graph would lose the weight's gradient)
        assert not casts._casts
        for x in xs:
            with mode:
                out = stage(x)
            out.float().sum().backward()
    if kind == "module_hooks":
        mode.close()
        linears = [m for m in stage.modules() if isinstance(m, torch.nn.Linear)]
        assert all(not m._forward_pre_hooks and not m._forward_hooks and "weight" not in m.__dict__ for m in linears)
        assert all(m.weight is m._parameters["weight"] for m in linears)  # the parameter again, not its cast
    linear_weights = [m.weight for m in stage.modules() if isinstance(m, torch.nn.Linear)]
    assert set(casts._casts) == {id(w) for w in linear_weights}  # one cast each, shared by both microbatches
    for (name, p), q in zip(stage.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    with torch.no_grad():
        linear_weights[0].mul_(2)  # changed in place: cast again
    stale = casts._casts[id(linear_weights[0])][1]
    assert casts.get(linear_weights[0], torch.bfloat16) is not stale


def test_weight_casts_of_linear_layers_under_non_reentrant_checkpointing():
    # The recomputation in backward runs outside the hooks (autocast casts the weight itself there): same dtype and
    # shape as the step's cast, so checkpointing accepts it, and the gradients are those of a plain run.
    torch.manual_seed(0)
    block = Block(GPTConfig(n_embd=16, n_head=2))
    reference = copy.deepcopy(block)
    x = torch.randn(2, 5, 16)
    casts = StepCasts()
    mode = CastLinearWeights(list(block.modules()), block.parameters(), casts)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        reference(x).float().sum().backward()
        with mode:
            out = checkpoint(block, x, use_reentrant=False)
        out.float().sum().backward()
    mode.close()
    assert casts._casts  # the forward did use the step's casts
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def _share_steps(rank: int, world_size: int) -> list:
    """Five steps of a 2-stage pipeline's output sharing: rank 1 (the last stage) finished both microbatches."""
    from lightning_par.pipeline.steps import OutputExchange, StepRecorder

    group = dist.group.WORLD
    exchange = OutputExchange()
    calls = []
    saved = dist.all_gather_object

    def spy(*args, **kwargs):
        calls.append(1)
        return saved(*args, **kwargs)

    dist.all_gather_object = spy
    seen = []
    try:
        for step in range(5):
            recorder = StepRecorder(module=None)
            results = {}
            if rank == 1:
                results = {m: {"loss": torch.tensor(step + m / 2), "n": torch.tensor([m, step])} for m in (0, 1)}
                value = 0.5 * step if step == 2 else torch.tensor(float(step))  # step 2 logs a Python float
                recorder.logs = {m: [("train_loss", value, (), {"prog_bar": True})] for m in (0, 1)}
            before = len(calls)
            outputs = recorder.share(results, group, 2, torch.device("cpu"), exchange, group)
            assert sorted(outputs) == [0, 1]
            assert float(outputs[1]["loss"]) == step + 0.5 and outputs[1]["n"].tolist() == [1, step]
            assert outputs[1]["n"].dtype == torch.int64
            name, value, args, kwargs = recorder.logs[0][0]
            assert (name, float(value), kwargs) == ("train_loss", 0.5 * step if step == 2 else float(step),
                                                    {"prog_bar": True})
            seen.append("objects" if len(calls) > before else "device")
    finally:
        dist.all_gather_object = saved
    return seen


def test_step_outputs_are_shared_on_the_device_once_their_shapes_repeat():
    # Step 0 records the skeletons; 1 uses the device path; 2 logs a Python number (object path, re-recorded, and
    # no rank hangs waiting for the other's path); 3 records again; 4 is back on the device path.
    expected = ["objects", "device", "objects", "objects", "device"]
    assert run_on_ranks(_share_steps, 2) == [expected, expected]
