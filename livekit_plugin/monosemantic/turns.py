"""Engine events -> LiveKit speech events, for one RecognizeStream (pure: no asyncio, no engine).

The engine reports voice activity (SpeechStarted/SpeechEnded), hypotheses (Partial) and one Final per
flush. LiveKit wants turns: START -> INTERIM* -> PREFLIGHT -> FINAL -> END, exactly one END per START.
`TurnTracker` is that state machine:

- A turn opens at the VAD's SpeechStarted (START) and closes when the Final of the flush the plugin makes
  at the VAD's SpeechEnded arrives (PREFLIGHT at SpeechEnded, then FINAL, then END). FINAL comes before
  END, as in Deepgram Flux, so with turn_detection="stt" the session's end-of-turn check sees the text.
- Speech that starts again while the previous turn's Final is still being computed is held back and
  opens its turn right after that END, so turns never overlap.
- A flush the framework asks for (manual_flush) always yields a FINAL, empty or not: the session waits
  for one after committing a turn. Inside a turn it does not end the turn (the VAD does that).
- A non-empty Final outside any turn (text the model found in audio the VAD called silence) is not
  dropped: it is delivered as its own START, FINAL, END (START at its first word).
- Without the engine's VAD (`vad=False`) the text makes the turns: the first Partial with text opens a
  turn, dated where that text begins (`_text_onset`), and the next Final closes it.
- `close()` ends an open turn: every START gets its END, also on close and errors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

from livekit.agents import stt
from livekit.agents.types import TimedString

import monosemantic

FlushReason = Literal["vad", "framework"]
"""Who flushed: the plugin at the VAD's SpeechEnded, or the framework (FlushSentinel)."""

SAMPLE_RATE = 16000  # engine event times are samples at the model's rate


@dataclass
class Clock:
    """Engine sample counts -> LiveKit seconds. `offset` returns the stream's time origin, its
    `start_time_offset` (read at each event: the framework sets it after the stream starts); `first`
    the input sample this run's audio starts at (a retried run starts where the failed one stopped);
    `base` counts the samples of earlier engine streams of the same run (an engine stream is reopened
    for a latency change); `paused(a, b)` the seconds the input paused between input samples a and b
    (wall-clock times only: stream times count the audio)."""

    offset: Callable[[], float]
    anchor: Callable[[], float]  # wall-clock time of the run's first sample (RecognizeStream.start_time)
    base: int = 0
    first: Callable[[], int] = lambda: 0
    paused: Callable[[int, int], float] = lambda a, b: 0.0

    def seconds(self, sample: int) -> float:
        return self.offset() + (self.first() + self.base + sample) / SAMPLE_RATE

    def wall(self, sample: int) -> float:
        first = self.first()
        return self.anchor() + (self.base + sample) / SAMPLE_RATE + self.paused(first, first + self.base + sample)


@dataclass
class _Segment:
    """A VAD speech segment whose START is held back until the previous turn has ended."""

    start: int
    ended: bool = False
    end: int = 0  # where it ended, once ended


