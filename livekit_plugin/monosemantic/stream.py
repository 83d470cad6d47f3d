"""SpeechStream: one LiveKit RecognizeStream over one engine stream.

Two tasks per run: `_forward_input` moves the framework's frames and flush sentinels into the engine
stream; `_forward_events` turns engine events into SpeechEvents (via TurnTracker) and flushes the engine
stream when the VAD reports the end of speech, at the sample where the VAD says speech ended. An
asyncio lock keeps pushes and flushes in one order, so each flush cuts the audio exactly where the
framework (or the VAD) asked, also when the input runs ahead of the engine.

Input is resampled to 16 kHz by the base class (`sample_rate=16000`): the engine then receives model-rate
audio and its flushes cut at exact samples, while the one resampler (LiveKit's, continuous across our
utterance flushes) never restarts mid-stream. Engine times are then plain sample counts of the pushed
audio.

On a remote engine a timer watches the run's progress: while the engine stream owes something (a flush's
Final, or the end of a stream the plugin closed), `conn_options.timeout` without any event from it ends
the wait (`SpeechStream._check_progress`).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import TYPE_CHECKING, Awaitable, Callable

import numpy as np
from livekit import rtc
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APITimeoutError,
    NotGivenOr,
    stt,
)
from livekit.agents.utils import is_given

import monosemantic

from .backend import EngineLike, EngineStreamLike, as_api_error, engine_error
from .log import logger
from .options import STTOptions
from .turns import SAMPLE_RATE, Clock, FlushReason, TurnTracker

if TYPE_CHECKING:
    from .stt import STT

_CLOSE_GRACE_SECONDS = 2.0  # how long aclose lets the run end its turn before cancelling it
_CUT_GRACE_SECONDS = 1.0  # how long a hung server's connection may take to close before it is cut
_cutting: set[asyncio.Task] = set()  # those closes, running on (a reference keeps each task alive)
_PAUSE_SECONDS = 0.1  # a frame this much later than the audio before it says the input paused
_ORIGINS_KEPT = 256  # input pauses remembered (events refer to the current utterance's audio only)


def frame_pcm(frame: rtc.AudioFrame) -> np.ndarray:
    """int16 mono samples of a frame (interleaved channels are averaged)."""
    pcm = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels > 1:
        pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    return pcm


def mono_frame(frame: rtc.AudioFrame) -> rtc.AudioFrame:
    """The frame with its channels averaged into one (the frame itself when it is mono)."""
    if frame.num_channels <= 1:
        return frame
    pcm = frame_pcm(frame)
    return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm))


class SpeechStream(stt.RecognizeStream):
    def __init__(
        self,
        *,
        stt: "STT",
        opts: STTOptions,
        acquire: Callable[[], Awaitable[EngineLike]],
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        remote: bool = False,
    ) -> None:
        """`remote`: the engine is a server (`STT(base_url=...)`): a wait for what its stream owes is
        bounded by `conn_options.timeout` without progress (`_check_progress`)."""
        super().__init__(stt=stt, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._opts = opts
        self._acquire = acquire
        self._remote = remote
        self._lock = asyncio.Lock()
        self._es: EngineStreamLike | None = None
        self._engine: EngineLike | None = None
        self._latency: int | None = None  # latency mode of the open engine stream
        self._reopen_requested = False
        self._held: list | None = None  # frames / flush reasons kept back while the engine stream changes
        self._tracker: TurnTracker | None = None
        self._settled = asyncio.Event()  # every flush so far has its Final
        self._closing = False  # the run is ending: the engine stream is (being) closed
        self._input_ended = False  # end_input(): no audio comes after the flushes owed
        self._aclosing = False
        self._first_push = True
        # Wall-clock anchoring (see `_anchor`, `_origin`): samples pushed by the user (at the pushed
        # rate); where the input resumed after each pause (seconds of input audio) and the wall time of
        # the stream's first sample as the audio from there on puts it; and the engine samples every run
        # so far has taken from the input.
        self._arrived = 0
        self._origin_at: list[float] = []
        self._origins: list[float] = []
        self._consumed = 0
        self._anchored: tuple[int, float] | None = None  # the last run's first sample and the origin `_anchor` gave it
        # Stream-relative times (`Clock.seconds`): the input sample the current run started at, the wall
        # time at which the base class began the last attempt, and the seconds its retries added to
        # `start_time_offset` (see `_run`).
        self._run_first = 0
        self._attempt_began: float | None = None
        self._retry_shift = 0.0
        # Progress of the run's engine stream (remote engines, `_check_progress`): loop time of its last
        # event and of the moment it came to owe something, the timer of the next check, and a future
        # the check resolves (with what was owed) when the stream hung.
        self._last_event = self._owed_since = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self._stalled: asyncio.Future[str] | None = None

    # ---- public -----------------------------------------------------------------------------------------
    def push_frame(self, frame: rtc.AudioFrame) -> None:
        """As the base class, with the channels mixed down first: its resampler (used for every rate but
        16 kHz) takes one channel, and read a stereo frame's interleaved samples as mono audio of twice
        the length."""
        super().push_frame(mono_frame(frame))
        # accepted: its audio ends now (live input), so the stream's audio began `arrived` seconds ago
        begins = self._arrived / frame.sample_rate
        self._arrived += frame.samples_per_channel
        self._note_origin(begins, time.time() - self._arrived / frame.sample_rate)

    def _note_origin(self, begins: float, origin: float) -> None:
        """A frame starting `begins` seconds into the input says the input began at wall time `origin`.

        Live input arrives in real time, so that stays put while the input flows (frames arrive late,
        never early) and moves on by the length of each pause in it (the session's audio input disabled
        for a while, as push-to-talk does; a track republished): a frame more than `_PAUSE_SECONDS` later
        than the audio before it starts a new stretch, whose origin is the earliest its frames put it (a
        frame that was only late, the event loop busy, is followed by its backlog, which moves it back),
        never before the previous stretch's. The first frame's arrival is the first stretch's origin:
        input faster than real time (a pre-connect buffer) would put it in the past (times then run
        ahead of the clock, and the tracker keeps them from the future)."""
        origins = self._origins
        if not origins or origin > origins[-1] + _PAUSE_SECONDS:
            self._origin_at.append(begins)
            origins.append(origin)
            if len(origins) > _ORIGINS_KEPT:
                del self._origin_at[0], origins[0]
        elif len(origins) > 1:
            origins[-1] = max(origins[-2], min(origins[-1], origin))

    def _origin(self, sample: int) -> float:
        """Wall time of the stream's first sample as the stretch of input holding input sample `sample`
        (engine samples taken from the input) puts it (`_note_origin`)."""
        i = bisect.bisect_right(self._origin_at, sample / SAMPLE_RATE) - 1
        return self._origins[max(i, 0)]

    def _paused(self, start: int, sample: int) -> float:
        """Seconds the input paused between input samples `start` and `sample`.

        From a run's first sample (`Clock.wall` adds this to the run's anchor), counted from the origin
        the anchor was computed with, not the one the frames put there now: the stretch holding it may
        have been forgotten since (after `_ORIGINS_KEPT` more pauses: the lookup would then give a later
        stretch's origin, and every time after it would run early by the pauses forgotten, an
        END_OF_SPEECH before its own START), or a backlog may have moved its origin back (then the
        run's times are those of the audio, not late by the frame that was late). Either way the wall
        time of input sample p is `_origin(p) + p / SAMPLE_RATE`, as `_anchor` says."""
        if not self._origins:
            return 0.0
        if self._anchored is not None and self._anchored[0] == start:
            return self._origin(sample) - self._anchored[1]
        return self._origin(sample) - self._origin(start)

    def check_latency(self, latency_ms: int) -> None:
        """ValueError now, naming the modes, if the stream's engine is local and its model lacks this
        latency mode (a remote engine's modes are known only when a stream opens)."""
        model = getattr(self._engine, "model", None)
        if model is not None:
            model.context_for(latency_ms)

    def update_options(
        self,
        *,
        latency_ms: NotGivenOr[int] = NOT_GIVEN,
        language: NotGivenOr[str] = NOT_GIVEN,
        interim_results: NotGivenOr[bool] = NOT_GIVEN,
    ) -> None:
        """Apply new options to this live stream. language and interim_results apply to the next event;
        a latency change applies at the next utterance boundary, where the engine stream is reopened
        (a mode the local model lacks is a ValueError here, changing nothing)."""
        # The STT's checks first (an empty language, a latency that is no integer): a refusal changes nothing.
        STTOptions(
            latency_ms=latency_ms if is_given(latency_ms) else self._opts.latency_ms,
            language=language if is_given(language) else self._opts.language,
            interim_results=self._opts.interim_results,
        ).validate()
        if is_given(latency_ms):
            self.check_latency(latency_ms)
        if is_given(language):
            self._opts.language = language
            if self._tracker is not None:
                self._tracker.language = language
        if is_given(interim_results):
            self._opts.interim_results = interim_results
            if self._tracker is not None:
                self._tracker.interim_results = interim_results
        if is_given(latency_ms):
            self._opts.latency_ms = latency_ms
            # Taken at the next flush, the VAD's or the framework's: none is forced where the stream only
            # looks idle. The VAD reports a start once the speech has lasted min_speech_ms (250 ms), so a
            # flush there could cut into the first word of an utterance the VAD has not reported yet.
            self._reopen_requested = self._latency is not None and latency_ms != self._latency

    async def aclose(self) -> None:
        """Close now: audio whose FINAL_TRANSCRIPT has not come may be lost (a local engine drops it at
        once, a flush in progress included; end_input() keeps it by waiting for the Final); an open turn
        still gets its END_OF_SPEECH."""
        self._aclosing = self._closing = True
        self._settled.set()  # an end_input() waiting for Finals stops waiting
        if self._es is not None:
            await self._es.close()
        self._input_ch.close()
        # the run ends by itself once the engine stream has drained (its error, if any, is the
        # stream's to report, not aclose's); after the grace period the base class cancels it
        await asyncio.wait({self._task}, timeout=_CLOSE_GRACE_SECONDS)
        await asyncio.sleep(0)  # let a reader take the last events before the channels close
        await super().aclose()

    # ---- the run ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        # The base class starts each attempt at start_time = now and moves start_time_offset on by the
        # wall time since the previous attempt began, as if a retried run's audio began now. It begins on
        # the backlog the failed run left, at input sample `_consumed`: stream times count from the
        # stream's own origin plus that position instead, so the shift is taken back out (else they run
        # late by the retry interval and the failed run's lag: 2 s and more with default options).
        began = self.start_time
        if self._attempt_began is not None:
            self._retry_shift += began - self._attempt_began
        self._attempt_began = began
        self._engine = await self._acquire()
        self._es = await self._open()
        clock = Clock(
            offset=lambda: self.start_time_offset - self._retry_shift,
            anchor=lambda: self.start_time,
            first=lambda: self._run_first,
            paused=self._paused,
        )
        # Turns follow the engine's voice activity, or the text where the engine (a server) runs no VAD.
        # A retried run's turn times go on from the failed run's last one.
        self._tracker = TurnTracker(
            clock, language=self._opts.language, interim_results=self._opts.interim_results, vad=self._es.vad,
            chunk=self._chunk(), not_before=self._tracker.last_wall if self._tracker is not None else 0.0,
        )
        # What a failed run had held back for a stream change was taken from the input but given to no
        # engine stream: this run starts with it (the base class hands each frame to one run only).
        carried, self._held, self._first_push = self._held or [], None, True
        # Input sample where that audio starts; the run's first (its first push says the same; events may
        # come before one).
        self._run_first = carried_from = self._consumed - sum(len(item) for item in carried if not isinstance(item, str))
        self._settled.set()
        self._stalled = stalled = asyncio.get_running_loop().create_future()
        input_task = asyncio.create_task(self._forward_input(carried, carried_from), name="monosemantic.forward_input")
        events_task = asyncio.create_task(self._forward_events(), name="monosemantic.forward_events")
        tasks = [input_task, events_task]
        try:
            await asyncio.wait([*tasks, stalled], return_when=asyncio.FIRST_COMPLETED)
            if input_task.done():
                input_task.result()  # its error, or it closed the engine stream: the events drain
            if not events_task.done():
                await asyncio.wait([events_task, stalled], return_when=asyncio.FIRST_COMPLETED)
            if events_task.done():
                events_task.result()  # ends with the engine stream (an engine error raises here)
            else:
                self._stalled_run(stalled.result())
        finally:
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            for task in tasks:
                task.cancel()
            try:
                await asyncio.gather(*tasks, return_exceptions=True)
                if self._es is not None:
                    try:
                        await self._es.close()  # frees the engine slot, whatever ended the run
                    except Exception as exc:  # a connection that broke as it closed: nothing left to free
                        logger.debug("closing the engine stream failed: %r", exc)
                    self._cut(self._es)
            finally:
                if not self._aclosing:  # (aclose drops what was owed, as LiveKit's "close immediately" says)
                    for event in self._tracker.lost():
                        self._send(event)
                # Whatever happened above: a turn left open keeps the session 'speaking' for good.
                for event in self._tracker.close():
                    self._send(event)

    async def _open(self) -> EngineStreamLike:
        latency = self._opts.latency_ms
        try:
            es = await self._engine.open_stream(latency_ms=latency, sample_rate=SAMPLE_RATE)
        except Exception as exc:
            raise as_api_error(exc, "opening a recognition stream failed") from exc
        self._latency, self._reopen_requested = latency, False
        return es

    # ---- progress (remote engines) -----------------------------------------------------------------------
    def _owe(self) -> None:
        """The engine stream has come to owe something (a flush's Final with none owed before, or, closed
        by the plugin, its end): on a remote engine, watch that it makes progress."""
        if not self._remote:
            return
        loop = asyncio.get_running_loop()
        self._owed_since = loop.time()
        if self._watch is None:
            self._watch = loop.call_later(self._conn_options.timeout, self._check_progress)

    def _owing(self) -> str | None:
        """What the engine stream owes: a flush's Final, the end of a stream we closed, or nothing."""
        if self._tracker.pending:
            return "final"
        if self._closing and not self._aclosing:  # (aclose bounds its own wait)
            return "end"
        return None

    def _check_progress(self) -> None:
        """Whether the remote engine stream, owing something, sent no event at all for
        `conn_options.timeout`: the run then ends (`_stalled_run`). Rearms itself while it is owed.

        The bound is on time without progress, not on the time to a Final: a working server sends
        events as it works (a Partial at each step that finds words, SpeechStarted/SpeechEnded, a Usage
        every 5 s of audio by default), so a long backlog is not cut for its length. It catches a server
        that accepted the stream and then hung while its connection stays up and answers pings (a stuck
        engine behind a live server), which the client's heartbeat cannot see; the run waited for the
        Final forever, and end_input() never returned. Nothing is bounded while nothing is owed: silence
        between turns is normal, and a silent server sends nothing then.

        Not for a local engine: a healthy one can be that quiet while a Final is owed. A flush can find
        up to `max_buffered_seconds` (10 s) of audio not yet processed, and in silence the engine's only
        events are a Usage per `usage_interval_seconds` (5 s) of audio: an engine that is slower than
        half real time (an overloaded CPU, the GIL shared with the agent's own work) sends nothing for
        more than the default 10 s while it works through it, and cutting it would lose that audio. A
        retry would not help either: it opens its stream on the same shared engine in the same
        process. A local engine that fails says so (an `Error` event for a failed step or a shutdown, a
        push timeout when it stops taking audio)."""
        self._watch = None
        owed = self._owing()
        if owed is None or self._stalled is None or self._stalled.done():
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - max(self._owed_since, self._last_event)
        if quiet < self._conn_options.timeout:
            self._watch = loop.call_later(self._conn_options.timeout - quiet, self._check_progress)
            return
        self._stalled.set_result(owed)

    def _stalled_run(self, owed: str) -> None:
        """The remote engine stream sent nothing for `conn_options.timeout` while it owed `owed`."""
        seconds = self._conn_options.timeout
        if owed == "final":
            # Retryable: the base class starts a new run on a new connection, which takes the input not
            # yet consumed; the audio this engine stream had was lost with it.
            raise APITimeoutError(
                f"recognition timed out: the speech server sent nothing for {seconds:g} s while a transcript was due"
            )
        # Closed at the end of the input with every Final in: only its end (a last Usage) is missing.
        logger.warning("the speech server did not end the closed stream within %g s; ending without it", seconds)

    @staticmethod
    def _cut(es: EngineStreamLike) -> None:
        """A hung server would hold the connection of a stream closed on it open: cut it, in the
        background, if it does not close within a moment. Whatever ended the run: a server can hang
        while nothing is owed too (no flush sent), and aclose() then only sends it `close`, which it
        does not answer (a stream whose server already closed returns at once)."""
        wait_closed = getattr(es, "wait_closed", None)
        if wait_closed is not None:
            task = asyncio.ensure_future(wait_closed(_CUT_GRACE_SECONDS))
            _cutting.add(task)
            task.add_done_callback(_cutting.discard)

    def _chunk(self) -> int:
        """Engine samples one step of the open engine stream transcribes: its latency mode's chunk."""
        return self._latency * SAMPLE_RATE // 1000

    def _send(self, event: stt.SpeechEvent) -> None:
        if not self._event_ch.closed:
            self._event_ch.send_nowait(event)

    # ---- input side -------------------------------------------------------------------------------------
    async def _forward_input(self, carried: list, start: int) -> None:
        """`carried`: what a failed run held back (audio and flush reasons), from input sample `start`."""
        try:
            for item in carried:  # first what a failed run held back, in order
                if isinstance(item, str):
                    await self._flush(item)
                else:
                    await self._push(item, start)
                    start += len(item)
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    await self._flush("framework")
                else:
                    await self._push(frame_pcm(item))
            # end_input(): the base class flushed before closing the input; wait for those Finals
            self._input_ended = True
            while not self._aclosing and (self._tracker.pending or self._held is not None):
                await self._settled.wait()
        except monosemantic.MonosemanticError as exc:
            if not self._aclosing:  # after aclose, a push finding the stream closed is expected
                raise as_api_error(exc, "sending audio to the speech engine failed") from exc
        self._closing = True
        async with self._lock:
            await self._es.close()
            self._owe()  # its end: the events drain, then stop

    async def _push(self, pcm: np.ndarray, start: int | None = None) -> None:
        """`start`: where `pcm` lies in the input, if it was taken from it before (carried from a failed
        run); else it is the input's next audio."""
        if start is None:
            start, self._consumed = self._consumed, self._consumed + len(pcm)  # a later run starts after it
        async with self._lock:
            if self._held is not None:
                self._held.append(pcm)
                return
            if self._first_push:  # wall-clock times of this run count from its first sample
                self.start_time = self._anchor(start)
                self._run_first = start
                self._first_push = False
            await self._es.push(pcm)
            self._tracker.pushed += len(pcm)

    def _anchor(self, start: int) -> float:
        """Wall-clock time of this run's first sample (`start_time`, from which `TurnTracker` computes
        `speech_start_time` / `speech_end_time`, adding the input's pauses after it: `_paused`), at its
        first push to the engine.

        Not the time of that push: audio that arrived while the engine loaded, or while a failed run was
        retried, waits in the input channel, and the run starts on that backlog. Live input arrives in
        real time, so the wall time of input position p is the stream's origin as the frames around p
        put it (`_note_origin`) plus p; the run starts at the position every earlier run has consumed (a
        failed run's audio is gone, but its samples still passed). `start`: the engine samples taken
        from the input before this run's."""
        if not self._origins:  # (no frame came through push_frame: the audio ends now)
            return max(0.0, time.time() - (self._consumed - start) / SAMPLE_RATE)
        self._anchored = (start, self._origin(start))
        return max(0.0, self._anchored[1] + start / SAMPLE_RATE)

    async def _flush(self, reason: FlushReason, at: int | None = None) -> None:
        """`at`: the engine stream's sample the utterance ends at (the VAD's end), else all audio pushed."""
        async with self._lock:
            if self._held is not None:
                self._held.append(reason)  # replayed in order after the engine stream changes
                return
            if self._reopen_requested:
                # The new engine stream takes the audio from this flush on: audio after an earlier cut
                # would stay in the old one, and be lost with it.
                at = None
            await self._flush_locked(reason, at)
            if self._reopen_requested:
                self._held = []  # keep new audio back until this flush's Final: then reopen

    async def _flush_locked(self, reason: FlushReason, at: int | None = None) -> None:
        if not self._tracker.pending:
            self._owe()
        self._tracker.flushed(reason)  # before the call: its Final can only come after
        self._settled.clear()
        await self._es.flush(at=at)

    # ---- event side -------------------------------------------------------------------------------------
    async def _forward_events(self) -> None:
        try:
            await self._receive_events()
        except monosemantic.MonosemanticError as exc:
            # A flush at the VAD's end, or a stream change, that fails (a lost server connection, say) is
            # LiveKit's APIError like any other failure, so the base class retries it.
            if not self._aclosing:
                raise as_api_error(exc, "receiving transcripts from the speech engine failed") from exc

    async def _receive_events(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            es = self._es
            async for event in es:
                self._last_event = loop.time()  # progress (`_check_progress`)
                if isinstance(event, monosemantic.Error):
                    if self._closing or es is not self._es:
                        continue
                    raise engine_error(event)
                if isinstance(event, (monosemantic.SpeechStarted, monosemantic.SpeechEnded)) and (
                    self._closing or es is not self._es
                ):
                    continue  # the closing transitions of a stream we closed; close() ends the turn
                out, flush = self._tracker.handle(event)
                for speech_event in out:
                    self._send(speech_event)
                if flush and not self._closing:
                    # At the VAD's end sample, not after all the audio pushed so far: with input faster
                    # than real time (a pre-connect buffer, a backlog after a retry) that audio can hold the
                    # next utterance's start, which would go into this turn's FINAL.
                    await self._flush("vad", at=event.sample)
                if isinstance(event, monosemantic.Final) and not self._tracker.pending:
                    if self._held is not None:
                        await self._change_stream()
                    if not self._tracker.pending and self._held is None:
                        self._settled.set()
            if es is self._es:
                if not self._closing:
                    # Ended without an error while its input is live (a server's connection closed
                    # cleanly by a proxy, say): returning would end the LiveKit stream as if its input had
                    # ended, and the session's STT would stop for good. A retry opens a new one.
                    raise APIConnectionError("the speech engine ended the stream unasked", retryable=True)
                return  # our stream ended: the run is over
            # else the engine stream was replaced: carry on with the new one

    async def _change_stream(self) -> None:
        """At an utterance boundary with new audio held back: reopen the engine stream with the new
        latency if the moment is still idle, then replay the held audio (and flushes) in order."""
        async with self._lock:
            held, self._held = self._held, None
            old = self._es
            # Not after end_input() with no audio held: the new engine stream would hear nothing and be
            # closed at once.
            hears = not self._input_ended or any(not isinstance(item, str) for item in held)
            if self._reopen_requested and self._tracker.idle and hears:
                try:
                    new = await self._open()  # before closing the old one: a failure loses nothing
                except APIError as exc:
                    self._reopen_failed(exc)
                else:
                    self._tracker.rebase(self._chunk())
                    self._es = new
                    await old.close()
            for item in held:
                if isinstance(item, str):
                    await self._flush_locked(item)
                else:
                    await self._es.push(item)
                    self._tracker.pushed += len(item)

    def _reopen_failed(self, error: APIError) -> None:
        """The engine stream could not be reopened with the new latency; the old one goes on. A lasting
        refusal (a mode the model lacks, on a remote engine) drops the change; a passing one (a full
        engine) leaves it for the next utterance boundary. Either way the session hears of it as a
        recoverable error: this stream keeps transcribing at its old latency."""
        if error.retryable:
            logger.warning("latency change postponed to the next utterance boundary: %s", error)
        else:
            logger.warning("latency change dropped, the stream stays at %s ms: %s", self._latency, error)
            self._reopen_requested = False
            self._opts.latency_ms = self._latency
        self._emit_error(error, recoverable=True)
