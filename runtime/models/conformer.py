"""FastConformer encoder: conv subsampling, then conformer layers with rel-pos attention.

One code path serves offline encoding and cache-aware streaming: a layer takes optional caches (projected
attention keys/values of the left-context frames, and the depthwise-conv input history) and returns the
full keys/values and conv input it used, from which the caller keeps the tail as the next cache.
Module and parameter names mirror NeMo's so a checkpoint's `encoder.*` keys load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import RelPositionMultiHeadAttention, relative_positions
from .config import EncoderConfig
from .precision import exact_fp32
from .skinny import depthwise_conv1d, linear
from .subsampling import ConvSubsampling


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, use_bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=use_bias)
        self.linear2 = nn.Linear(d_ff, d_model, bias=use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.silu(linear(x, self.linear1.weight, self.linear1.bias))
        return linear(hidden, self.linear2.weight, self.linear2.bias)


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv, norm, SiLU, pointwise conv (NeMo's ConformerConvolution)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.context = cfg.conv_context  # (left, right) frames
        self.norm_type = cfg.conv_norm_type
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1, bias=cfg.use_bias)
        self.depthwise_conv = nn.Conv1d(d, d, cfg.conv_kernel_size, groups=d, bias=cfg.use_bias)
        # NeMo names the norm `batch_norm` whatever its type; kept for checkpoint keys.
        self.batch_norm = nn.BatchNorm1d(d) if self.norm_type == "batch_norm" else nn.LayerNorm(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor, padded: torch.Tensor, cache: torch.Tensor | None = None):
        """x: [B, T, d]; padded: [B, T] bool, frames past the valid length; cache: [B, d, left] depthwise
        input of the preceding frames (None: zeros, a stream's start). Returns (out [B, T, d],
        depthwise input [B, d, left + T] whose last `left` columns are the next cache)."""
        # Kernel-1 convs as matmuls on [B, T, C]: same arithmetic, a fraction of the conv overhead.
        x = nn.functional.glu(
            linear(x, self.pointwise_conv1.weight[:, :, 0], self.pointwise_conv1.bias), dim=-1
        )  # [B, T, d]
        # Zero padded frames so they cannot leak into valid ones through the depthwise conv.
        x = x.masked_fill(padded[:, :, None], 0.0).transpose(1, 2)  # [B, d, T]
        left, right = self.context
        if cache is None:
            x = nn.functional.pad(x, (left, 0))
        else:
            x = torch.cat((cache.to(x.dtype), x), dim=2)
        history = x
        conv = self.depthwise_conv
        x = depthwise_conv1d(nn.functional.pad(x, (0, right)) if right else x, conv.weight, conv.bias)
        if self.norm_type == "layer_norm":
            x = self.batch_norm(x.transpose(1, 2))
        else:
            x = self.batch_norm(x).transpose(1, 2)
        x = linear(nn.functional.silu(x), self.pointwise_conv2.weight[:, :, 0], self.pointwise_conv2.bias)
        return x, history


class ConformerLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig, pos_bias_u=None, pos_bias_v=None):
        super().__init__()
        d = cfg.d_model
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, cfg.d_ff, cfg.use_bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionMultiHeadAttention(d, cfg.n_heads, cfg.use_bias, pos_bias_u, pos_bias_v)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConvModule(cfg)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, cfg.d_ff, cfg.use_bias)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos, hidden, padded, k_cache=None, v_cache=None, conv_cache=None, order=None):
        """x: [B, T, d]; pos: [H, d_k, K+T-1]; hidden: [B, 1, T, K] keys a query may not see;
        padded: [B, T] frames past the valid length; order: see RelPositionMultiHeadAttention.
        Returns (x [B, T, d], keys, values [B, H, K, d_k], conv history [B, d, left + T])."""
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        att, keys, values = self.self_attn(self.norm_self_att(x), pos, hidden, k_cache, v_cache, order)
        x = x + att
        conv, history = self.conv(self.norm_conv(x), padded, conv_cache)
        x = x + conv
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x), keys, values, history


def attention_pattern(style: str, context: tuple[int, int], num_queries: int, num_keys: int, device=None):
    """[T, K] bool: which keys each query may see, for the last T of K frames (NeMo's _create_masks
    before padding is applied). Chunks are aligned to the start of the K frames."""
    left, right = context
    k = torch.arange(num_keys, device=device)
    q = k[num_keys - num_queries :]
    if style == "chunked_limited" and right >= 0:
        chunk = right + 1
        left_chunks = left // chunk if left >= 0 else 10000
        diff = torch.div(q, chunk, rounding_mode="trunc")[:, None] - torch.div(k, chunk, rounding_mode="trunc")[None, :]
        return (diff >= 0) & (diff <= left_chunks)
    dist = q[:, None] - k[None, :]  # positive: key in the past
    allowed = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= dist <= left
    if right >= 0:
        allowed &= dist >= -right
    return allowed


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_encode = ConvSubsampling(cfg)
        shared_u = shared_v = None
        if not cfg.untie_biases:
            # As in NeMo, one pair shared by every layer, registered only on the layers (so the checkpoint
            # lists it under each layer's self_attn and not on the encoder).
            shared_u = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))
            shared_v = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_head))
        self.layers = nn.ModuleList(ConformerLayer(cfg, shared_u, shared_v) for _ in range(cfg.n_layers))
        self.xscale = math.sqrt(cfg.d_model) if cfg.xscaling else None

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_encode.out.weight.dtype

    def subsample(self, features: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """features [B, T, F] fp32 with valid range [lo, hi) -> ([B, T', d], lo', hi')."""
        x, lo, hi = self.pre_encode(features.to(self.dtype), lo, hi)
        if self.xscale is not None:
            x = x * self.xscale
        return x, lo, hi

    def positions(self, num_queries: int, num_keys: int) -> list[torch.Tensor]:
        """Projected relative positions for T queries (the last of K keys): one [H, d_k, K+T-1] per layer."""
        pe = relative_positions(num_queries, num_keys, self.cfg.d_model, device=self.pre_encode.out.weight.device)
        with exact_fp32(self.dtype):
            return [layer.self_attn.project_positions(pe) for layer in self.layers]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, context: tuple[int, int] | None = None):
        """Offline encoding. features: [B, F, T] fp32; lengths: [B] valid frames; context: the
        attention (left, right) mode, default the checkpoint's first. Returns ([B, T', d], [B])."""
        with exact_fp32(self.dtype):
            return self._forward(features, lengths, context or self.cfg.att_context_sizes[0])

    def _forward(self, features: torch.Tensor, lengths: torch.Tensor, context: tuple[int, int]):
        zeros = torch.zeros_like(lengths)
        x, _, out_len = self.subsample(features.transpose(1, 2), zeros, lengths)
        frames = x.shape[1]
        t = torch.arange(frames, device=x.device)
        valid = t[None, :] < out_len[:, None]  # [B, T']
        pattern = attention_pattern(self.cfg.att_context_style, context, frames, frames, x.device)
        visible = pattern[None] & valid[:, :, None] & valid[:, None, :]  # [B, T', T']
        hidden = ~visible[:, None]
        padded = ~valid
        for layer, pos in zip(self.layers, self.positions(frames, frames)):
            x, _, _, _ = layer(x, pos, hidden, padded)
        return x, out_len