class TurnTracker:
    def __init__(
        self, clock: Clock, *, language: str, interim_results: bool, vad: bool = True, chunk: int = 0,
        not_before: float = 0.0,
    ):
        """`not_before`: the last wall-clock time an earlier run's tracker sent (`last_wall`)."""
        self.clock = clock
        # Latest speech_start_time / speech_end_time sent: later ones never come before it. The stream's
        # clock can move back between two events (a frame the event loop delayed dates a stretch of input
        # by its arrival until its backlog, right behind it, dates it back), and LiveKit takes an END
        # before its START, or before the previous END, at its word.
        self.last_wall = not_before
        self.vad = vad  # without the engine's VAD, text opens a turn and every Final closes it
        self.chunk = chunk  # engine samples one step of the engine stream transcribes (its latency mode)
        self.language = language
        self.interim_results = interim_results
        self.state: Literal["idle", "speaking", "ending"] = "idle"
        self.text = ""  # hypothesis of the audio since the last Final
        self.text_end = 0  # engine sample up to which that hypothesis has transcribed the audio
        self.utterance_start = 0  # engine sample where that audio starts (the previous flush point)
        self.pushed = 0  # engine samples pushed so far (the stream tells us)
        self.pending: deque[FlushReason] = deque()  # flushes whose Final has not arrived, in order
        self.held: deque[_Segment] = deque()
        self._speech_start = 0
        self._speech_end: int | None = None  # the open turn's VAD end, once known

    # ---- what the stream tells the tracker -----------------------------------------------------------
    def flushed(self, reason: FlushReason) -> None:
        """The stream called engine_stream.flush(); its Final will follow, after any earlier ones."""
        self.pending.append(reason)

    def handle(self, event) -> tuple[list[stt.SpeechEvent], bool]:
        """Events to send for one engine event, and whether the stream should flush now (VAD end)."""
        if isinstance(event, monosemantic.SpeechStarted):
            return self._speech_started(event.sample), False
        if isinstance(event, monosemantic.SpeechEnded):
            return self._speech_ended(event.sample)
        if isinstance(event, monosemantic.Partial):
            silent_until = self.text_end  # idle without VAD, no text yet: how far the audio had none
            self.text, self.text_end = event.text, event.end
            if not self.vad and self.state == "idle" and event.text:
                return self._open(self._text_onset(silent_until, event.end)), False  # carries the INTERIM
            if self.state == "speaking" and self.interim_results and event.text:
                return [self._transcript(stt.SpeechEventType.INTERIM_TRANSCRIPT, event.text, end=event.end)], False
            return [], False
        if isinstance(event, monosemantic.Final):
            return self._final(event), False
        if isinstance(event, monosemantic.Usage):
            usage = stt.RecognitionUsage(audio_duration=event.audio_seconds)
            return [stt.SpeechEvent(type=stt.SpeechEventType.RECOGNITION_USAGE, recognition_usage=usage)], False
        return [], False  # Error is the stream's business

    def close(self) -> list[stt.SpeechEvent]:
        """The run is over (closed, failed, cancelled): end the open turn, if any."""
        self.held.clear()
        if self.state == "idle":
            return []
        self.state = "idle"
        # Mid-turn, the turn ends where the audio stops; never before its own start.
        end = self._speech_end if self._speech_end is not None else self.pushed
        return [self._end(max(end, self._speech_start))]

    def lost(self) -> list[stt.SpeechEvent]:
        """The engine stream failed with Finals owed: an empty FINAL for each framework flush among them.

        The session waits for a FINAL after a flush it asked for (commit_user_turn, up to its
        `transcript_timeout`), and no later engine stream can answer it: the retry's never saw that
        flush, and the audio before it was lost with this one. The VAD's own flushes need none: `close()`
        ends their turn."""
        out = []
        for reason in self.pending:
            if reason == "framework":
                lost = monosemantic.Final(text="", start=self.utterance_start, end=max(self.utterance_start, self.pushed))
                out.append(self._final_event(lost))
                self.utterance_start = lost.end
        self.pending.clear()
        return out

    def rebase(self, chunk: int) -> None:
        """The stream replaced its engine stream (latency `chunk` samples) at an idle boundary: the new
        one counts samples from 0, after the `pushed` samples of the old one."""
        self.clock.base += self.pushed
        self.pushed = self.utterance_start = self.text_end = 0
        self.chunk = chunk

    @property
    def idle(self) -> bool:
        """No turn open or held, no Final outstanding: a boundary where the engine stream may change."""
        return self.state == "idle" and not self.held and not self.pending

    # ---- transitions -----------------------------------------------------------------------------------
    def _speech_started(self, sample: int) -> list[stt.SpeechEvent]:
        if self.state == "ending" or self.held:
            self.held.append(_Segment(sample))
            return []
        if self.state == "speaking":  # the engine pairs its transitions; tolerate a repeat
            return []
        return self._open(sample)

    def _text_onset(self, silent_until: int, end: int) -> int:
        """Without VAD, where the utterance's speech begins, as well as the events tell, at its first
        text (a Partial transcribed up to `end`).

        The engine sends a Partial only from a step that found tokens, so silence sends none: the
        Partial before the first text is the previous utterance's (or its Final), which says nothing
        about where this text lies; the utterance's start (the previous flush) may be minutes earlier.
        Each step transcribes one chunk (`chunk`: the latency mode, e.g. 160 ms) and ends at the
        Partial's `end`, so the first token lies in the last chunk before `end`: the turn starts at
        `end - chunk`. Never before what is known to hold no text: the utterance's start, or the end of
        a Partial of this utterance whose tokens made no text yet (`silent_until`). The estimate is
        within a chunk of the first token; a token is emitted once the model has heard enough of its
        sound, so the sound itself may begin a little earlier (the first word's start in the Final, a
        frame or so earlier, is known only when the Final comes)."""
        return max(self.utterance_start, silent_until, end - self.chunk)

    def _open(self, sample: int) -> list[stt.SpeechEvent]:
        self.state = "speaking"
        self._speech_start = sample
        self._speech_end = None  # a previous turn's end is not this one's
        onset = self._wall(sample)
        out = [stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH, speech_start_time=onset)]
        if self.text and self.interim_results:  # hypothesis that arrived before the VAD was sure
            out.append(self._transcript(stt.SpeechEventType.INTERIM_TRANSCRIPT, self.text, end=self.text_end))
        return out

    def _speech_ended(self, sample: int) -> tuple[list[stt.SpeechEvent], bool]:
        if self.state == "speaking":
            self.state = "ending"
            self._speech_end = sample
            out = []
            if self.text:
                out.append(self._transcript(stt.SpeechEventType.PREFLIGHT_TRANSCRIPT, self.text, end=sample))
            return out, True
        for segment in self.held:
            if not segment.ended:  # a held segment ended before its turn could open: flush for it too
                segment.ended, segment.end = True, sample
                return [], True
        return [], False

    def _final(self, final) -> list[stt.SpeechEvent]:
        reason = self.pending.popleft() if self.pending else "framework"
        self.text, self.text_end = "", final.end
        self.utterance_start = final.end
        event = self._final_event(final)
        if (reason == "vad" and self.state == "ending") or (not self.vad and self.state == "speaking"):
            end = self._speech_end if self.vad and self._speech_end is not None else final.end
            out = [event, self._end(max(end, self._speech_start))]
            self.state = "idle"
            if self.held:
                segment = self.held.popleft()
                out += self._open(segment.start)
                if segment.ended:
                    self.state, self._speech_end = "ending", segment.end
            return out
        if self.state != "idle" or (reason == "framework" and not final.text):
            return [event]  # inside a turn; or the framework's empty acknowledgement
        if not final.text:
            return []
        # text outside any turn: deliver it as a turn of its own rather than lose it, starting at its
        # first word (the Final's own start is the previous flush, possibly long before)
        out = self._open(final.words[0].start if final.words else final.start)
        self.state = "idle"
        return [o for o in out if o.type != stt.SpeechEventType.INTERIM_TRANSCRIPT] + [event, self._end(final.end)]

    # ---- event builders --------------------------------------------------------------------------------
    def _transcript(self, kind: stt.SpeechEventType, text: str, end: int | None = None) -> stt.SpeechEvent:
        start = self.clock.seconds(self.utterance_start)
        data = stt.SpeechData(
            language=self.language, text=text, start_time=start,
            end_time=start if end is None else max(start, self.clock.seconds(end)),
        )
        return stt.SpeechEvent(type=kind, alternatives=[data])

    def _final_event(self, final) -> stt.SpeechEvent:
        offset = self.clock.offset()  # as LiveKit's own plugins do: times include it, and it is named
        words = [
            TimedString(
                w.text, start_time=self.clock.seconds(w.start), end_time=self.clock.seconds(w.end),
                start_time_offset=offset,
            )
            for w in final.words
        ]
        data = stt.SpeechData(
            language=self.language, text=final.text, start_time=self.clock.seconds(final.start),
            end_time=self.clock.seconds(final.end), words=words,
        )
        return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[data])

    def _end(self, sample: int) -> stt.SpeechEvent:
        return stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH, speech_end_time=self._wall(sample))

    def _wall(self, sample: int) -> float:
        """Wall-clock time of `sample` for a START or END: never in the future (input faster than real
        time runs ahead of the clock), never before the last one sent (`last_wall`)."""
        self.last_wall = max(self.last_wall, min(self.clock.wall(sample), time.time()))
        return self.last_wall
