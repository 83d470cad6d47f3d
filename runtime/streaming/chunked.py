"""Whole clips through the streaming step: bounded memory for long audio on cache-aware models.

Offline encoding attends over the whole clip at once, so its attention scores grow with the square of the
clip's length (an hour of audio would need tens of GB) even though a chunked_limited mask lets each
frame see only its chunk and the left context. Stepping the clips chunk by chunk, as streams, gives the
same tokens (streaming equals offline) in memory that does not grow with length.
"""

from __future__ import annotations

import torch

from ..decoding.greedy import DecodedChunk, greedy_decode, initial_state
from ..models.transducer_model import TransducerModel
from .encoder_step import EncoderCache, encoder_step
from .plan import ChunkPlan


@torch.no_grad()
def decode_chunked(
    module: TransducerModel,
    plan: ChunkPlan,
    features: torch.Tensor,
    n_frames: torch.Tensor,
    durations: tuple[int, ...],
    max_symbols: int | None,
) -> DecodedChunk:
    """features: [B, F, T] offline features; n_frames: [B] valid frames. Returns every clip's labels."""
    shape = plan.shape
    batch, device = features.shape[0], features.device
    step = shape.step_mel
    # Frames before the start are the zeros a first step's window holds; pad the end to whole windows.
    padded = torch.nn.functional.pad(features, (-shape.first_start, step))
    cache = EncoderCache.zeros(module.encoder, shape.cache_frames, batch, device)
    state = initial_state(module.decoder, module.joint, batch, device)
    result = DecodedChunk(labels=[[] for _ in range(batch)], frames=[[] for _ in range(batch)], durations=[[] for _ in range(batch)])
    lengths = n_frames.tolist()
    n = n_frames.to(device)
    start = shape.first_start
    # A clip needs a step while it has real frames at or after the window start (none before frame 0).
    while any(length > max(0, start) for length in lengths):
        offset = start - shape.first_start
        window = padded[:, :, offset : offset + step].transpose(1, 2)  # [B, step, F]
        first = shape.first_valid(start)
        lo = torch.full((batch,), first, device=device) if first else None
        needs_step = n > max(0, start)
        # hi counts the cached frame before the window; 1 (nothing valid) for clips already done.
        hi = torch.where(needs_step, 1 + torch.clamp(n - start, 0, step), torch.ones_like(n))
        full = all(length >= start + step for length in lengths)
        encoded, valid, cache = encoder_step(module.encoder, plan, window, cache, lo, None if full else hi)
        decoded, state = greedy_decode(module.decoder, module.joint, encoded, valid, state, durations, max_symbols)
        for row in range(batch):
            result.labels[row] += decoded.labels[row]
            result.frames[row] += decoded.frames[row]
            result.durations[row] += decoded.durations[row]
        start += step
    return result
