"""Integer geometry of a cache-aware latency mode, free of torch so the scheduler can use it.

For a mode [left, right] and subsampling factor f, a streaming step turns f*(right + 1) new mel frames
into right + 1 encoder frames. NeMo's first step is shorter (1 + f*right mel frames); here it is laid out
like every later step, its window starting f - 1 frames before the stream's start, and those frames are
masked zeros, which is exactly the zero padding offline encoding sees. So first and later steps share one
batch and one shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeShape:
    """Integer geometry of a latency mode (no tensors: usable from the scheduler)."""

    context: tuple[int, int]  # attention (left, right) in encoder frames
    factor: int  # subsampling factor
    chunk_frames: int  # encoder frames per step: right + 1
    cache_frames: int  # attention left context kept per layer: left
    step_mel: int  # mel frames per step: factor * (right + 1)
    first_start: int  # mel index where the first step's window starts (1 - factor: before the stream)

    @staticmethod
    def of(cfg, context: tuple[int, int]) -> "ModeShape":
        """cfg: the model's EncoderConfig."""
        f = cfg.subsampling_factor
        left, right = context
        return ModeShape(
            context=(left, right),
            factor=f,
            chunk_frames=right + 1,
            cache_frames=left,
            step_mel=f * (right + 1),
            first_start=1 - f,
        )

    def first_valid(self, window_start: int) -> int:
        """`lo` of a step whose window starts at mel `window_start`: its index of mel frame 0, counting
        the subsampling's cached frame (0 once the stream has started)."""
        return 1 - window_start if window_start < 0 else 0

    def frame_ms(self, hop_length: int, sample_rate: int) -> float:
        return 1000.0 * self.factor * hop_length / sample_rate

    def latency_ms(self, hop_length: int, sample_rate: int) -> int:
        """Chunk duration, the mode's algorithmic latency: (right + 1) encoder frames."""
        return round(self.chunk_frames * self.frame_ms(hop_length, sample_rate))
