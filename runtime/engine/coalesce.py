"""When a stream's pushed audio must go on, so that small frames travel together.

An engine does nothing with a stream's audio until it completes an encoder window (or, with VAD, a VAD
window), and where those points fall is fixed by the latency mode, the utterance's start and the VAD's
grid (`StepTiming`). Audio held back until the push that reaches the next point goes on at that push,
exactly when the engine would first have used it, so no Partial, Final or VAD event comes later, and the
work a push costs beyond its conversion happens once per point instead of once per frame:

- a remote stream (client/remote.py) sends one WebSocket message per point. Most of what a message
  costs the server's event loop is per message, not per sample (BENCHMARKS.md, server ingest), and at
  50 messages a second per stream that, not the GPU, capped how many streams one `serve` process takes;
- a local stream (engine/frontdoor.py) writes into the engine once per point: the core's lock, its
  buffer bookkeeping and the ring copy, on the GIL the engine's loop thread needs.

Counting happens at the model rate, where the points are. A local stream counts what its resampler made.
A remote stream at a rate the server resamples cannot see that: how many model-rate samples the server
holds after a message depends on its resampler's internal blocks, so a shadow of that resampler, fed
silence of the same lengths, gives the exact count (the count depends on the lengths only, not on how
they are split, which tests/client/test_coalesce.py checks against an engine).
"""

from __future__ import annotations

import numpy as np

from ..audio import StreamResampler
from .scheduler import StepTiming

# A push after a pause this long, or finding audio held this long, lets everything go whatever the points
# say: a producer that slows down or pauses (a muted microphone sending keepalive silence) must not leave
# audio held for long, since a server's idle timeout, its shutdown accounting and a stream's buffered
# seconds see only what went on.
MAX_HOLD_SECONDS = 1.0


class Coalescer:
    """The points a stream's held audio goes on at. Pure bookkeeping: the caller holds the audio, asks
    `add` at each push whether everything held must go on now, and reports that (`mark_sent`) and
    flushes."""

    def __init__(self, timing: StepTiming, sample_rate: int, model_sample_rate: int):
        self.timing = timing
        self._shadow = StreamResampler(sample_rate, model_sample_rate) if sample_rate != model_sample_rate else None
        self._silence = np.zeros(0, dtype=np.float32)
        self.written = 0  # model-rate samples the server holds once everything pushed is sent
        self.sent = 0  # ... once what was sent so far is (the audio held is between the two)
        self.utterance_start = 0  # model-rate sample where the server's current utterance starts
        self.next_point = self._point_after(0)
        self._last_push = float("-inf")
        self._held_since = 0.0

    def add(self, samples: int, now: float) -> bool:
        """Count a push of `samples` (at the stream's rate) made at `now` (seconds of a monotonic clock);
        True when everything held must go on now."""
        paused = now - self._last_push >= MAX_HOLD_SECONDS
        self._last_push = now
        if self.written == self.sent:  # nothing was held before this push
            self._held_since = now
        self.written += self._model_samples(samples)
        return self.written >= self.next_point or paused or now - self._held_since >= MAX_HOLD_SECONDS

    def mark_sent(self) -> None:
        self.sent = self.written
        self.next_point = self._point_after(self.sent)

    def flushed(self, tail: int = 0) -> None:
        """A flush went out: the resampler gave its tail (`tail` model-rate samples, counted by a caller
        that sees it; a remote stream's shadow gives its own), and the next utterance starts after it."""
        self.written += tail if self._shadow is None else len(self._shadow.flush())
        self.sent = self.utterance_start = self.written
        self.next_point = self._point_after(self.sent)

    def cut(self, point: int) -> None:
        """A flush ended the utterance at model-rate sample `point`, inside the audio sent (the
        resampler keeps its state): the next utterance starts there."""
        self.utterance_start = point
        self.next_point = self._point_after(self.sent)

    def reopen(self, start: int) -> None:
        """A flush counted by `flushed` did not go out after all: the utterance that began at `start`
        goes on (the tail stays counted: it is sent at the next push or flush)."""
        self.utterance_start = start
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
