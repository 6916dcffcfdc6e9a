"""The automatic plan: recognise the tensor-parallel structure of a standard module by its shapes, without changes to
its code.

What it recognises (the plan it writes uses the styles of plan.py):

- an **attention block**: a module with an integer head-count attribute (``n_head``, ``num_heads``, ...) whose
  direct ``nn.Linear`` children are, in registration order, q/k/v projections (one fused, q + fused kv, or three
  separate; grouped-query widths allowed) followed by the output projection. Heads are split across ranks: the
  projections become column-parallel (a fused one split per q/k/v segment), the output row-parallel, and the head
  count and q/k/v widths it holds in attributes are divided by the tensor size.
- an **MLP block**: a module with two ``nn.Linear`` (``E -> F -> E``, or a fused gate/up ``E -> 2F -> E``) or three
  (gate and up ``E -> F``, down ``F -> E``; with ``E == F`` the down projection is found by name, else the last).
- ``nn.MultiheadAttention`` (replaced by :class:`ParallelMultiheadAttention`) and the feed-forward of
  ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``.
- the **output layer** (an ``nn.Linear`` tied to an ``nn.Embedding``, or shaped like one) and that embedding,
  both vocabulary-parallel; without an output layer, the largest embedding table.
- **sequence-parallel regions**: ``nn.ModuleList`` / ``nn.Sequential`` whose every element contains a sharded block.

A block must hold no parameters besides its Linears: a norm or scale between a column- and a row-parallel layer
would see only this rank's part, so such modules are left replicated (and said so in the plan's notes). What it
assumes and cannot check: between a block's column and row layers the block only does per-head or elementwise work
(attention, activations, gating), and a fused q/k/v output is laid out ``[q; k; v]`` (``chunk(3)`` / ``split``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from lightning_par.tensor.layers_1d import linear_dims
from lightning_par.tensor.styles import (
    ColwiseParallel,
    ParallelAttention,
    ParallelBlock,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallelRegion,
    VocabParallel,
    divisors,
    indivisible,
)

HEAD_ATTRS = ("n_head", "n_heads", "num_heads", "num_attention_heads", "nhead", "n_heads_q", "heads", "num_head")
KV_HEAD_ATTRS = ("n_kv_head", "n_kv_heads", "num_kv_heads", "num_key_value_heads", "n_head_kv", "kv_heads")
# Widths that an attention module may read as "all my heads together" (reshapes, splits).
ATTN_WIDTH_ATTRS = ("n_embd", "embed_dim", "hidden_size", "d_model", "all_head_size", "inner_dim", "dim", "width",
                    "n_state", "model_dim", "emb_dim", "embedding_dim", "attn_dim", "q_dim", "kv_dim", "kv_width")
MLP_WIDTH_ATTRS = ("intermediate_size", "hidden_dim", "ffn_dim", "d_ff", "dim_feedforward", "inner_dim", "n_inner",
                   "ff_dim", "mlp_dim", "hidden_features", "ffn_hidden_size")
DOWN_NAMES = ("down_proj", "down", "w2", "c_proj", "fc2", "dense_4h_to_h", "proj", "out_proj", "wo", "linear2")

# ----- Hugging Face attention (see [Note: Hugging Face attention]) -----
OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj", "attn_out")
# The layout of a fused q/k/v projection, by ``config.model_type``: "concat" = ``[q; k; v]`` (split / chunk of the
# whole output), "per_head" = per head ``[q_h, k_h, v_h]`` (viewed as ``(..., heads, 3 * head_dim)``). Only families
# whose forward then finds the local heads by itself (``-1`` heads, or attributes the plan divides) are listed: Phi-3
# slices its ``qkv_proj`` output by ``config.num_attention_heads * head_dim`` (the shared config, not divided), so it
# is left replicated with a note, as is any family not listed (write a plan).
FUSED_QKV_LAYOUT = {"gpt2": "concat", "gpt_neox": "per_head"}
# Integer attributes a Hugging Face attention declares as the width of all its heads together (read by its forward
# to split the fused output: GPT-2's ``split_size``; BERT-style ``all_head_size``): divided by the tensor size.
HF_HEADS_WIDTH_ATTRS = ("split_size", "all_head_size")


@dataclass
class _Lin:
    """A Linear-like child: ``nn.Linear`` or Hugging Face ``Conv1D`` (weight stored transposed)."""

    module: nn.Module
    in_features: int
    out_features: int

    def parameters(self):
        return self.module.parameters()


@dataclass(frozen=True)
class Constraint:
    module: str
    what: str
    value: int


@dataclass
class AutoPlan:
    plan: dict[str, ParallelStyle] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    #: repeated blocks of which the plan shards nothing: (list name, block class, count, notes about them)
    unsharded_blocks: list[tuple[str, str, int, list[str]]] = field(default_factory=list)

    def strict_error(self) -> Optional[str]:
        """The message ``tp1d(strict=True)`` refuses with when a list of repeated blocks stays whole, else None."""
        if not self.unsharded_blocks:
            return None
        lines = []
        for name, cls, count, notes in self.unsharded_blocks:
            lines.append(f"the automatic plan shards nothing in the {count} repeated {cls} blocks of {name!r}, so "
                         f"every rank would hold and compute them whole")
            lines += [f"  - {n}" for n in notes[:4]]
        return ("tp1d: " + "\n".join(lines) + "\nGive a plan for them: TensorParallel1DStrategy(plan={...}) with "
                "'colwise' / 'rowwise' entries for the Linears of each block and 'block' for the block (see "
                "docs/tp1d.md, \"Writing a plan\"), or pass strict=False to train with these blocks replicated.")

    def divisor(self) -> int:
        """The largest number that every sharded size is a multiple of (0 when nothing constrains)."""
        return math.gcd(*(c.value for c in self.constraints)) if self.constraints else 0

    def check(self, tensor_size: int) -> None:
        """Raise, naming the module and the tensor sizes that would work for the whole model, unless
        ``tensor_size`` divides every head count and width the plan splits."""
        for c in self.constraints:
            if c.value % tensor_size:
                raise indivisible(c.module, c.what, c.value, tensor_size, divisors(self.divisor()))


def _join(name: str, child: str) -> str:
    return f"{name}.{child}" if name else child


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> Optional[tuple[str, int]]:
    for name in names:
        value = module.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _attrs_equal(module: nn.Module, names: tuple[str, ...], values: set[int]) -> list[str]:
    return [n for n in names if isinstance(module.__dict__.get(n), int) and not isinstance(module.__dict__.get(n), bool)
            and module.__dict__[n] in values]


class _Planner:
    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.out = AutoPlan()
        self.claimed: set[int] = set()

    def entry(self, name: str, style: ParallelStyle, reason: str, module: nn.Module) -> None:
        self.out.plan[name] = style
        self.out.reasons[name] = reason
        self.claimed.add(id(module))

    def note(self, text: str) -> None:
        self.out.notes.append(text)

    def constrain(self, module: str, what: str, value: int) -> None:
        self.out.constraints.append(Constraint(module, what, value))

    def run(self) -> AutoPlan:
        for name, module in self.root.named_modules():
            if id(module) in self.claimed:
                continue
            if isinstance(module, nn.MultiheadAttention):
                self.mha(name, module)
            elif isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                self.transformer_layer(name, module)
            elif not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                linears = [(n, _Lin(c, *dims[:2])) for n, c in module.named_children()
                           if (dims := linear_dims(c)) is not None]
                if len(linears) >= 2:
                    self.block(name, module, linears)
        self.vocabulary()
        self.regions()
        self.repeated()
        return self.out

    def repeated(self) -> None:
        """Lists of two or more blocks of one class holding Linears, none of which the plan touches."""
        planned = [n for n, st in self.out.plan.items() if not isinstance(st, SequenceParallelRegion)]
        for name, m in self.root.named_modules():
            if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
                continue
            classes = {type(c) for c in m}
            if len(classes) != 1 or not any(linear_dims(x) is not None or isinstance(x, nn.MultiheadAttention)
                                            for x in m[0].modules()):
                continue  # not blocks with layers a plan could cut (a list of norms, of embeddings, ...)
            prefix = f"{name}." if name else ""
            if any(p.startswith(prefix) for p in planned):
                continue
            if any(name.startswith(u + ".") for u, *_ in self.out.unsharded_blocks):
                continue
            notes = [n for n in self.out.notes if n.startswith(prefix)]
            self.out.unsharded_blocks.append((name, type(m[0]).__name__, len(m), notes))

    # ----- torch's own modules --------------------------------------------------------------------------------

    def mha(self, name: str, m: nn.MultiheadAttention) -> None:
        self.claimed.update(id(c) for c in m.modules())
        if m.bias_k is not None or m.add_zero_attn:
            self.note(f"{name}: nn.MultiheadAttention with add_bias_kv / add_zero_attn is left replicated.")
            return
        self.entry(name, ParallelAttention(), f"nn.MultiheadAttention, {m.num_heads} heads", m)
        self.constrain(name, "num_heads", m.num_heads)

    def transformer_layer(self, name: str, m: nn.Module) -> None:
        self.entry(_join(name, "linear1"), ColwiseParallel(), "feed-forward in", m.linear1)
        self.entry(_join(name, "linear2"), RowwiseParallel(), "feed-forward out", m.linear2)
        self.constrain(_join(name, "linear1"), "dim_feedforward", m.linear1.out_features)

    # ----- user blocks ------------------------------------------------------------------------------------------

    def block(self, name: str, m: nn.Module, linears: list[tuple[str, _Lin]]) -> None:
        if _hf_heads(m) is not None:
            found = self.hf_attention(name, m, linears)
        else:
            heads = _int_attr(m, HEAD_ATTRS)
            found = self.attention(name, m, linears, heads) if heads else self.mlp(name, m, linears)
        if not found:
            return
        linear_params = {id(p) for _, lin in linears for p in lin.parameters()}
        extra = [n for n, p in m.named_parameters() if id(p) not in linear_params]
        if extra:
            self.note(f"{name}: holds parameters besides its Linears ({', '.join(extra[:3])}); a norm or scale "
                      f"between a column- and a row-parallel layer would see only this rank's part, so it is left "
                      f"replicated (write a plan to shard it).")
            return
        style, reason, children, constraints = found
        self.entry(name, style, reason, m)
        for child, child_style, why in children:
            self.entry(_join(name, child), child_style, why, getattr(m, child))
        if len(linears) > len(children):
            self.note(f"{name}: {', '.join(n for n, _ in linears if n not in {c[0] for c in children})} left "
                      f"replicated inside a sharded block.")
        for what, value in constraints:
            self.constrain(name, what, value)

    def attention(self, name: str, m: nn.Module, linears: list[tuple[str, nn.Linear]], heads: tuple[str, int]):
        head_attr, n_heads = heads
        *ins, (out_name, out) = linears
        q_width = out.in_features
        if q_width % n_heads or len({lin.in_features for _, lin in ins}) != 1:
            self.note(f"{name}: has {head_attr}={n_heads} but its Linears are not q/k/v projections and an output "
                      f"projection of matching widths; left replicated.")
            return None
        head_dim = q_width // n_heads
        outs = [lin.out_features for _, lin in ins]
        children = []
        if len(ins) == 1 and outs[0] > q_width and (outs[0] - q_width) % 2 == 0:
            kv = (outs[0] - q_width) // 2
            children.append((ins[0][0], ColwiseParallel(segments=(q_width, kv, kv)), "fused q/k/v"))
            layout = "fused q/k/v"
        elif len(ins) == 2 and outs[0] == q_width and outs[1] % 2 == 0:
            kv = outs[1] // 2
            children += [(ins[0][0], ColwiseParallel(), "q"), (ins[1][0], ColwiseParallel(segments=(kv, kv)), "fused k/v")]
            layout = "q + fused k/v"
        elif len(ins) == 3 and outs[0] == q_width and outs[1] == outs[2]:
            kv = outs[1]
            children += [(n, ColwiseParallel(), role) for (n, _), role in zip(ins, ("q", "k", "v"))]
            layout = "separate q/k/v"
        else:
            self.note(f"{name}: has {head_attr}={n_heads} but its Linears do not form q/k/v + output; left replicated.")
            return None
        if kv % head_dim:
            self.note(f"{name}: key/value width {kv} is not a multiple of the head width {head_dim}; left replicated.")
            return None
        kv_heads = kv // head_dim
        declared = _int_attr(m, KV_HEAD_ATTRS)
        if declared is not None and declared[1] != kv_heads:
            self.note(f"{name}: {declared[0]}={declared[1]} but the k/v widths give {kv_heads} heads; left replicated.")
            return None
        children.append((out_name, RowwiseParallel(), "output projection"))
        divide = (_attrs_equal(m, HEAD_ATTRS, {n_heads}) + _attrs_equal(m, KV_HEAD_ATTRS, {kv_heads})
                  + _attrs_equal(m, ATTN_WIDTH_ATTRS, {q_width, kv}))
        reason = f"attention, {layout}, {n_heads} heads" + (f" ({kv_heads} k/v heads)" if kv_heads != n_heads else "")
        constraints = [("attention heads", n_heads)] + ([("key/value heads", kv_heads)] if kv_heads != n_heads else [])
        return ParallelBlock(divide=tuple(divide)), reason, children, constraints

    def hf_attention(self, name: str, m: nn.Module, linears: list[tuple[str, _Lin]]):
        """A Hugging Face attention: see [Note: Hugging Face attention]."""
        n_heads, kv_heads, head_dim, model_type = _hf_heads(m)
        q_width, kv = n_heads * head_dim, kv_heads * head_dim
        kind = type(m).__name__
        outs = [(n, lin) for n, lin in linears if n in OUT_PROJ_NAMES and lin.in_features == q_width]
        if not outs:
            self.note(f"{name} ({kind}): {n_heads} heads of {head_dim}, but no output projection of input width "
                      f"{q_width} among {', '.join(n for n, _ in linears)}; left replicated.")
            return None
        out_name, out = outs[-1]
        ins = [(n, lin) for n, lin in linears if n != out_name]
        widths = [lin.out_features for _, lin in ins]
        children = []
        if len(ins) == 3 and widths == [q_width, kv, kv]:
            children += [(n, ColwiseParallel(), role) for (n, _), role in zip(ins, ("q", "k", "v"))]
            layout = "separate q/k/v"
        elif len(ins) == 1 and widths == [q_width + 2 * kv]:
            fused = FUSED_QKV_LAYOUT.get(model_type)
            if fused == "concat":
                children.append((ins[0][0], ColwiseParallel(segments=(q_width, kv, kv)), "fused q/k/v, [q; k; v]"))
            elif fused == "per_head" and kv_heads == n_heads:
                children.append((ins[0][0], ColwiseParallel(), "fused q/k/v, interleaved per head"))
            else:
                self.note(f"{name} ({kind}): fused q/k/v projection {ins[0][0]} whose layout is not known for "
                          f"model_type {model_type!r} ([q; k; v] or per head); left replicated (write a plan).")
                return None
            layout = f"fused q/k/v ({fused})"
        else:
            self.note(f"{name} ({kind}): {n_heads} heads ({kv_heads} k/v) of {head_dim}, but its projections "
                      f"{', '.join(f'{n}->{w}' for (n, _), w in zip(ins, widths))} are not q/k/v of widths "
                      f"{q_width}/{kv}/{kv} (or one fused); left replicated.")
            return None
        children.append((out_name, RowwiseParallel(), "output projection"))
        divide = (_attrs_equal(m, HEAD_ATTRS, {n_heads}) + _attrs_equal(m, KV_HEAD_ATTRS, {kv_heads})
                  + _attrs_equal(m, HF_HEADS_WIDTH_ATTRS, {q_width}))
        reason = (f"{kind}, {layout}, {n_heads} heads" + (f" ({kv_heads} k/v heads)" if kv_heads != n_heads else ""))
        constraints = [("attention heads", n_heads)] + ([("key/value heads", kv_heads)] if kv_heads != n_heads else [])
        return ParallelBlock(divide=tuple(divide)), reason, children, constraints

    def mlp(self, name: str, m: nn.Module, linears: list[tuple[str, _Lin]]):
        if len(linears) == 2:
            (a_name, a), (b_name, b) = linears
            if a.in_features == b.out_features and a.out_features == b.in_features:
                children, hidden = [(a_name, ColwiseParallel(), "in")], a.out_features
            elif a.in_features == b.out_features and a.out_features == 2 * b.in_features:
                children, hidden = [(a_name, ColwiseParallel(segments=2), "fused gate/up")], b.in_features
            else:
                return None
            children.append((b_name, RowwiseParallel(), "out"))
        elif len(linears) == 3:
            downs = [i for i, (_, d) in enumerate(linears)
                     if all(o.in_features == d.out_features and o.out_features == d.in_features
                            for j, (_, o) in enumerate(linears) if j != i)]
            if not downs:
                return None
            named_down = [i for i in downs if linears[i][0] in DOWN_NAMES]
            down = named_down[0] if named_down else downs[-1]
            children = [(n, ColwiseParallel(), "gate/up") for i, (n, _) in enumerate(linears) if i != down]
            children.append((linears[down][0], RowwiseParallel(), "down"))
            hidden = linears[down][1].in_features
        else:
            return None
        width = linears[0][1].in_features
        divide = _attrs_equal(m, MLP_WIDTH_ATTRS, {hidden}) if hidden != width else []
        reason = f"MLP, {len(linears)} Linears, hidden width {hidden}"
        return ParallelBlock(divide=tuple(divide)), reason, children, [("MLP hidden width", hidden)]

    # ----- vocabulary and regions -------------------------------------------------------------------------------

    def vocabulary(self) -> None:
        named = list(self.root.named_modules())
        embeddings = [(n, m) for n, m in named if isinstance(m, nn.Embedding) and id(m) not in self.claimed]
        linears = [(n, m) for n, m in named if isinstance(m, nn.Linear) and id(m) not in self.claimed]
        # An output layer shares its weight with the token embedding, or else is the *last* Linear shaped like one
        # (hidden -> num_embeddings; registration order puts the head after the blocks, whose own Linears may have
        # the same shape when the vocabulary equals the width).
        pairs = [(ln, lin, en, e, True) for ln, lin in linears for en, e in embeddings if e.weight is lin.weight]
        for en, e in embeddings:
            if any(p[3] is e for p in pairs):
                continue
            shaped = [(ln, lin) for ln, lin in linears if not any(p[1] is lin for p in pairs)
                      and lin.out_features == e.num_embeddings and lin.in_features == e.embedding_dim]
            if shaped:
                pairs.append((*shaped[-1], en, e, False))
        chosen: list[tuple[str, nn.Module, str]] = []
        for ln, lin, en, emb, tied in pairs:
            if any(m is emb or m is lin for _, m, _ in chosen):
                continue
            if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
                self.note(f"{en}: max_norm / sparse / scale_grad_by_freq embedding; it and {ln} are left replicated.")
                continue
            how = "tied to" if tied else "shaped like"
            chosen += [(ln, lin, f"output layer, {how} {en}"), (en, emb, f"token embedding of {ln}")]
        if not pairs and embeddings:
            largest = max(embeddings, key=lambda x: x[1].num_embeddings)
            others = [e.num_embeddings for n, e in embeddings if n != largest[0]]
            e = largest[1]
            if all(n < e.num_embeddings for n in others) and not (e.max_norm is not None or e.sparse
                                                                   or e.scale_grad_by_freq):
                chosen.append((largest[0], e, "largest embedding table"))
        for name, module, reason in chosen:
            self.entry(name, VocabParallel(), reason, module)
        for n, m in embeddings:
            if id(m) not in self.claimed:
                self.note(f"{n}: embedding ({m.num_embeddings} rows) kept replicated: not the token embedding.")
        for n, m in linears:
            if id(m) not in self.claimed:
                self.note(f"{n}: nn.Linear kept replicated: not part of a recognised block or the output layer.")

    def regions(self) -> None:
        sharded = {id(m) for n, m in self.root.named_modules() if n in self.out.plan}
        taken: list[str] = []
        for name, m in self.root.named_modules():
            if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
                continue
            if any(name.startswith(r + ".") for r in taken):
                continue
            if all(any(id(sub) in sharded for sub in child.modules()) for child in m):
                first = m[0]
                seq_dim = None
                if isinstance(first, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
                    seq_dim = 1 if first.self_attn.batch_first else 0
                self.out.plan[name] = SequenceParallelRegion(seq_dim=seq_dim)
                self.out.reasons[name] = "blocks run in sequence"
                taken.append(name)


def _config_int(config: object, name: str) -> Optional[int]:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _hf_heads(m: nn.Module) -> Optional[tuple[int, int, int, str]]:
    """(heads, key/value heads, head width, model_type) of a Hugging Face attention module, or None.

    A module counts as one when it keeps its model's ``config`` (with ``num_attention_heads``) and declares itself
    per-head: a ``head_dim`` / ``head_size`` attribute or a head-count attribute of its own."""
    config = m.__dict__.get("config")
    n_heads = _config_int(config, "num_attention_heads")
    if n_heads is None:
        return None
    declared_dim = _int_attr(m, ("head_dim", "head_size", "attention_head_size"))
    declared_heads = _int_attr(m, HEAD_ATTRS)
    if declared_dim is None and declared_heads is None:
        return None
    if declared_heads is not None:
        n_heads = declared_heads[1]
    kv_heads = _config_int(config, "num_key_value_heads")
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) is True else n_heads
    declared_kv = _int_attr(m, KV_HEAD_ATTRS)
    if declared_kv is not None:
        kv_heads = declared_kv[1]
    hidden = _config_int(config, "hidden_size")
    head_dim = declared_dim[1] if declared_dim is not None else (hidden // n_heads if hidden else None)
    if not head_dim:
        return None
    return n_heads, kv_heads, head_dim, str(getattr(config, "model_type", ""))


def auto_plan(root: nn.Module, tensor_size: Optional[int] = None) -> AutoPlan:
    """The automatic plan for ``root``; with ``tensor_size``, also raise if that size does not divide the model."""
    plan = _Planner(root).run()
    if tensor_size is not None:
        plan.check(tensor_size)
    return plan
