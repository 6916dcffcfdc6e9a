"""tp1d below the Trainer: the automatic plan and its errors (no processes), and on 4 gloo ranks in one launch the
collectives and bytes per transformer block against Megatron's formula, parameter bytes per rank, the
vocabulary-parallel loss and logits, and the tensor-parallel nn.MultiheadAttention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

import lightning_par  # noqa: F401  (registers the strategy names)
from helpers import run_on_ranks
from lightning_par import TensorParallel1DStrategy
from lightning_par.demo.model import Block, GPTConfig
from lightning_par.tensor import (
    ColwiseParallel,
    ParallelMultiheadAttention,
    ShardSpec,
    TensorGroup,
    VocabParallelLogits,
    auto_plan,
    parallelize,
    shard_spec,
    sharded_parameter_bytes,
    vocab_parallel_cross_entropy,
)
from parity import RecordingGPT
from tp1d_models import RecordingEncoder, RecordingLlama, RecordingNet

# ----- the automatic plan, in one process --------------------------------------------------------------------------


def _gather(value, spec, group):
    """The whole tensor of a tensor-parallel shard (a collective over ``group``)."""
    from lightning_par.comm.collectives import gather_along_dim

    return spec.unshard(gather_along_dim(value.contiguous(), spec.dim, group))


class _FakeGroup(TensorGroup):
    """A tensor group of ``size`` seen from rank 0, for checks that run before any collective."""

    def __init__(self, size: int) -> None:
        self.group, self.size, self.rank = None, size, 0


def _styles(module, t=2):
    return {name: style.name for name, style in auto_plan(module, t).plan.items()}


def test_auto_plan_recognises_standard_modules():
    gpt = _styles(RecordingGPT())
    assert gpt["model.blocks.0.attn"] == "block" and gpt["model.blocks.0.attn.c_attn"] == "colwise"
    assert gpt["model.blocks.1.mlp.c_proj"] == "rowwise" and gpt["model.blocks"] == "sequence_region"
    assert gpt["model.wte"] == gpt["model.lm_head"] == "vocab" and "model.wpe" not in gpt
    plan = auto_plan(RecordingGPT(), 2).plan
    assert plan["model.blocks.0.attn.c_attn"].segments == (32, 32, 32)
    assert "n_head" in plan["model.blocks.0.attn"].divide

    llama = auto_plan(RecordingLlama(n_kv_heads=2), 2)
    assert llama.plan["model.layers.0.attn"].divide == ("n_heads", "n_kv_heads")
    assert {llama.plan[f"model.layers.0.mlp.{n}"].name for n in ("gate_proj", "up_proj")} == {"colwise"}
    assert llama.plan["model.layers.0.mlp.down_proj"].name == "rowwise"
    assert llama.divisor() == 2  # 4 heads, 2 k/v heads, hidden 48

    enc = _styles(RecordingEncoder())
    assert enc["encoder.layers.0.self_attn"] == "mha" and enc["encoder.layers.0.linear1"] == "colwise"
    assert enc["encoder.layers"] == "sequence_region" and enc["head"] == enc["embed"] == "vocab"


class NormInside(nn.Module):
    """An MLP with a norm between its Linears: sharding would normalise over a slice, so it stays replicated."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class GatedFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.w12, self.w3 = nn.Linear(8, 32), nn.Linear(16, 8)
        self.hidden_dim = 16

    def forward(self, x):
        gate, up = self.w12(x).split(self.hidden_dim, dim=-1)
        return self.w3(F.silu(gate) * up)


def test_output_layer_is_the_last_linear_shaped_like_the_embedding():
    # vocabulary == width: the blocks' square Linears are shaped like the output layer too
    plan = auto_plan(RecordingNet(), 2)
    assert plan.plan["net.to_logits"].name == "vocab" and "net.layers.0.mixer.to_out" not in plan.plan
    assert any("mixer.to_qkv" in note for note in plan.notes)  # unrecognised attention: replicated, said so


def test_auto_plan_leaves_what_it_cannot_shard_replicated_and_says_why():
    plan = auto_plan(NormInside(), 2)
    assert not plan.plan and any("besides its Linears" in n for n in plan.notes)
    fused = auto_plan(GatedFused(), 2).plan
    assert fused[""].divide == ("hidden_dim",) and fused["w12"].segments == 2


