"""Precomputed tensors of one cache-aware latency mode (its geometry is ModeShape, in shape.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.conformer import ConformerEncoder, attention_pattern
from .shape import ModeShape


@dataclass
class ChunkPlan:
    """A ModeShape plus the tensors every step of that mode reuses."""

    shape: ModeShape
    pattern: torch.Tensor  # [T, C+T] bool: attention allowed by the mode, before padding masks
    positions: list[torch.Tensor]  # per layer [H, d_k, C+2T-1]: linear_pos of the relative positions

    @staticmethod
    @torch.no_grad()
    def build(encoder: ConformerEncoder, context: tuple[int, int]) -> "ChunkPlan":
        shape = ModeShape.of(encoder.cfg, context)
        keys = shape.cache_frames + shape.chunk_frames
        device = encoder.pre_encode.out.weight.device
        pattern = attention_pattern(encoder.cfg.att_context_style, context, shape.chunk_frames, keys, device)
        return ChunkPlan(shape=shape, pattern=pattern, positions=encoder.positions(shape.chunk_frames, keys))
