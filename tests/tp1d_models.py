"""Standard modules for the tp1d tests, written as a user would, with no knowledge of tensor parallelism.

- ``RecordingGPT`` (tests/parity.py): the demo GPT, fused ``c_attn``, tied embedding / output layer.
- ``RecordingLlama``: separate q/k/v/o projections without bias, grouped-query attention, a gated three-Linear MLP,
  ``nn.RMSNorm``, an untied output layer and a vocabulary of 33 (not divisible by 2 or 4: padding).
- ``RecordingEncoder``: ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` with a causal mask (torch's own
  ``nn.MultiheadAttention`` inside), either batch- or sequence-first.
- ``RecordingNet``: a model the automatic plan does not recognise (head count in ``self.nh``), and ``CUSTOM_PLAN``,
  the plan of docs/tp1d.md that shards it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from lightning_par.tensor import ColwiseParallel, ParallelBlock, RowwiseParallel
from parity import TINY


class Recording(LightningModule):
    """Next-token loss with SGD, recording every training loss."""

    def __init__(self, learning_rate: float = 0.1) -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.recorded: list[float] = []

    def _loss(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.recorded.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.learning_rate, momentum=0.9)


# ----- a LLaMA-shaped decoder ---------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        repeat = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = Attention(dim, n_heads, n_kv_heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = GatedMLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 32, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                 hidden: int = 48, block_size: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block_size, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


class RecordingLlama(Recording):
    def __init__(self, n_kv_heads: int = 2, **kwargs) -> None:
        super().__init__()
        self.model = Llama(n_kv_heads=n_kv_heads, **kwargs)

    def forward(self, idx):
        return self.model(idx)


# ----- nn.TransformerEncoder ---------------------------------------------------------------------------------------


class RecordingEncoder(Recording):
    def __init__(self, batch_first: bool = True, norm_first: bool = True, vocab: int = TINY["vocab_size"],
                 dim: int = 32, heads: int = 4, block_size: int = 16) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(block_size, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        t = idx.size(1)
        x = self.embed(idx) + self.pos[:t]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x, mask=mask, is_causal=True)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x)


# ----- a model the automatic plan does not recognise: sharded with a custom plan (docs/tp1d.md) -------------------


class Mixer(nn.Module):
    def __init__(self, dim: int, nh: int) -> None:
        super().__init__()
        self.nh = nh  # a head-count name the automatic plan does not know
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, self.nh, -1).transpose(1, 2) for z in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w_in, self.w_out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.w_out(F.relu(self.w_in(x)))


class Layer(nn.Module):
    def __init__(self, dim: int, nh: int) -> None:
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.ff = nn.LayerNorm(dim), Mixer(dim, nh), nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.ff(self.norm2(x))


class Net(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 32, nh: int = 4, depth: int = 2, block_size: int = 16) -> None:
        super().__init__()
        self.token_emb, self.pos_emb = nn.Embedding(vocab, dim), nn.Embedding(block_size, dim)
        self.layers = nn.ModuleList(Layer(dim, nh) for _ in range(depth))
        self.to_logits = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.token_emb(idx) + self.pos_emb(torch.arange(idx.size(1), device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.to_logits(x)


class RecordingNet(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def forward(self, idx):
        return self.net(idx)


CUSTOM_PLAN = {
    "net.layers.*.mixer": ParallelBlock(divide=("nh",)),
    "net.layers.*.mixer.to_qkv": ColwiseParallel(segments=3),
    "net.layers.*.mixer.to_out": RowwiseParallel(),
    "net.layers.*.ff": "block",
    "net.layers.*.ff.w_in": "colwise",
    "net.layers.*.ff.w_out": "rowwise",
    "net.layers": "sequence_region",
    "net.token_emb": "vocab",
    "net.to_logits": "vocab",
}