def test_indivisible_heads_and_widths_name_the_module_and_the_sizes_that_work():
    with pytest.raises(ValueError, match=r"model\.blocks\.0\.attn: attention heads = 3 .* tensor size 2\. "
                                         r"Tensor sizes that would work: 1, 3\."):
        auto_plan(RecordingGPT(n_head=3, n_embd=48), 2)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: MLP hidden width = 50 .* would work: 1, 2\."):
        auto_plan(RecordingLlama(n_kv_heads=4, hidden=50), 4)
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn: num_heads = 3 .* would work: 1\."):
        auto_plan(RecordingEncoder(dim=48, heads=3), 2)
    # A user plan is checked entry by entry, before anything changes.
    model = nn.Sequential(nn.Linear(8, 33))
    with pytest.raises(ValueError, match=r"0: output features = 33 .* would work: 1, 3, 11, 33"):
        parallelize(model, {"0": ColwiseParallel()}, _FakeGroup(2))
    assert isinstance(model[0], nn.Linear)


def test_plan_errors():
    model = RecordingGPT()
    with pytest.raises(ValueError, match="matches no module"):
        parallelize(model, {"model.nothing.*": "colwise"}, _FakeGroup(2))
    with pytest.raises(ValueError, match="Unknown plan style 'columns'"):
        parallelize(model, {"model.lm_head": "columns"}, _FakeGroup(2))
    with pytest.raises(ValueError, match="applies to nn.Linear, not LayerNorm"):
        parallelize(model, {"model.ln_f": "rowwise"}, _FakeGroup(2))
    with pytest.raises(ValueError, match="model.wte.weight is tied to a parameter that the plan shards"):
        parallelize(RecordingGPT(), {"model.lm_head": "vocab"}, _FakeGroup(2))


def test_shard_spec_round_trip_with_segments_and_padding():
    full = torch.arange(2 * 33.0).reshape(33, 2)
    for spec in (ShardSpec(0, (33,), 4, pad=True), ShardSpec(0, (11, 11, 11), 1), ShardSpec(1, (2,), 2)):
        pieces = [spec.shard(full, r) for r in range(spec.tensor_size)]
        assert all(p.shape == pieces[0].shape for p in pieces)
        assert torch.equal(spec.unshard(torch.cat(pieces, spec.dim)), full)
    q_k_v = torch.arange(12.0)
    assert ShardSpec(0, (4, 4, 4), 2).shard(q_k_v, 1).tolist() == [2, 3, 6, 7, 10, 11]  # rank 1's q, k, v


def test_vocab_parallel_cross_entropy_equals_torch_on_one_rank():
    logits = torch.randn(12, 7, requires_grad=True)
    target = torch.randint(0, 7, (12,))
    target[3] = -100
    for kwargs in (dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.1)):
        ours = vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=7, group=None, **kwargs)
        theirs = F.cross_entropy(logits, target, **kwargs)
        g1, = torch.autograd.grad(ours.sum(), logits)
        g2, = torch.autograd.grad(theirs.sum(), logits)
        assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(g1, g2, atol=1e-6), kwargs
    # A padding column (width 8 for 7 classes) gets zero gradient; the logits themselves are never written.
    padded = torch.cat([logits.detach(), torch.randn(12, 1)], 1).requires_grad_()
    before = padded.detach().clone()
    ours = vocab_parallel_cross_entropy(padded, target, vocab_start=0, vocab_size=7, group=None)
    ours.backward()
    assert torch.equal(padded.detach(), before)
    assert torch.allclose(padded.grad[:, :7], torch.autograd.grad(F.cross_entropy(logits, target), logits)[0],
                          atol=1e-6) and not padded.grad[:, 7].any()
    # The backward reuses the saved probabilities in place: a second backward is refused, not wrong.
    ours = vocab_parallel_cross_entropy(logits, target, vocab_start=0, vocab_size=7, group=None)
    ours.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="Backward ran twice"):
        ours.backward()


def test_a_plan_in_yaml_through_lightning_cli(monkeypatch):
    from lightning_par.cli import build_cli

    monkeypatch.setattr("sys.argv", ["lightning-par"])  # the CLI reads `args`, not pytest's command line

    plan = ('{"model.lm_head": "vocab", "model.blocks.*.attn.c_attn": {"class_path": '
            '"lightning_par.tensor.ColwiseParallel", "init_args": {"segments": 3}}}')
    recipe = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "recipes" / "tp1d.yaml")
    cli = build_cli(args=["--config", recipe, "--trainer.strategy.init_args.plan", plan, "--trainer.devices", "1"],
                    run=False)
    assert cli.trainer.strategy.plan == {"model.lm_head": "vocab",
                                         "model.blocks.*.attn.c_attn": ColwiseParallel(segments=3)}


