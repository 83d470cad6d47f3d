"""Speech start/end transitions of one stream from its per-window speech probabilities (pure Python).

This is the hysteresis of Silero's offline `get_speech_timestamps`, run online: fed the probabilities of
a stream's consecutive 512-sample windows in any grouping, it reports each kept speech segment as a
"start" and later an "end" transition, at the same samples `get_speech_timestamps` would return for the
whole audio (with its default max_speech_duration_s=inf; splitting long segments is not done here),
as long as 2 * speech_pad_ms <= min_silence_ms + 32 (true for the defaults; see `VADPolicy`) and the
zero-padded final window of the stream is given to `flush()`. It reports a transition once it is certain:

- start: a segment opens at the first window with prob >= threshold, but is kept only if it lasts more
  than min_speech_ms, so "start" is reported once that is certain (about min_speech_ms after speech
  began), carrying the sample where speech began minus speech_pad_ms.
- end: once in speech, the first window with prob < neg_threshold begins a silence; a window with
  prob >= threshold cancels it (windows in between neither begin nor cancel one). When a silent window
  lies min_silence_ms or more after the silence began, the segment closes and "end" is reported at the
  sample where the silence began plus speech_pad_ms (never later than the audio seen so far).
- flush: the stream ended; given its last probabilities and true length, an open segment is closed at
  the stream's last sample.

No torch here: the engine's scheduler side can use it without the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from ..errors import StreamError
from ..validate import finite_real

SAMPLE_RATE = 16000  # the Silero 16 kHz model's rate; positions are integer samples at this rate
WINDOW = 512  # samples per probability (one Silero window); equals monosemantic.vad.silero.WINDOW


@dataclass(frozen=True)
class VADConfig:
    """Thresholds and durations of the speech-segment policy; names and defaults follow Silero's
    `get_speech_timestamps` (its `*_duration_ms` arguments without the `_duration`)."""

    threshold: float = 0.5
    """A window with speech probability >= this is speech: it opens a segment or cancels a silence."""
    neg_threshold: float | None = None
    """Inside a segment, a window with probability < this is silence. None: max(threshold - 0.15, 0.01),
    Silero's default. Probabilities in [neg_threshold, threshold) keep the current state (hysteresis)."""
    min_speech_ms: int = 250
    """Segments not longer than this (from the first speech window to the start of the closing silence)
    are dropped, and a segment's start is reported only once it is known to be longer."""
    min_silence_ms: int = 100
    """A segment closes once a silent window lies this long after its silence began, i.e. the end is
    reported about min_silence_ms + 32 ms after speech stopped. 100 ms is Silero's default: it yields
    speech segments, not turns; end-of-turn detection is a separate, slower decision downstream."""
    speech_pad_ms: int = 30
    """Reported starts are moved this much earlier, ends this much later (clamped to the stream)."""

    def __post_init__(self) -> None:
        for name in ("threshold", "neg_threshold"):
            value = getattr(self, name)
            if value is None and name == "neg_threshold":
                continue
            if not finite_real(value):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(f"neg_threshold must be in [0, threshold={self.threshold}], got {self.neg_threshold}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (milliseconds), got {value!r}")

    @property
    def exit_threshold(self) -> float:
        """`neg_threshold` with the default resolved."""
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class VADTransition:
    """Speech started or ended at `sample` (counted from the stream's first sample, 16 kHz)."""

    kind: Literal["start", "end"]
    sample: int


def _ms_to_samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000


