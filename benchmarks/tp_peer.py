"""The DTensor tensor-parallel peer of ``tp1d``: Lightning's ``ModelParallelStrategy(tensor_parallel_size=world)``
with a Megatron-style plan applied in ``configure_model`` (after torchtitan's ``apply_tp``).

The model is the demo GPT with two changes of layout, not of FLOPs:
- separate ``q``, ``k``, ``v`` projections (DTensor's ``ColwiseParallel`` on the fused ``c_attn`` would give each
  rank a slice across q, k and v, and ``chunk(3)`` of the local output would then mix them) and head-count-agnostic
  reshapes ``view(B, T, -1, head_dim)``, so each rank runs its local heads;
- an untied output layer (``ColwiseParallel`` on ``lm_head`` and a replicated embedding cannot share one weight);
  +vocab x width parameters, the same matmuls.
Plan per block: ``SequenceParallel`` for ``ln_1``/``ln_2`` (activations sharded on the sequence between blocks),
all-gather into attention/MLP (``PrepareModuleInput``), ``ColwiseParallel`` for q/k/v and ``c_fc``,
``RowwiseParallel(output_layouts=Shard(1))`` (reduce-scatter) for both ``c_proj``. The embedding (token +
position) is computed replicated and sliced to the local sequence shard; ``ln_f`` is sequence parallel;
``lm_head`` is ``ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())`` (replicated logits, no loss
parallel).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_par.demo.model import GPTConfig

DESCRIPTION = "DTensor TP peer: GPT with separate q/k/v (same FLOPs), untied lm_head, sequence parallel"


class SplitAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.head_dim = cfg.n_embd // cfg.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[0], x.shape[1]
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SplitAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Embed(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))


class SplitGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = Embed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def apply_tp(model: SplitGPT, mesh) -> None:
    """Megatron-style TP + sequence parallel over the 1-D ``mesh`` (torchtitan's plan, GPT-2 shaped)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    parallelize_module(model, mesh, {
        # replicated embedding, output sliced to the local sequence shard (its backward all-gathers the gradient)
        "embed": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    })
    for block in model.blocks:
        parallelize_module(block, mesh, {
            "ln_1": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
            "ln_2": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1)),
        })


def param_groups(module: nn.Module) -> list[dict]:
    """DTensor and plain parameters in separate groups: a fused/foreach optimizer kernel takes one kind per call."""
    from torch.distributed.tensor import DTensor

    params = [p for p in module.parameters() if p.requires_grad]
    groups = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [{"params": g} for g in groups if g]


def make_module_class(base: type) -> type:
    """A LightningModule class (subclass of ``bench_dp.BenchModule``) that applies the plan in configure_model."""

    class TPPeerModule(base):
        def configure_model(self) -> None:
            if getattr(self, "_tp_applied", False):
                return
            apply_tp(self.model, self.device_mesh["tensor_parallel"])
            self._tp_applied = True

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(param_groups(self), lr=self.lr, fused=self.device.type == "cuda")

    return TPPeerModule
