"""When a remote stream's audio must go to the server, so that small frames travel together.

Most of what a WebSocket message costs the server's event loop is per message, not per sample
(BENCHMARKS.md, server ingest): a client sending every 20 ms frame as it comes makes 50 messages a
second per stream, and that, not the GPU, caps how many streams one `serve` process takes. But the
server does nothing with a stream's audio until it completes an encoder window (or, with VAD, a VAD
window): the points at which it does are fixed by the latency mode, the utterance's start and the VAD's
grid, and the ready message says where (`StepTiming`). Audio held back until the push that reaches the next such point arrives, at that push,
exactly when the server would first have used it, so no Partial, Final or VAD event comes later; the
server gets one message per point instead of one per frame.

Counting happens at the model rate, where the points are. When the stream's rate differs, the server
resamples, and how many model-rate samples it holds after a message depends on the resampler's internal
blocks; a shadow of that resampler, fed silence of the same lengths, gives the exact count (the count
depends on the lengths only, not on how they are split, which tests/client/test_coalesce.py checks).
"""

from __future__ import annotations

import numpy as np

from ..audio import StreamResampler
from ..engine.scheduler import StepTiming

# A push finding audio held longer than this sends it whatever the points say: a producer that slows down
# or pauses (a muted microphone sending keepalive silence) must not leave audio unsent for long, since
# the server's idle timeout and its shutdown accounting see only what arrived.
MAX_HOLD_SECONDS = 1.0


class Coalescer:
    """The points a stream's held audio goes out at. Pure bookkeeping: the caller holds the audio, asks
    `add` after each push whether to send everything held, and reports sends and flushes."""

    def __init__(self, timing: StepTiming, sample_rate: int, model_sample_rate: int):
        self.timing = timing
        self._shadow = StreamResampler(sample_rate, model_sample_rate) if sample_rate != model_sample_rate else None
        self._silence = np.zeros(0, dtype=np.float32)
        self.written = 0  # model-rate samples the server holds once everything pushed is sent
        self.sent = 0  # ... once what was sent so far is (the audio held is between the two)
        self.utterance_start = 0  # model-rate sample where the server's current utterance starts
        self.next_point = self._point_after(0)

    def add(self, samples: int) -> bool:
        """Count a push of `samples` (at the stream's rate); True when everything held must go now."""
        self.written += self._model_samples(samples)
        return self.written >= self.next_point

    def mark_sent(self) -> None:
        self.sent = self.written
        self.next_point = self._point_after(self.sent)

    def flushed(self) -> None:
        """A flush went out: the server's resampler gave its tail, and the next utterance starts after it."""
        if self._shadow is not None:
            self.written += len(self._shadow.flush())
        self.sent = self.utterance_start = self.written
        self.next_point = self._point_after(self.sent)

    def _point_after(self, position: int) -> int:
        """The first model-rate sample count beyond `position` at which the server has work."""
        timing = self.timing
        into = position - self.utterance_start - timing.first  # samples past the utterance's first step point
        step = self.utterance_start + timing.first + max(0, into // timing.every + 1) * timing.every
        if timing.vad_window is None:
            return step
        # The VAD judges each window of its grid as soon as the window is complete, often in a tick run
        # for other streams' steps: a window's last sample is a point too.
        return min(step, (position // timing.vad_window + 1) * timing.vad_window)

    def _model_samples(self, samples: int) -> int:
        if self._shadow is None:
            return samples
        if len(self._silence) < samples:
            self._silence = np.zeros(samples, dtype=np.float32)
        return len(self._shadow.push(self._silence[:samples]))
