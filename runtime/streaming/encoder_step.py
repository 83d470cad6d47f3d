"""One cache-aware encoder step for a batch of streams in the same latency mode.

Per stream the cache holds, for each conformer layer, the projected attention keys and values of the last
C frames (right-aligned; `length` of them valid) and the last `left` inputs of the depthwise conv, and
the input history of the subsampling convs (ConvSubsampling.cache_shapes). Streams at different fill
levels share a batch: unfilled cache rows are masked out of attention, as in NeMo's
cache_aware_stream_step. A step projects and convolves only its new frames, so its cost grows with the
chunk, not with the 70-frame left context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.conformer import ConformerEncoder
from ..models.precision import exact_fp32
from .plan import ChunkPlan


@dataclass
class EncoderCache:
    """Streaming encoder state of B streams, one tensor per layer (batch first)."""

    keys: list[torch.Tensor]  # per layer [B, H, C, d_k] projected keys of the last C frames
    values: list[torch.Tensor]  # per layer [B, H, C, d_k]
    conv: list[torch.Tensor]  # per layer [B, d_model, conv_left] depthwise-conv input history
    sub: list[torch.Tensor]  # subsampling input history, [B, *shape] per ConvSubsampling.cache_shapes()
    length: torch.Tensor  # [B] long: valid cached attention frames (the last `length` of C)
    # [B] long or None. Set (SlotCache.gather): keys and values are [B, H, C + T, d_k], their first C
    # frames a ring whose oldest frame sits at `ring`, then room for the step's T new frames; the step
    # then returns only the new frames' keys and values (SlotCache.store puts them in the ring).
    ring: torch.Tensor | None = None

    @staticmethod
    def zeros(encoder: ConformerEncoder, cache_frames: int, batch: int, device=None, dtype=None) -> "EncoderCache":
        cfg = encoder.cfg
        dtype = dtype or encoder.dtype
        kv = (batch, cfg.n_heads, cache_frames, cfg.d_head)
        layers = range(cfg.n_layers)
        return EncoderCache(
            keys=[torch.zeros(kv, device=device, dtype=dtype) for _ in layers],
            values=[torch.zeros(kv, device=device, dtype=dtype) for _ in layers],
            conv=[torch.zeros(batch, cfg.d_model, cfg.conv_context[0], device=device, dtype=dtype) for _ in layers],
            sub=[torch.zeros(batch, *s, device=device, dtype=dtype) for s in encoder.pre_encode.cache_shapes()],
            length=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @staticmethod
    def cat(caches: list["EncoderCache"]) -> "EncoderCache":
        """Join the streams of several caches into one batch, in order."""
        return EncoderCache(
            keys=[torch.cat(t) for t in zip(*(c.keys for c in caches))],
            values=[torch.cat(t) for t in zip(*(c.values for c in caches))],
            conv=[torch.cat(t) for t in zip(*(c.conv for c in caches))],
            sub=[torch.cat(t) for t in zip(*(c.sub for c in caches))],
            length=torch.cat([c.length for c in caches]),
        )

    def select(self, rows: torch.Tensor | slice) -> "EncoderCache":
        """The cache of a subset of the streams."""
        return EncoderCache(
            keys=[t[rows] for t in self.keys],
            values=[t[rows] for t in self.values],
            conv=[t[rows] for t in self.conv],
            sub=[t[rows] for t in self.sub],
            length=self.length[rows],
        )


@torch.no_grad()
def encoder_step(
    encoder: ConformerEncoder,
    plan: ChunkPlan,
    mel: torch.Tensor,
    cache: EncoderCache,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, EncoderCache]:
    """mel: [B, step_mel, F] fp32 new frames. lo, hi: [B] valid range of [cached frame, new frames]
    (None: all valid); lo > 0 only on a stream's first step (ModeShape.first_valid), hi only on its
    last, partial one. Returns (encoded [B, T, d], valid encoded frames [B], next cache)."""
    with exact_fp32(encoder.dtype):
        return _step(encoder, plan, mel, cache, lo, hi)


def _step(encoder, plan, mel, cache, lo, hi):
    shape = plan.shape
    x, sub, out_len = encoder.pre_encode.step(mel.to(encoder.dtype), cache.sub, lo, hi)  # [B, T, d]
    if encoder.xscale is not None:
        x = x * encoder.xscale
    batch, frames = x.shape[0], x.shape[1]
    if out_len is None:
        out_len = torch.full((batch,), frames, dtype=torch.long, device=x.device)
    c = shape.cache_frames
    t = torch.arange(c + frames, device=x.device)  # [C+T] key positions, in order
    query_valid = t[None, c:] < (c + out_len)[:, None]  # [B, T]
    key_valid = (t[None, :] >= (c - cache.length)[:, None]) & (t[None, :] < (c + out_len)[:, None])  # [B, C+T]
    hidden = ~(plan.pattern[None, None] & query_valid[:, None, :, None] & key_valid[:, None, None, :])  # [B, 1, T, C+T]
    padded = ~query_valid
    order = None
    kept = frames  # keys and values from this index on are the next cache
    if cache.ring is not None:
        # Key position m of the ring layout holds frame (m - ring) mod C of the in-order layout the mask
        # and the positional scores are computed in; the new frames follow in order.
        ring = (t[None, :c] - cache.ring[:, None]) % c  # [B, C]
        order = torch.cat((ring, t[None, c:].expand(batch, frames)), dim=1)[:, None, None, :]  # [B, 1, 1, C+T]
        hidden = hidden.gather(3, order.expand(-1, -1, frames, -1))
        kept = c
    keys, values, conv = [], [], []
    for i, layer in enumerate(encoder.layers):
        x, k, v, history = layer(
            x, plan.positions[i], hidden, padded, cache.keys[i], cache.values[i], cache.conv[i], order
        )
        keys.append(k[:, :, kept:])
        values.append(v[:, :, kept:])
        conv.append(history[:, :, frames:])
    # As NeMo, the fill grows by the step's full (padded) width; only a stream's last step is padded.
    length = torch.clamp(cache.length + frames, max=c)
    return x, out_len, EncoderCache(keys=keys, values=values, conv=conv, sub=sub, length=length, ring=cache.ring)