class VADPolicy:
    """The speech-segment state machine of one stream (see the module docstring for the rules).

    `update(probs)` takes the probabilities of the stream's next windows (window i covers samples
    [512 i, 512 i + 512)) and returns the transitions they make certain; `flush()` ends the stream.
    Transitions alternate start, end, start, ... and never decrease.

    Padding equals Silero's whenever 2 * speech_pad_ms <= min_silence_ms + 32 ms, because the gap between
    two kept segments is then always at least two pads. Otherwise (which Silero resolves by splitting
    the gap in half, knowing the future) a start is clamped so it does not precede the previous end.
    """

    def __init__(self, config: VADConfig | None = None) -> None:
        self.config = config or VADConfig()
        self._min_speech = _ms_to_samples(self.config.min_speech_ms)
        self._min_silence = _ms_to_samples(self.config.min_silence_ms)
        self._pad = _ms_to_samples(self.config.speech_pad_ms)
        self._enter = self.config.threshold
        self._exit = self.config.exit_threshold
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next window is the first of a new stream."""
        self._windows = 0  # windows consumed
        self._triggered = False  # a candidate segment is open (reported or not)
        self._start = 0  # first sample of the open segment's first speech window
        self._silence_start: int | None = None  # first sample of the silence pending inside the segment
        self._reported = False  # the open segment's start has been reported
        self._last_end = 0  # last reported end; starts never precede it
        # End of the last window that was not silence: at or above threshold, or inside a segment at or
        # above neg_threshold (the hysteresis). The engine's skip_silence counts silence from here.
        self.voiced_until = 0
        self._flushed = False
        self._stream_end: int | None = None  # the stream's true length, once flush() gives it

    @property
    def position(self) -> int:
        """Samples covered by the windows consumed so far."""
        return self._windows * WINDOW

    @property
    def in_speech(self) -> bool:
        """A start has been reported and its end not yet."""
        return self._reported

    def _seen(self) -> int:
        """End of the audio seen so far (the true end once flushing, not the zero-padded window's)."""
        return self.position if self._stream_end is None else min(self.position, self._stream_end)

    def update(self, probs: Iterable[float]) -> list[VADTransition]:
        """Consume the speech probabilities of the stream's next windows, in order."""
        if self._flushed:
            raise StreamError("VADPolicy.update after flush(); call reset() to start a new stream")
        out: list[VADTransition] = []
        for p in probs:
            p = float(p)
            cur = self._windows * WINDOW  # first sample of this window
            self._windows += 1
            if p >= self._enter or (self._triggered and p >= self._exit):
                self.voiced_until = cur + WINDOW
            if not self._triggered:
                if p >= self._enter:  # the window that opens a segment is never a silent one (as Silero)
                    self._triggered, self._start, self._silence_start = True, cur, None
            else:
                if p >= self._enter:
                    self._silence_start = None
                # Not `elif`: with threshold < 0.01 the default exit threshold (0.01) lies above it, and a
                # window in [threshold, 0.01) is both; Silero cancels the pending silence there and then
                # begins one at that window. Otherwise the two tests exclude each other.
                if p < self._exit:
                    if self._silence_start is None:
                        self._silence_start = cur
                    # Silero measures silence from the first sample of the first silent window to the first
                    # sample of the current one, so 100 ms takes 5 silent windows (4 * 512 = 2048 >= 1600).
                    if cur - self._silence_start >= self._min_silence:
                        self._close(self._silence_start, out)
                        continue
            if self._triggered and not self._reported:
                # Lower bound of where the segment will end: a pending silence can still be confirmed,
                # otherwise the earliest is the end of this window (a silence beginning at the next one).
                earliest_end = self._silence_start if self._silence_start is not None else self._seen()
                if earliest_end - self._start > self._min_speech:
                    self._report_start(out)
        return out

    def flush(self, probs: Iterable[float] = (), end_sample: int | None = None) -> list[VADTransition]:
        """End of stream: consume the stream's last window probabilities `probs` (the final window may be
        zero-padded), then close an open segment at `end_sample`, the stream's true length (default: the
        end of the last window). Like Silero, the segment ends there even if a silence was pending, and
        is dropped if it lasted min_speech_ms or less. Further calls raise until `reset()`."""
        if self._flushed:
            raise StreamError("VADPolicy.flush after flush(); call reset() to start a new stream")
        probs = list(probs)
        last = self.position + len(probs) * WINDOW
        end = last if end_sample is None else int(end_sample)
        if not (end >= 0 and last - WINDOW < end <= last):
            raise ValueError(f"end_sample {end_sample} is not inside the stream's last window (ending at {last})")
        # Known before the last window is judged, so a segment cut short by a padded final window is
        # dropped exactly as Silero drops it, instead of being reported and then unretractable.
        self._stream_end = end
        out = self.update(probs)
        self._flushed = True
        if self._triggered:
            self._close(end, out)  # the end pad is clamped away: nothing lies beyond the last sample
        return out

    def _report_start(self, out: list[VADTransition]) -> None:
        self._reported = True
        out.append(VADTransition("start", max(self._start - self._pad, self._last_end, 0)))

    def _close(self, end: int, out: list[VADTransition]) -> None:
        """Close the open segment at raw end sample `end`, reporting it if it is long enough."""
        # A reported start is never retracted. It is always long enough here unless the caller ran the
        # zero-padded final window through update() instead of flush(): then it is closed regardless.
        if self._reported or end - self._start > self._min_speech:
            if not self._reported:  # only at flush: a segment kept at a close is reported before it
                self._report_start(out)
            self._last_end = min(end + self._pad, self._seen())
            out.append(VADTransition("end", self._last_end))
        self._triggered, self._reported, self._silence_start = False, False, None
