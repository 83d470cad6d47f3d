"""Encoder caches of every engine slot, laid out so a step copies each row's attention cache once.

EncoderCache keeps a stream's last C keys and values in order, so a batched step over slot-indexed
caches gathers its rows, concatenates the new frames after them for attention and scatters the last C
back: three copies of every row's cache per step (at batch 32 on the 2-core CPU, the largest items of
the step after the matrix products). Here each slot's C frames form a ring: a step gathers its rows
once, into buffers with room for its T new frames, attends over ring and new frames (the positional
scores and the mask permuted to the ring's order, see encoder_step), and writes back only the T new
frames, over the ring's T oldest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.conformer import ConformerEncoder
from .encoder_step import EncoderCache, encoder_step
from .plan import ChunkPlan


@dataclass
class SlotCache:
    """Streaming encoder state of S slots, one tensor per layer (slot first)."""

    keys: list[torch.Tensor]  # per layer [S, H, C, d_k] projected keys of the last C frames, a ring
    values: list[torch.Tensor]  # per layer [S, H, C, d_k], the same ring
    conv: list[torch.Tensor]  # per layer [S, d_model, conv_left] depthwise-conv input history, in order
    sub: list[torch.Tensor]  # per cached subsampling input [S, *shape] (ConvSubsampling.cache_shapes)
    length: torch.Tensor  # [S] long: valid cached frames (the newest `length` of the ring)
    oldest: torch.Tensor  # [S] long: ring position of the oldest frame, where the next frame goes

    @staticmethod
    def zeros(encoder: ConformerEncoder, cache_frames: int, slots: int, device=None, dtype=None) -> "SlotCache":
        if cache_frames < 1:
            raise ValueError("slot caches need a left attention context of at least one frame")
        flat = EncoderCache.zeros(encoder, cache_frames, slots, device, dtype)
        oldest = torch.zeros(slots, dtype=torch.long, device=device)
        return SlotCache(flat.keys, flat.values, flat.conv, flat.sub, flat.length, oldest)

    @property
    def cache_frames(self) -> int:
        return self.keys[0].shape[2]

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty these slots' caches: the next step of each is a stream's first."""
        for t in self.keys + self.values + self.conv + self.sub:
            t.index_fill_(0, rows, 0.0)
        self.length.index_fill_(0, rows, 0)
        self.oldest.index_fill_(0, rows, 0)

    def gather(self, rows: torch.Tensor, frames: int) -> EncoderCache:
        """The caches of slots `rows` for a step of `frames` new frames: keys and values [B, H, C + frames,
        d_k] hold each ring (in ring order) with room after it, `ring` its oldest position."""
        b, c = rows.shape[0], self.cache_frames

        def gather_ring(slot_tensor: torch.Tensor) -> torch.Tensor:
            h, d = slot_tensor.shape[1], slot_tensor.shape[3]
            out = torch.empty((b, h, c + frames, d), dtype=slot_tensor.dtype, device=slot_tensor.device)
            # index_select, not t[rows]: on CPU the indexing kernel ran several times slower for these rows.
            torch.index_select(slot_tensor, 0, rows, out=out[:, :, :c])
            return out

        return EncoderCache(
            keys=[gather_ring(t) for t in self.keys],
            values=[gather_ring(t) for t in self.values],
            conv=[torch.index_select(t, 0, rows) for t in self.conv],
            sub=[torch.index_select(t, 0, rows) for t in self.sub],
            length=torch.index_select(self.length, 0, rows),
            ring=torch.index_select(self.oldest, 0, rows),
        )

    def store(self, rows: torch.Tensor, new: EncoderCache) -> None:
        """Write a step's result (encoder_step on `gather(rows, T)`: keys and values of the T new frames)
        into slots `rows`: the new frames over the ring's T oldest, the rest replaced."""
        frames, c = new.keys[0].shape[2], self.cache_frames
        at = (new.ring[:, None] + torch.arange(frames, device=rows.device)) % c  # [B, T] ring positions
        for dst, src in zip(self.keys + self.values, new.keys + new.values):
            dst[rows[:, None], :, at] = src.transpose(1, 2).to(dst.dtype)  # [B, T, H, d_k]
        for dst, src in zip(self.conv + self.sub, new.conv + new.sub):
            dst.index_copy_(0, rows, src.to(dst.dtype))
        self.length.index_copy_(0, rows, new.length)
        self.oldest.index_copy_(0, rows, (new.ring + frames) % c)


def slot_encoder_step(
    encoder: ConformerEncoder,
    plan: ChunkPlan,
    mel: torch.Tensor,
    slots: SlotCache,
    rows: torch.Tensor,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """encoder_step for slots `rows` [B] of `slots`, updating their caches in place. mel, lo, hi as for
    encoder_step. Returns (encoded [B, T, d], valid encoded frames [B])."""
    out, length, new = encoder_step(encoder, plan, mel, slots.gather(rows, plan.shape.chunk_frames), lo, hi)
    slots.store(rows, new)
    return out, length
