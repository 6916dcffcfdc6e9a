"""A nanoGPT-shaped decoder in plain torch, and the LightningModule that trains it.

The module layout is deliberately conventional (``blocks`` as an ``nn.ModuleList``, fused ``c_attn``, ``n_head`` on
the attention module) because the pipeline and tensor-parallel strategies address submodules by these names.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import CPUAccelerator


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # Widths come from the tensors, not from n_embd: under tensor parallelism c_attn yields only the local heads,
        # and the plan only has to rescale ``n_head``.
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = replace(cfg or GPTConfig(), **overrides)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying: one Parameter shared by both modules (counted once by .parameters()).
        self.wte.weight = self.lm_head.weight

        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance stays bounded.
        # The scale is kept on the projections, so that `_init_weights` alone initialises any module the way this
        # constructor does (ZeRO-3 initialises a model built on the meta device module by module with it).
        for name, m in self.named_modules():
            if name.endswith("c_proj") and isinstance(m, nn.Linear):
                m._init_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.apply(self._init_weights)
        # (Drawn again as before the scale was kept on the modules: the same random stream, the same weights.)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The initialisation of one module (not its children): N(0, 0.02) weights (scaled residual projections),
        zero biases; LayerNorm keeps its own (ones and zeros)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=getattr(module, "_init_std", 0.02))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class CausalLMSteps(LightningModule):
    """Next-token cross-entropy steps and the optimizer of the demo modules (``DemoGPT`` here, ``HFCausalLM`` in
    :mod:`lightning_par.demo.hf`): a subclass sets ``self.model``, its ``forward(idx)`` returns logits, and its
    hyperparameters hold ``learning_rate``, ``weight_decay`` and ``optimizer``."""

    def setup(self, stage: str) -> None:
        # Several CPU ranks on one host oversubscribe the cores if each keeps torch's default thread count.
        trainer = self._trainer
        if trainer is not None and trainer.num_devices > 1 and isinstance(trainer.accelerator, CPUAccelerator):
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // trainer.num_devices))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.learning_rate, momentum=0.9)
        # Decay matrices only; biases, LayerNorm and other 1-d parameters are left alone (nanoGPT convention).
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.95))


class DemoGPT(CausalLMSteps):
    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        optimizer: Literal["adamw", "sgd"] = "adamw",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(
            GPTConfig(
                vocab_size=vocab_size,
                block_size=block_size,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                dropout=dropout,
            )
        )
        # Model FLOPs per trained token (forward and backward), as lightning_par.callbacks.ThroughputMonitor reads
        # it for MFU: 6 per parameter for the matmuls, plus the attention scores and values over the context.
        self.flops_per_token = 6 * self.model.num_params() + 12 * n_layer * n_embd * block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)
