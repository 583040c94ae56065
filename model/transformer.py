"""Transformer layers of MAD: a DETR-style encoder and a bidirectional sequence decoder.

Attention goes through `F.scaled_dot_product_attention` (fused kernels on GPU), except under
CPU bf16 autocast (training) with short queries and keys, where plain matmuls with an fp32
softmax are several times faster than the CPU's fused kernel; past MATMUL_MAX_SCORES scores
per head (folded segmentation sequences, cross-attention to a fine memory level) the fused
kernel wins, as the score matrices the matmuls write and convert no longer stay in cache.
(With dropout the CPU's fused kernel falls back to plain math and both cost the same.)
The decoder's cross-attention keys/values of the image are computed once per image
(`image_kv`) and reused by every task and every refinement step. As in the reference
(detrex layers), attention outputs join the residual without dropout; dropout acts on
attention weights and inside the FFN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.folding import ImageGroups

KV = tuple[torch.Tensor, torch.Tensor]  # ([B, heads, N, head_dim], same)
MATMUL_MAX_SCORES = 256 * 1024  # queries x keys per head (python -m mad.bench.attention)


def matmuls_pay(queries: int, keys: int) -> bool:
    """Whether explicit matmuls beat the fused kernel under CPU bf16 autocast."""
    return queries * keys <= MATMUL_MAX_SCORES


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [B, heads, L, D/heads]"""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, key: torch.Tensor, value: torch.Tensor) -> KV:
        return self.split(self.k(key)), self.split(self.v(value))

    def forward(
        self, query: torch.Tensor, kv: KV, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        """query [B, L, D], kv from project_kv, mask broadcastable to [B, heads, L, N]
        (True = may attend) -> [B, L, D]"""
        q = self.split(self.q(query))
        drop = self.dropout if self.training else 0.0
        cpu_bf16 = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_bf16 and matmuls_pay(q.shape[-2], kv[0].shape[-2]):
            out = matmul_attention(q, kv[0], kv[1], mask, drop, causal)
        else:
            out = F.scaled_dot_product_attention(
                q, kv[0], kv[1], attn_mask=mask, dropout_p=drop, is_causal=causal
            )
        return self.out(out.transpose(1, 2).flatten(2))


def matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    causal: bool,
) -> torch.Tensor:
    """What `F.scaled_dot_product_attention` computes, as explicit matmuls with the softmax in
    fp32: q [B, h, L, d], k, v [B, h, N, d], mask broadcastable to [B, h, L, N] (True = may
    attend) -> [B, h, L, d]."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaling q: L x d, not L x N
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(future.triu(1), float("-inf"))
    weights = F.dropout(scores.softmax(-1, dtype=torch.float32), dropout)
    return weights.to(v.dtype) @ v


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(
            nn.Linear(dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; the position code is added to queries and keys."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = Attention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x, pos [B, N, D]; mask [B, 1, 1, N] (True = real pixel) -> [B, N, D]"""
        qk = x + pos
        x = self.norm1(x + self.attn(qk, self.attn.project_kv(qk, x), mask))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Self-attention -> norm -> cross-attention -> norm -> FFN -> norm.

    Self-attention is bidirectional (causal only for the autoregressive baseline) and stays
    inside each sequence: sequences are separate rows of the batch.
    """

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ffn = FeedForward(dim, ffn, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def image_kv(self, memory: torch.Tensor, pos: torch.Tensor) -> KV:
        """Cross-attention keys/values of the image: memory, pos [B, N, D]."""
        return self.cross_attn.project_kv(memory + pos, memory)

    def forward(
        self,
        x: torch.Tensor,
        seq_pos: torch.Tensor,
        image_kv: KV,
        image_mask: torch.Tensor | None,
        causal: bool = False,
        self_cache: KV | None = None,
        groups: ImageGroups | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x [S, L, D]; seq_pos [L, D]; image_kv per image ([B, h, N, d] each) with `groups`
        saying which image each sequence reads, or per sequence ([S, h, N, d]) without;
        self_cache: keys/values of earlier tokens (autoregressive decoding), whose new value
        is returned alongside the output [S, L, D]."""
        qk = x + seq_pos
        k, v = self.self_attn.project_kv(qk, x)
        if self_cache is not None:
            k, v = torch.cat([self_cache[0], k], 2), torch.cat([self_cache[1], v], 2)
        x = self.norm1(x + self.self_attn(qk, (k, v), causal=causal))
        x = self.norm2(x + self.cross_attend(x + seq_pos, image_kv, image_mask, groups))
        return self.norm3(x + self.drop(self.ffn(x))), (k, v)

    def cross_attend(
        self,
        query: torch.Tensor,
        image_kv: KV,
        image_mask: torch.Tensor | None,
        groups: ImageGroups | None = None,
    ) -> torch.Tensor:
        if groups is None and image_kv[0].shape[0] == 1 and query.shape[0] > 1:
            groups = ImageGroups.one_image(query.shape[0], query.device)  # one shared image
        if groups is None:
            return self.cross_attn(query, image_kv, image_mask)
        return groups.unfold(
            self.cross_attn(groups.fold(query), image_kv, image_mask), query.shape[1]
        )
