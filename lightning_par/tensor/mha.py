"""``nn.MultiheadAttention`` with its heads split over the tensor group.

torch's ``F.multi_head_attention_forward`` derives the head width from ``embed_dim // num_heads`` and the projected
widths, so it cannot run on a rank's share of the heads; this module keeps ``nn.MultiheadAttention``'s call
signature, parameter names and mask semantics and computes its local heads with ``scaled_dot_product_attention``.
The input projection is column-parallel (each rank holds the q, k and v rows of its heads), the output projection
row-parallel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_par.comm.collectives import gather_along_dim, reduce_from_group
from lightning_par.tensor.layers_1d import (
    InputOp,
    RowParallelLinear,
    ShardFn,
    ShardSpec,
    TensorGroup,
    shard_fn,
)


class ParallelMultiheadAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (not ``add_bias_kv`` / ``add_zero_attn``) on ``num_heads / t`` heads.

    ``seq_dim`` set (sequence parallelism): the query arrives as this rank's sequence shard and is all-gathered, the
    output leaves reduce-scattered along the sequence. A key or value that is not the query tensor itself (the
    encoder memory of a decoder's cross-attention) is taken as whole.
    """

    # Read only by the fast-path eligibility checks of nn.TransformerEncoderLayer / nn.TransformerDecoderLayer:
    # False keeps torch's fused kernels, which would take the local weights for whole ones, out of the way.
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention, tg: TensorGroup, seq_dim: Optional[int] = None,
                 shard: Optional[ShardFn] = None) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn are not supported by the tensor-parallel attention")
        t = tg.size
        if mha.num_heads % t:
            raise ValueError(f"{mha.num_heads} heads cannot be split over tensor size {t}")
        shard = shard_fn(tg, shard)
        self.tg = tg
        self.embed_dim, self.kdim, self.vdim = mha.embed_dim, mha.kdim, mha.vdim
        self.num_heads = mha.num_heads
        self.local_heads = mha.num_heads // t
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.seq_dim = seq_dim
        e = self.embed_dim
        self.fused = mha.in_proj_weight is not None
        # Registered in nn.MultiheadAttention's order, so parameters() and state_dict() list the same names.
        if self.fused:
            self.in_proj_weight = shard(mha.in_proj_weight, ShardSpec(0, (e, e, e), t))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                setattr(self, name, shard(getattr(mha, name), ShardSpec(0, (e,), t)))
            self.register_parameter("in_proj_weight", None)
        if mha.in_proj_bias is not None:
            self.in_proj_bias = shard(mha.in_proj_bias, ShardSpec(0, (e, e, e), t))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = RowParallelLinear.from_linear(mha.out_proj, tg, seq_dim=seq_dim, shard=shard)
        self._query_op = InputOp(tg, seq_dim)
        self._memory_op = InputOp(tg)

    def _weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _project(self, q_in: Tensor, k_in: Tensor, v_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self.fused and q_in is k_in and k_in is v_in:
            return F.linear(q_in, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        w_q, w_k, w_v = self._weights()
        return F.linear(q_in, w_q, biases[0]), F.linear(k_in, w_k, biases[1]), F.linear(v_in, w_v, biases[2])

    def _inputs(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.tg.size == 1:
            return query, key, value
        q_in = self._query_op(query)
        k_in = q_in if key is query else self._memory_op(key)
        v_in = q_in if value is query else (k_in if value is key else self._memory_op(value))
        return q_in, k_in, v_in

    def _local_mask(self, mask: Tensor, batch: int, heads_dim_size: int) -> Tensor:
        if mask.dim() == 2:
            return mask.view(1, 1, *mask.shape)
        # (batch * num_heads, L, S): keep this rank's heads
        mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
        start = self.tg.rank * self.local_heads
        return mask[:, start : start + heads_dim_size]

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        try:
            return self._forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                 is_causal)
        finally:
            self._query_op.clear()
            self._memory_op.clear()

    def _forward(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        unbatched = query.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        if unbatched:
            batched: dict[int, Tensor] = {}  # keep "key is query" true after adding the batch dim
            query, key, value = (batched.setdefault(id(x), x.unsqueeze(batch_dim)) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention does).")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's own causal masking, as torch does
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            is_causal = False

        q_in, k_in, v_in = self._inputs(query, key, value)
        q, k, v = self._project(q_in, k_in, v_in)
        if not self.batch_first:
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        b, tgt, src = q.size(0), q.size(1), k.size(1)
        h = self.local_heads
        q, k, v = (x.reshape(b, x.size(1), h, self.head_dim).transpose(1, 2) for x in (q, k, v))

        mask = self._local_mask(attn_mask, b, h) if attn_mask is not None else None
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(b, 1, 1, src)
            mask = kpm if mask is None else mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p)  # torch returns the dropped weights too
            out = probs @ v
            weights = self._attention_weights(probs, average_attn_weights)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(b, tgt, h * self.head_dim)
        if not self.batch_first:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(batch_dim)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights

    def _attention_weights(self, probs: Tensor, average: bool) -> Tensor:
        g = self.tg.group
        if average:
            return reduce_from_group(probs.sum(dim=1), g) / self.num_heads if self.tg.size > 1 else probs.mean(dim=1)
        return gather_along_dim(probs, 1, g)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads} ({self.local_heads} here), "
                f"batch_first={self.batch_first}, tensor={self.tg.size}")
