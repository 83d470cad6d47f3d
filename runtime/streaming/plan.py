"""Shapes and precomputed tensors of one cache-aware latency mode.

For a mode [left, right] and subsampling factor f, NeMo streams chunks of (right + 1) encoder frames:
its first step takes 1 + f*right mel frames, later steps take f + 1 cached mel frames plus f*(right + 1)
new ones and drop the first 2 subsampled frames. Here every step, the first included, takes the same
window of f + 1 + f*(right + 1) mel frames starting at mel index `start`; frames before the stream's
start are zeros masked out by the subsampling (lo = -start), which reproduces NeMo's first step exactly
while letting first and later steps share one batch and one shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.config import EncoderConfig
from ..models.conformer import ConformerEncoder, attention_pattern


@dataclass(frozen=True)
class ModeShape:
    """Integer geometry of a latency mode (no tensors: usable from the scheduler)."""

    context: tuple[int, int]  # attention (left, right) in encoder frames
    factor: int  # subsampling factor
    chunk_frames: int  # encoder frames per step: right + 1
    cache_frames: int  # attention left context kept per layer: left
    step_mel: int  # new mel frames per step: factor * (right + 1)
    window_mel: int  # mel frames fed per step: factor + 1 + step_mel
    drop: int  # subsampled frames dropped from the window's start: they belong to the previous step
    first_start: int  # mel index of the first window's start (negative: zero-padded stream start)

    @staticmethod
    def of(cfg: EncoderConfig, context: tuple[int, int]) -> "ModeShape":
        f = cfg.subsampling_factor
        left, right = context
        pre_cache = f + 1  # NeMo's pre_encode_cache_size
        drop = 1 + (pre_cache - 1) // f
        step_mel = f * (right + 1)
        window = pre_cache + step_mel
        first_mel = 1 + f * right
        return ModeShape(
            context=(left, right),
            factor=f,
            chunk_frames=right + 1,
            cache_frames=left,
            step_mel=step_mel,
            window_mel=window,
            drop=drop,
            first_start=first_mel - window,
        )

    def frame_ms(self, hop_length: int, sample_rate: int) -> float:
        return 1000.0 * self.factor * hop_length / sample_rate

    def latency_ms(self, hop_length: int, sample_rate: int) -> int:
        """Chunk duration, the mode's algorithmic latency: (right + 1) encoder frames."""
        return round(self.chunk_frames * self.frame_ms(hop_length, sample_rate))


@dataclass
class ChunkPlan:
    """A ModeShape plus the tensors every step of that mode reuses."""

    shape: ModeShape
    pattern: torch.Tensor  # [T, C+T] bool: attention allowed by the mode, before padding masks
    positions: list[torch.Tensor]  # per layer [1, H, 2(C+T)-1, d_k]: linear_pos of the relative positions

    @staticmethod
    @torch.no_grad()
    def build(encoder: ConformerEncoder, context: tuple[int, int]) -> "ChunkPlan":
        shape = ModeShape.of(encoder.cfg, context)
        keys = shape.cache_frames + shape.chunk_frames
        device = encoder.pre_encode.out.weight.device
        pattern = attention_pattern(encoder.cfg.att_context_style, context, shape.chunk_frames, keys, device)
        return ChunkPlan(shape=shape, pattern=pattern, positions=encoder.positions(keys))