def test_strategy_arguments_registration_and_topology():
    from lightning.pytorch.strategies import StrategyRegistry

    assert {"tp1d", "tp1d_spawn", "tp1d_fork"} <= set(StrategyRegistry)
    strategy = TensorParallel1DStrategy()
    assert strategy.tensor_size is None and not strategy.sequence_parallel
    trainer = Trainer(strategy="tp1d", accelerator="cpu", devices=4, logger=False)
    assert isinstance(trainer.strategy, TensorParallel1DStrategy)
    assert trainer.strategy.topology.tensor == 4  # no module yet: the whole world
    trainer.strategy.connect(RecordingGPT())  # 2 heads: the largest size that divides the model
    trainer.strategy._default_sizes.clear()
    assert (trainer.strategy.topology.data, trainer.strategy.topology.tensor) == (2, 2)
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}
    with pytest.raises(ValueError, match="tensor_size must be a positive integer"):
        TensorParallel1DStrategy(tensor_size=0)


def test_wrong_tensor_size_for_the_world_fails_before_any_collective():
    trainer = Trainer(strategy=TensorParallel1DStrategy(tensor_size=3), accelerator="cpu", devices=4, logger=False)
    with pytest.raises(ValueError, match=r"tensor=3 = 3 does not divide the world size 4; its divisors are \[1, 2, 4\]"):
        trainer.strategy.setup_environment()
    assert not dist.is_initialized()


# ----- on 4 ranks -----------------------------------------------------------------------------------------------------

B, T, E = 2, 8, 32
FUSED = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor")


