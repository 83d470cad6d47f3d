"""Relative-position multi-head self-attention (Transformer-XL style, NeMo's RelPositionMultiHeadAttention).

Differences from NeMo that do not change results:
- a streaming step caches the *projected* keys and values of the left-context frames instead of the
  normalized layer input, so a step projects only its new frames;
- the positional projection `linear_pos(pos_emb)` is passed in precomputed: it depends only on the
  number of keys, so the streaming code computes it once per chunk shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_VALUE = -10000.0  # NeMo's INF_VAL: masked scores are filled with this, not -inf


def relative_positions(num_keys: int, d_model: int, device=None) -> torch.Tensor:
    """Sinusoidal embeddings of relative positions num_keys-1 ... -(num_keys-1): [2K-1, d_model] fp32.
    Same arithmetic as NeMo's RelPositionalEncoding.create_pe (interleaved sin/cos)."""
    positions = torch.arange(num_keys - 1, -num_keys, -1, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.shape[0], d_model, device=device)
    pe[:, 0::2] = torch.sin(positions * div_term)
    pe[:, 1::2] = torch.cos(positions * div_term)
    return pe


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, P] scores against positions -> scores against keys (NeMo's rel_shift): for T queries
    that are the last T of K = C + T keys, entry (i, j) ends up holding relative distance (C + i) - j."""
    b, h, t, p = x.shape
    x = nn.functional.pad(x, (1, 0)).view(b, h, p + 1, t)
    return x[:, :, 1:].reshape(b, h, t, p)


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
        # Tied biases are the encoder's Parameters, shared by every layer as in NeMo (the checkpoint lists
        # them under each layer too).
        self.pos_bias_u = pos_bias_u if pos_bias_u is not None else nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = pos_bias_v if pos_bias_v is not None else nn.Parameter(torch.zeros(n_heads, self.d_k))

    def project_positions(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """[P, d_model] position embeddings -> [1, H, P, d_k] projected positions."""
        p = self.linear_pos(pos_emb.to(self.linear_pos.weight.dtype))
        return p.view(1, -1, self.h, self.d_k).transpose(1, 2)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d_model] -> [B, H, T, d_k]"""
        return x.view(x.shape[0], -1, self.h, self.d_k).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        visible: torch.Tensor,
        k_cache: torch.Tensor | None = None,
        v_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, d] normalized input; pos: [1, H, 2K-1, d_k] projected positions for K = C + T keys;
        visible: [B, T, K] bool; k_cache, v_cache: [B, H, C, d_k] projected keys/values of the C cached
        frames (None when C = 0). Returns (out [B, T, d], keys [B, H, K, d_k], values [B, H, K, d_k])."""
        q = self.heads(self.linear_q(x))  # [B, H, T, d_k]
        k = self.heads(self.linear_k(x))
        v = self.heads(self.linear_v(x))
        if k_cache is not None:
            k = torch.cat((k_cache, k), dim=2)  # [B, H, K, d_k]
            v = torch.cat((v_cache, v), dim=2)
        num_keys = k.shape[2]
        q_u = q + self.pos_bias_u[None, :, None, :].to(q.dtype)
        q_v = q + self.pos_bias_v[None, :, None, :].to(q.dtype)
        bd = rel_shift(torch.matmul(q_v, pos.transpose(-2, -1)))[..., :num_keys]  # [B, H, T, K]
        hidden = visible[:, None]  # [B, 1, T, K]
        bd = (bd / math.sqrt(self.d_k)).masked_fill(~hidden, MASK_VALUE)
        out = nn.functional.scaled_dot_product_attention(q_u, k, v, attn_mask=bd)  # [B, H, T, d_k]
        # NeMo zeroes the probabilities of masked keys, so a query that sees nothing outputs 0.
        out = out.masked_fill(~visible.any(dim=-1)[:, None, :, None], 0.0)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.h * self.d_k)
        return self.linear_out(out), k, v
