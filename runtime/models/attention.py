"""Relative-position multi-head self-attention (Transformer-XL style, NeMo's RelPositionMultiHeadAttention).

Differences from NeMo that do not change results:
- a streaming step caches the *projected* keys and values of the left-context frames instead of the
  normalized layer input, so a step projects only its new frames;
- the positional projection `linear_pos(pos_emb)` is passed in precomputed: it depends only on the
  numbers of queries and keys, so the streaming code computes it once per chunk shape;
- NeMo scores T queries against 2K-1 positions and shifts the result (rel_shift); only K+T-1 of those
  positions are ever read, so only they are projected and scored, and the shift is a strided view.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .skinny import linear

MASK_VALUE = -10000.0  # NeMo's INF_VAL: masked scores are filled with this, not -inf


def relative_positions(num_queries: int, num_keys: int, d_model: int, device=None) -> torch.Tensor:
    """Sinusoidal embeddings of the relative positions (query - key) that T queries, the last T of K
    keys, can see: K-1 down to -(T-1). [K+T-1, d_model] fp32, NeMo's RelPositionalEncoding arithmetic
    (interleaved sin/cos)."""
    positions = torch.arange(num_keys - 1, -num_queries, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe


def positional_scores(q: torch.Tensor, pos: torch.Tensor, num_keys: int) -> torch.Tensor:
    """q: [B, H, T, d_k]; pos: [H, d_k, P=K+T-1] projected positions -> [B, H, T, K] where entry (i, j)
    is q_i . pos(distance (K - T + i) - j), the result of NeMo's matmul + rel_shift."""
    b, h, t, d = q.shape
    p = pos.shape[-1]
    # One bmm per head over all B*T queries: no copy of the positions per batch element.
    raw = torch.bmm(q.transpose(0, 1).reshape(h, b * t, d), pos)  # [H, B*T, P]
    # Column of distance (K-T+i)-j is (T-1-i)+j: a strided view of the raw scores.
    return raw.as_strided((b, h, t, num_keys), (t * p, b * t * p, p - 1, 1), raw.storage_offset() + t - 1)


class RelPositionMultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, use_bias: bool, pos_bias_u=None, pos_bias_v=None):
        super().__init__()
        self.h = n_heads
        self.d_k = d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=use_bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        # Tied biases (untie_biases=False) arrive as Parameters shared by every layer.
        self.pos_bias_u = pos_bias_u if pos_bias_u is not None else nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = pos_bias_v if pos_bias_v is not None else nn.Parameter(torch.zeros(n_heads, self.d_k))

    def project_positions(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """[P, d_model] position embeddings -> [H, d_k, P] projected positions."""
        p = self.linear_pos(pos_emb.to(self.linear_pos.weight.dtype))  # [P, d_model]
        return p.view(-1, self.h, self.d_k).permute(1, 2, 0).contiguous()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] -> [B, H, T, d_k]"""
        return x.view(x.shape[0], -1, self.h, self.d_k).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        hidden: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, d] normalized input; pos: [H, d_k, K+T-1] projected positions for K = C + T keys;
        hidden: [B, 1, T, K] bool, True where a query may not see a key; k_cache, v_cache:
        [B, H, C, d_k] projected keys/values of the C cached frames (None when C = 0).
        order: [B, 1, 1, K] long or None. Given, k_cache and v_cache are [B, H, K, d_k] buffers holding
        the cached frames in some order with room for the T new ones at the end, which are written into
        them (no concatenation), and key position m is frame order[b, 0, 0, m] of the in-order layout that
        `pos` describes; `hidden` is in the buffers' order.
        Returns (out [B, T, d], keys [B, H, K, d_k], values [B, H, K, d_k])."""
        q = self.heads(linear(x, self.linear_q.weight, self.linear_q.bias))  # [B, H, T, d_k]
        k = self.heads(linear(x, self.linear_k.weight, self.linear_k.bias))
        v = self.heads(linear(x, self.linear_v.weight, self.linear_v.bias))
        t = q.shape[2]
        if order is not None:
            k_cache[:, :, -t:] = k
            v_cache[:, :, -t:] = v
            k, v = k_cache, v_cache  # [B, H, K, d_k]
        elif k_cache is not None:
            k = torch.cat((k_cache, k), dim=2)  # [B, H, K, d_k]
            v = torch.cat((v_cache, v), dim=2)
        q_u = q + self.pos_bias_u.to(q.dtype)[None, :, None, :]
        q_v = q + self.pos_bias_v.to(q.dtype)[None, :, None, :]
        bd = positional_scores(q_v, pos, k.shape[2]) * (1.0 / math.sqrt(self.d_k))  # [B, H, T, K]
        if order is not None:
            bd = bd.gather(3, order.expand(-1, self.h, t, -1))
        bd.masked_fill_(hidden, MASK_VALUE)
        # Rows whose every key is hidden occur only for padding queries; their outputs are never read.
        out = nn.functional.scaled_dot_product_attention(q_u, k, v, attn_mask=bd)  # [B, H, T, d_k]
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.h * self.d_k)
        return linear(out, self.linear_out.weight, self.linear_out.bias), k, v