class Recorder:
    """Wraps torch.distributed's collectives inside a rank: records (op, elements of the full tensor, bytes/elem)."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self._saved = {}

    def __enter__(self):
        def wrap(name, fn):
            def recorded(*args, **kwargs):
                if name == "all_reduce":
                    t = args[0]
                    self.calls.append(("all_reduce", t.numel(), t.element_size()))
                elif name.startswith("all_gather"):
                    self.calls.append(("all_gather", args[0].numel(), args[0].element_size()))  # output
                else:
                    self.calls.append(("reduce_scatter", args[1].numel(), args[1].element_size()))  # input
                return fn(*args, **kwargs)

            return recorded

        for name in ("all_reduce", *FUSED):
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def ring_bytes(calls, t):
    """Bytes each rank sends in ring algorithms: all-reduce 2(t-1)/t N, all-gather and reduce-scatter (t-1)/t N."""
    factor = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}
    return sum(factor[op] * (t - 1) / t * n * b for op, n, b in calls)


class Stack(nn.Module):
    def __init__(self, n_blocks):
        super().__init__()
        self.blocks = nn.ModuleList(Block(GPTConfig(n_embd=E, n_head=4)) for _ in range(n_blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _count_block_collectives(tg: TensorGroup, sp: bool) -> dict:
    n_blocks = 2
    torch.manual_seed(0)
    stack = Stack(n_blocks)
    plan = auto_plan(stack, tg.size)
    parallelize(stack, plan.plan, tg, sequence_parallel=sp)
    strategy = TensorParallel1DStrategy()
    strategy._lightning_module = stack  # what post_backward reads: the plan kept on the module (no bucketer)
    x = torch.randn(B, T, E, requires_grad=True)
    with Recorder() as rec:
        y = stack(x)
        forward = rec.take()
        y.backward(torch.ones_like(y))
        backward = rec.take()
        with strategy.block_backward_sync():  # an accumulation step: no sum yet
            strategy.post_backward(y)
        accumulating = rec.take()
        strategy.post_backward(y)
        after = rec.take()
    return {"forward": forward, "backward": backward, "accumulating": accumulating, "after": after,
            "n_blocks": n_blocks}


def _check_megatron_formula(tg: TensorGroup) -> None:
    t, bsh = tg.size, B * T * E
    tp, sp = _count_block_collectives(tg, False), _count_block_collectives(tg, True)
    n = tp["n_blocks"]
    # Tensor parallel, per block: one all-reduce of b*s*h after attention and one after the MLP, forward; the same
    # two in backward (at the blocks' inputs: q/k/v read one copied input, as do the MLP's column layers).
    assert sorted(tp["forward"]) == [("all_reduce", bsh, 4)] * (2 * n)
    assert sorted(tp["backward"]) == [("all_reduce", bsh, 4)] * (2 * n)
    # Sequence parallel, per block: each all-reduce becomes an all-gather (block input) and a reduce-scatter (block
    # output) of the same b*s*h elements, forward and backward. Once per stack: the all-gather that ends the region
    # (forward) and the one that mirrors its split (backward).
    boundary = [("all_gather", bsh, 4)]
    assert sorted(sp["forward"]) == sorted([("all_gather", bsh, 4)] * (2 * n) + [("reduce_scatter", bsh, 4)] * (2 * n)
                                           + boundary)
    assert sorted(sp["backward"]) == sorted([("reduce_scatter", bsh, 4)] * (2 * n) + [("all_gather", bsh, 4)] * (2 * n)
                                            + boundary)
    # The gradients of the replicated parameters that saw one sequence shard (2 LayerNorms x (weight, bias) + 2
    # row-parallel biases per block, E elements each) are summed by the strategy's post_backward, not during
    # backward: ONE all-reduce of all of them and a flag each, none on an accumulation step.
    assert sp["accumulating"] == [] and sp["after"] == [("all_reduce", 6 * n * (E + 1), 4)], sp["after"]
    assert tp["accumulating"] == tp["after"] == []
    # Megatron (Korthikanti et al. 2022): per block and pass, 4 (t-1)/t * b*s*h * bytes per rank, the same bytes
    # with and without sequence parallelism.
    formula = 4 * (t - 1) / t * bsh * 4
    for phase in ("forward", "backward"):
        per_block_tp = ring_bytes(tp[phase], t) / n
        per_block_sp = (ring_bytes(sp[phase], t) - ring_bytes(boundary, t)) / n
        assert per_block_tp == pytest.approx(formula) and per_block_sp == pytest.approx(formula), phase


def _check_parameter_bytes(tg: TensorGroup) -> dict:
    out = {}
    for name, make in (("gpt", lambda: RecordingGPT(n_head=4)), ("llama33", lambda: RecordingLlama(n_kv_heads=4))):
        torch.manual_seed(0)
        module = make()
        total_before = sum(p.numel() * p.element_size() for p in module.parameters())
        parallelize(module, auto_plan(module, tg.size).plan, tg)
        local, full = sharded_parameter_bytes(module)
        total_after = sum(p.numel() * p.element_size() for p in module.parameters())
        out[name] = (local, full, total_before, total_after)
    return out


def _check_vocab_parallel_logits(tg: TensorGroup) -> None:
    torch.manual_seed(1)
    vocab, t, rank = 33, tg.size, tg.rank
    spec = ShardSpec(2, (vocab,), t, pad=True)
    full = torch.randn(4, 5, vocab)
    target = torch.randint(0, vocab, (4, 5))
    target[0, 1] = -100

    def pair():
        ref = full.clone().requires_grad_()
        local = spec.shard(full, rank).requires_grad_()
        return ref, local, VocabParallelLogits.wrap(local * 1.0, tg.group, vocab, rank * spec.local_size)

    def ce(x, **kwargs):  # what a training_step writes
        return F.cross_entropy(x.reshape(-1, x.size(-1)).float(), target.reshape(-1), **kwargs)

    for kwargs in (dict(), dict(label_smoothing=0.1), dict(reduction="none"), dict(reduction="sum")):
        ref, local, logits = pair()
        assert logits.shape == (4, 5, vocab) and logits.size(-1) == vocab and len(logits) == 4
        ours, theirs = ce(logits, **kwargs), ce(ref, **kwargs)
        assert not isinstance(ours, VocabParallelLogits) and logits._full is None  # never gathered
        assert torch.allclose(ours, theirs, atol=1e-6), kwargs
        ours.sum().backward()
        theirs.sum().backward()
        expected = spec.shard(ref.grad, rank)
        assert torch.allclose(local.grad, expected, atol=1e-6), kwargs
    # Anything else sees the full, unpadded tensor; afterwards the tensor is that full tensor (in-place included).
    ref, local, logits = pair()
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert torch.allclose(torch.softmax(logits, -1), torch.softmax(ref, -1))
    assert torch.equal(logits[:, -1], ref[:, -1].detach())
    logits.div_(2.0)
    assert torch.allclose(ce(logits), ce(ref / 2.0), atol=1e-6)


def _check_multihead_attention(tg: TensorGroup) -> None:
    torch.manual_seed(2)
    heads, e, tq, s, b = 4, 16, 8, 6, 2
    for batch_first in (False, True):
        ref = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        par = ParallelMultiheadAttention(copy.deepcopy(ref), tg)
        layout = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1).contiguous())
        x = layout(torch.randn(b, tq, e))
        memory = layout(torch.randn(b, s, e))
        causal = nn.Transformer.generate_square_subsequent_mask(tq)
        per_head = torch.randn(b * heads, tq, tq)
        padding = torch.zeros(b, s, dtype=torch.bool)
        padding[1, -2:] = True
        calls = [
            lambda m, q: m(q, q, q, attn_mask=causal, is_causal=True, need_weights=False),
            lambda m, q: m(q, q, q, attn_mask=per_head),  # 3-D mask: each rank keeps its heads' slice
            lambda m, q: m(q, memory, memory, key_padding_mask=padding, average_attn_weights=False),
            lambda m, q: m(q[0] if not batch_first else q[:, 0], memory[0] if not batch_first else memory[:, 0],
                           memory[0] if not batch_first else memory[:, 0]),  # unbatched
        ]
        for call in calls:
            q1, q2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            (y1, w1), (y2, w2) = call(ref, q1), call(par, q2)
            assert torch.allclose(y1, y2, atol=1e-5)
            assert (w1 is None) == (w2 is None) and (w1 is None or torch.allclose(w1, w2, atol=1e-6))
            y1.square().sum().backward()
            y2.square().sum().backward()
            assert torch.allclose(q1.grad, q2.grad, atol=1e-5)
            for name, p in par.named_parameters():
                g = _gather(p.grad, shard_spec(p), tg.group) if shard_spec(p) is not None else p.grad
                assert torch.allclose(g, dict(ref.named_parameters())[name].grad, atol=1e-5), name
            ref.zero_grad(), par.zero_grad()
    # Sequence parallel: the query arrives split along the sequence and leaves the same way.
    ref = nn.MultiheadAttention(e, heads)
    par = ParallelMultiheadAttention(copy.deepcopy(ref), tg, seq_dim=0)
    x = torch.randn(tq, b, e)
    chunk = tq // tg.size
    mine = x[tg.rank * chunk:(tg.rank + 1) * chunk].clone().requires_grad_()
    full = x.clone().requires_grad_()
    y_ref = ref(full, full, full, need_weights=False)[0]
    y_par = par(mine, mine, mine, need_weights=False)[0]
    assert torch.allclose(y_par, y_ref[tg.rank * chunk:(tg.rank + 1) * chunk], atol=1e-5)
    y_ref.square().sum().backward()
    y_par.square().sum().backward()
    assert torch.allclose(mine.grad, full.grad[tg.rank * chunk:(tg.rank + 1) * chunk], atol=1e-5)


def _check_linear_options(tg: TensorGroup) -> None:
    from lightning_par.tensor import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(3)
    linear = nn.Linear(8, 24)
    x = torch.randn(3, 8)
    fused = ColumnParallelLinear.from_linear(copy.deepcopy(linear), tg, segments=3, gather_output=True)
    assert torch.allclose(fused(x), linear(x), atol=1e-6)  # gathered back in the [q; k; v] layout
    row = RowParallelLinear.from_linear(copy.deepcopy(linear), tg, input_is_parallel=False)
    x2 = torch.randn(3, 8)
    assert torch.allclose(row(x2), linear(x2), atol=1e-6)


def _on_four_ranks(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {4: TensorGroup(None), 2: TensorGroup(halves[rank // 2])}
    out = {}
    for t, tg in groups.items():
        _check_megatron_formula(tg)
        out[t] = _check_parameter_bytes(tg)
    _check_linear_options(groups[4])
    _check_vocab_parallel_logits(groups[4])
    _check_multihead_attention(groups[4])
    _check_multihead_attention(groups[2])
    return out


def test_collectives_bytes_loss_and_attention_on_four_ranks():
    per_rank = run_on_ranks(_on_four_ranks, 4)
    for t in (2, 4):
        for name in ("gpt", "llama33"):
            local, full, before, after = per_rank[0][t][name]
            # Measured bytes of the sharded layers on each rank: 1/t of the same layers unsharded (vocabulary 33
            # pads to a multiple of t: a few rows more).
            assert all(r[t][name][0] == local for r in per_rank)
            if name == "gpt":
                assert local * t == full
            else:
                assert local * t == pytest.approx(full, rel=0.1) and local * t >= full
            assert after < before
