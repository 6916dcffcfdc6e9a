"""Small Hugging Face causal language models for tests, built from a config (nothing downloaded), wrapped as a user
would wrap them: ``HFCausalLM(model)``, whose ``forward(ids)`` returns the logits and whose ``training_step`` is the
next-token cross-entropy from ``.logits`` (SGD). Shared by the tests of several strategies.

Sizes: hidden 64, 4 heads, 2 layers, vocabulary 128, sequences of 32 (``SEQ``); dropout off (parity tests).

- ``tiny_llama(tie=False, kv_heads=2)``: ``LlamaForCausalLM``, separate q/k/v/o, grouped-query attention (2 k/v
  heads), gated MLP, rotary embeddings, RMSNorm.
- ``tiny_gpt2()``: ``GPT2LMHeadModel``, ``Conv1D`` layers (weights stored ``(in, out)``), fused ``c_attn``,
  embedding tied to ``lm_head``, learned positions.
- ``tiny_neox()``: ``GPTNeoXForCausalLM``, fused ``query_key_value`` interleaved per head, partial rotary,
  parallel residual, untied ``embed_out``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

from tp1d_models import Recording

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 128, 64, 4, 2, 32


class HFCausalLM(Recording):
    """A Hugging Face causal LM trained on next-token cross-entropy with SGD and momentum (the steps of
    ``tp1d_models.Recording``); records every training loss."""

    def __init__(self, model: Optional[torch.nn.Module] = None, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__(learning_rate=lr)
        self.model = model
        self.lr, self.momentum = lr, momentum

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _eager(config) -> None:
    config._attn_implementation = "eager"  # deterministic, the same code on every rank and in the reference


def llama_model(tie: bool = False, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
                         max_position_embeddings=2 * SEQ, tie_word_embeddings=tie, attention_dropout=0.0)
    _eager(config)
    return LlamaForCausalLM(config)


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=2 * SEQ,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    _eager(config)
    return GPT2LMHeadModel(config)


def neox_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=2 * HIDDEN, max_position_embeddings=2 * SEQ, rotary_pct=0.5,
                           hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    _eager(config)
    return GPTNeoXForCausalLM(config)


def tiny_llama(tie: bool = False, kv_heads: int = 2, **kwargs) -> HFCausalLM:
    return HFCausalLM(llama_model(tie, kv_heads), **kwargs)


def tiny_gpt2(**kwargs) -> HFCausalLM:
    return HFCausalLM(gpt2_model(), **kwargs)


def tiny_neox(**kwargs) -> HFCausalLM:
    return HFCausalLM(neox_model(), **kwargs)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox}


def token_data(samples: int, seq: int = SEQ, vocab: int = VOCAB, seed: int = 1234) -> TensorDataset:
    """Arithmetic progressions mod ``vocab`` (learnable): inputs and next-token targets of length ``seq``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (samples, 1), generator=g)
    stride = torch.randint(1, 4, (samples, 1), generator=g)
    tokens = (start + stride * torch.arange(seq + 1)) % vocab
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])
