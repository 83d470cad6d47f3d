"""One cache-aware encoder step for a batch of streams in the same latency mode.

Per stream and layer the cache holds the projected attention keys and values of the last C frames
(right-aligned; `length` of them valid) and the last `left` inputs of the depthwise conv. Streams at
different fill levels share a batch: unfilled cache rows are masked out of attention, as in NeMo's
cache_aware_stream_step. A step projects only its new frames, so its cost grows with the chunk, not with
the 70-frame left context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.conformer import ConformerEncoder
from .plan import ChunkPlan


@dataclass
class EncoderCache:
    """Streaming encoder state of B streams (batch at dim 1 of the per-layer tensors)."""

    keys: torch.Tensor  # [layers, B, H, C, d_k] projected keys of the last C frames
    values: torch.Tensor  # [layers, B, H, C, d_k]
    conv: torch.Tensor  # [layers, B, d_model, conv_left] depthwise-conv input history
    length: torch.Tensor  # [B] long: valid cached frames (the last `length` of C)

    @staticmethod
    def zeros(encoder: ConformerEncoder, cache_frames: int, batch: int, device=None, dtype=None) -> "EncoderCache":
        cfg = encoder.cfg
        dtype = dtype or encoder.dtype
        kv = (cfg.n_layers, batch, cfg.n_heads, cache_frames, cfg.d_head)
        return EncoderCache(
            keys=torch.zeros(kv, device=device, dtype=dtype),
            values=torch.zeros(kv, device=device, dtype=dtype),
            conv=torch.zeros(cfg.n_layers, batch, cfg.d_model, cfg.conv_context[0], device=device, dtype=dtype),
            length=torch.zeros(batch, dtype=torch.long, device=device),
        )


@torch.no_grad()
def encoder_step(
    encoder: ConformerEncoder,
    plan: ChunkPlan,
    window: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    cache: EncoderCache,
) -> tuple[torch.Tensor, torch.Tensor, EncoderCache]:
    """window: [B, window_mel, F] mel frames (fp32); lo, hi: [B] valid range of the window (lo > 0 at
    a stream's start, hi < window_mel on its last, partial step). Returns (encoded [B, T, d],
    valid encoded frames [B], next cache)."""
    shape = plan.shape
    x, _, out_hi = encoder.subsample(window, lo, hi)  # [B, drop + T, d]
    x = x[:, shape.drop :]
    out_len = torch.clamp(out_hi - shape.drop, min=0, max=shape.chunk_frames)
    frames = x.shape[1]
    c = shape.cache_frames
    t = torch.arange(c + frames, device=x.device)
    query_valid = t[None, c:] < (c + out_len)[:, None]  # [B, T]
    key_valid = (t[None, :] >= (c - cache.length)[:, None]) & (t[None, :] < (c + out_len)[:, None])  # [B, C+T]
    visible = plan.pattern[None] & query_valid[:, :, None] & key_valid[:, None, :]  # [B, T, C+T]
    padded = ~query_valid
    keys, values, conv = [], [], []
    for i, layer in enumerate(encoder.layers):
        x, k, v, history = layer(
            x, plan.positions[i], visible, padded, cache.keys[i], cache.values[i], cache.conv[i]
        )
        keys.append(k[:, :, frames:])
        values.append(v[:, :, frames:])
        conv.append(history[:, :, frames:])
    # As NeMo, the fill grows by the step's full (padded) width; only a stream's last step is padded.
    next_cache = EncoderCache(
        keys=torch.stack(keys),
        values=torch.stack(values),
        conv=torch.stack(conv),
        length=torch.clamp(cache.length + frames, max=c),
    )
    return x, out_len, next_cache
