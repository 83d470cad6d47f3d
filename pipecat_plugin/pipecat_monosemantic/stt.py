"""MonosemanticSTTService: streaming speech recognition in a Pipecat pipeline, on the process's shared
monosemantic engine.

Audio frames are pushed to an engine stream as they arrive (`run_stt` yields nothing itself); a task per
stream reads the engine's events and pushes `InterimTranscriptionFrame`s (engine `Partial`) and finalized
`TranscriptionFrame`s (engine `Final`). On `VADUserStoppedSpeakingFrame` the service flushes the stream:
the engine then finishes the utterance at once instead of waiting for more audio, and the Final that
answers the flush confirms pipecat's finalize handshake (so TTFB is measured from the end of speech to
that transcript).
"""

from __future__ import annotations

import asyncio
import copy
import os
import time
from collections.abc import AsyncGenerator
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    StartFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import MetricsData
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import STTService
from pipecat.transcriptions.language import Language
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.time import time_now_iso8601
from pipecat.utils.tracing.service_decorators import traced_stt
from pipecat.utils.types import NOT_GIVEN, is_given

from monosemantic.errors import AudioError, MissingDependencyError, ModelLoadError, PushTimeoutError, StreamError
from monosemantic.events import Error, Final, Partial

from .audio import FrameAudio
from .backend import EngineLike, local_engine, remote_engine
from .session import StreamSession
from .settings import MonosemanticSTTSettings

# P99 seconds from the end of speech to the finalized TranscriptionFrame, broadcast to turn strategies in
# STTMetadataFrame. Pipecat counts from the end of speech, stop_secs (0.2 s) before the VAD stop frame, so
# this is 0.2 s + the p99 from VADUserStoppedSpeakingFrame to the final that benchmarks/pipecat_ttf.py
# measured: 176.9 ms (p50 54.7 ms; raw engine flush -> Final p99 89.1 ms) with
# `--model reduced.nemo --device cpu --streams 4 --utterances 8 --rounds 3` (96 finals, 160 ms chunks,
# reduced Nemotron architecture 8 x 256 from benchmarks/make_model.py, shared 2-core x86_64 VM) = 0.377 s,
# rounded up. Measure your hardware and model with that script and pass `ttfs_p99_latency=`.
MONOSEMANTIC_TTFS_P99: float = 0.38

DEFAULT_LATENCY_MS = 160
"""The voice-agent mode of Nemotron Speech streaming: 160 ms chunks."""

# After a failed open, audio frames do not retry (and report) sooner than this; the wait doubles with each
# failure in a row up to the cap, so a server down for minutes gives an ErrorFrame every 8 s, not every 1 s.
_REOPEN_BACKOFF_SECONDS = 1.0
_REOPEN_BACKOFF_MAX_SECONDS = 8.0

# A stream that ends (with an error, or by the server unasked) this soon after it opened, before any
# transcript, counts as a failed open (as pipecat's QuickFailureTracker counts a websocket that dies right
# after connecting): a server that accepts every stream and ends it at once (a broken deployment, an auth
# proxy that closes after the upgrade) is otherwise reopened for as long as audio comes, and
# `max_open_failures` never gives up.
_QUICK_FAILURE_SECONDS = 5.0

# A stream opens in a background task (a remote server may take up to its connect timeout to answer, and
# a reloading engine seconds), so frames never wait on it. The audio (and flushes) received meanwhile is
# kept, up to this many seconds of it, and goes to the stream in order once it opens; audio beyond that is
# not transcribed (one ErrorFrame says so), nor is the audio kept if the open fails (its ErrorFrame says so).
# A settings change's new stream opens the same way (`_swap`); if it fails, the old stream gets the audio.
_OPENING_BACKLOG_SECONDS = 10.0

# Remote mode: a `monosemantic serve` connection that receives nothing for the server's idle timeout (60 s
# by default) is closed. While the service is muted (STTMuteFrame, e.g. while the bot speaks) or no audio
# comes, pipecat's keepalive task sends 100 ms of silence once no audio was sent for this long, checking
# every `_REMOTE_KEEPALIVE_INTERVAL` seconds: silence goes 10-12 s after the last audio.
REMOTE_KEEPALIVE_TIMEOUT = 10.0
_REMOTE_KEEPALIVE_INTERVAL = 2.0


class MonosemanticSTTService(STTService):
    """Pipecat STT service backed by monosemantic's batched streaming engine.

    Every service of a process asking for the same model, device, dtype and engine configuration shares
    one engine, so their streams run in the same batches. Pass `settings=MonosemanticSTTService.Settings(
    latency_ms=..., ...)` for what may change at run time (see `MonosemanticSTTSettings`).
    """

    Settings = MonosemanticSTTSettings
    _settings: MonosemanticSTTSettings

    def __init__(
        self,
        *,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str = "auto",
        engine_config: Any = None,
        sample_rate: int | None = None,
        stop_timeout: float = 5.0,
        settings: MonosemanticSTTSettings | None = None,
        ttfs_p99_latency: float | None = MONOSEMANTIC_TTFS_P99,
        base_url: str | None = None,
        api_key: str | None = None,
        max_open_failures: int | None = None,
        **kwargs,
    ):
        """Create the service; the model loads when the pipeline starts (or earlier with
        `monosemantic.aget_engine`, which warms the same shared engine).

        Args:
            model: Checkpoint: a Hugging Face repo id or a local `.nemo` path (default
                `monosemantic.DEFAULT_MODEL`). `settings.model`, when given, takes precedence.
            device: "auto" (CUDA if available), "cuda", "cuda:N" or "cpu".
            dtype: "auto", "float32", "bfloat16" or "float16".
            engine_config: `monosemantic.EngineConfig` for the shared engine (None: its defaults).
                Services with different configurations get different engines. Anything else is a
                TypeError here.
            sample_rate: The engine stream's sample rate; None uses the pipeline's input rate. The engine
                resamples to 16 kHz. Audio frames at another rate are resampled to this one, and frames
                of several channels are downmixed to mono (the average of the channels).
            stop_timeout: On EndFrame, how long to wait for the transcript of audio still in flight.
            settings: Runtime-updatable settings; unset fields keep their defaults.
            ttfs_p99_latency: P99 seconds from end of speech to final transcript, for turn strategies.
            base_url: URL of a `monosemantic serve` instance (e.g. "ws://gpu-host:8080"): streams run
                there, batched with every other process's; `model`, `device`, `dtype` and
                `engine_config` are then the server's business and ignored. A lost connection is
                reported as a non-fatal ErrorFrame and the next audio reconnects.
            api_key: The server's API key (default: the MONOSEMANTIC_API_KEY environment variable).
            max_open_failures: Give up after this many failed attempts in a row to open a stream (a
                server down or unreachable, a full engine, a stream that ends within 5 s of opening,
                before any transcript, with an error or by the server unasked): that failure's
                ErrorFrame marks the service unusable (`force_treat_as_permanent`), which is what pipecat's
                `ServiceSwitcherStrategyFailover` switches to a backup STT on. `set_usable(True)` (or a
                settings update) makes it try again. None (the default): retry for as long as audio
                comes, with the reopen backoff.
            **kwargs: Passed to `STTService`. Its `keepalive_timeout` and `keepalive_interval` apply in
                remote mode only (default `REMOTE_KEEPALIVE_TIMEOUT` = 10 s and 2 s; None: no
                keepalive): after that long without audio sent, silence keeps the connection open. An
                in-process stream needs none, and gets none.
        """
        import monosemantic

        # Checked here: the engine is only built when the pipeline starts, where a wrong type would
        # surface as an unrelated error on every reopen, or an empty dict pass for the default.
        if engine_config is not None and not isinstance(engine_config, monosemantic.EngineConfig):
            raise TypeError(f"engine_config must be a monosemantic.EngineConfig, got {type(engine_config).__name__}")
        if max_open_failures is not None and (
            isinstance(max_open_failures, bool) or not isinstance(max_open_failures, int) or max_open_failures < 1
        ):
            raise ValueError(f"max_open_failures must be a positive integer or None, got {max_open_failures!r}")
        if not base_url:  # (the server's business otherwise, and ignored)
            from monosemantic.asr import check_device_and_dtype

            check_device_and_dtype(device, dtype)
        if model is None:
            model = monosemantic.DEFAULT_MODEL
        defaults = self.Settings(
            model=os.fspath(model),
            language=Language.EN,
            latency_ms=DEFAULT_LATENCY_MS,
            interim_results=True,
        )
        if settings is not None:
            defaults.apply_update(settings)
        if base_url:
            kwargs.setdefault("keepalive_timeout", REMOTE_KEEPALIVE_TIMEOUT)
            kwargs.setdefault("keepalive_interval", _REMOTE_KEEPALIVE_INTERVAL)
        super().__init__(sample_rate=sample_rate, ttfs_p99_latency=ttfs_p99_latency, settings=defaults, **kwargs)
        self._device = device
        self._dtype = dtype
        self._engine_config = engine_config
        self._stop_timeout = stop_timeout
        self._remote_args = (base_url, api_key)
        self._remote = remote_engine(base_url, api_key) if base_url else None
        self._max_open_failures = max_open_failures
        # Remote mode: the model the server's `ready` names, once a stream has opened. The metrics carry
        # it; `settings.model` stays as configured (it decides stream swaps and refused updates).
        self._server_model: str | None = None

        self._session: StreamSession | None = None  # where incoming audio goes
        self._sessions: set[StreamSession] = set()  # every stream still open (current and retiring)
        self._lock = asyncio.Lock()  # orders pushes against flushes and stream swaps
        self._in_utterance = False  # between VADUserStartedSpeaking and VADUserStoppedSpeaking
        self._retry_at = 0.0
        # Failed opens in a row, quick failures included (the reopen backoff doubles with each). An open
        # that succeeds does not reset it: a stream that transcribes, or outlives _QUICK_FAILURE_SECONDS, does.
        self._open_failures = 0
        self._aborted = False  # cancelled: push nothing more
        self._draining = False  # stopping (EndFrame): the finals still to come are the last ones
        self._frame_audio: FrameAudio | None = None  # set at start, when the stream's rate is known
        self._opening: asyncio.Task | None = None  # a stream opening in the background
        self._swap_from: StreamSession | None = None  # the stream a settings change replaces, while it opens
        self._backlog: list[bytes | None] = []  # audio (None: a flush) received while it opens, in order
        self._backlog_bytes = 0
        self._backlog_overflowed = False  # audio beyond the backlog's bound was dropped (reported once)
        self._loading: asyncio.Task | None = None  # a model update's engine loading in the background
        self._pending_model: str | None = None  # the model it loads; `_settings.model` changes once loaded

    def can_generate_metrics(self) -> bool:
        return True

    def _sync_model_name_to_metrics(self):
        """Metrics name the model transcribing: in remote mode the server's, once a stream has told it
        (`settings.model` is then a model the server does not use); else `settings.model`."""
        served = getattr(self, "_server_model", None)  # (pipecat calls this before __init__ sets it)
        if served is None:
            super()._sync_model_name_to_metrics()
            return
        self.set_core_metrics_data(MetricsData(processor=self.name, model=served))
        self._full_model_name = served  # what pipecat's tracing names the model, ahead of settings.model

    def _note_server_model(self, stream) -> None:
        """Remote mode: take the model name a newly opened stream's server gave (None from a server too
        old to give one: the last known name, or `settings.model`, stays)."""
        served = getattr(stream, "model", None)
        if isinstance(served, str) and served and served != self._server_model:
            self._server_model = served
            self._sync_model_name_to_metrics()

    async def set_usable(self, is_usable: bool):
        if is_usable and not self.is_usable:
            # Brought back (by the application, or a settings update): the next audio tries to open a
            # stream at once, and `max_open_failures` counts afresh.
            self._retry_at, self._open_failures = 0.0, 0
        await super().set_usable(is_usable)

    # ---- the seam --------------------------------------------------------------------------------
    async def _engine_for(self, model: str) -> EngineLike:
        """The one place the service obtains a recognizer: the server in remote mode, else the process's
        shared engine for `model`."""
        if self._remote is not None:
            return self._remote
        return await local_engine(model, device=self._device, dtype=self._dtype, config=self._engine_config)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self, frame: StartFrame):
        await super().start(frame)
        self._frame_audio = FrameAudio(self.sample_rate)
        self._aborted = self._draining = False
        self._retry_at, self._open_failures = 0.0, 0
        async with self._lock:
            await self._ensure_session()
        if self._remote is None and self._opening is not None:
            # In-process, the model loads now and audio frames wait behind the StartFrame (none dropped, however
            # long the load). A server's connection does not hold up the pipeline: audio meanwhile is kept.
            await asyncio.wait({self._opening})
        if self._remote is not None and self._keepalive_task is None:
            self._create_keepalive_task()  # does nothing when keepalive_timeout is None

    async def stop(self, frame: EndFrame):
        """Transcribe what was pushed (flush), wait up to `stop_timeout` for it, then close."""
        await self._cancel_keepalive_task()
        await self._drain()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame):
        """Close the engine streams at once; nothing more is pushed."""
        await self._cancel_keepalive_task()
        await self._abort()
        await super().cancel(frame)

    async def cleanup(self):
        await super().cleanup()
        await self._abort()
        if self._remote is not None:
            # A closed RemoteEngine opens no more streams: a later run of this service (set up and started
            # again in a new pipeline) gets a client of its own, as an in-process service gets its engine.
            remote, self._remote = self._remote, remote_engine(*self._remote_args)
            await remote.aclose()

    # ---- audio in --------------------------------------------------------------------------------
    async def process_audio_frame(self, frame: InputAudioRawFrame, direction: FrameDirection):
        """Bring the frame to mono at the stream's rate before the base class records its usage and hands
        its bytes to `run_stt` (which sees bytes only, not the frame's format)."""
        # Frames the base class drops (muted, unusable) must not feed the resampler: a few ms of them would
        # come out ahead of the next audio it passes on.
        if frame.audio and self._frame_audio is not None and not self.is_muted and self.is_usable:
            try:
                audio = self._frame_audio.convert(frame.audio, frame.sample_rate, frame.num_channels)
            except AudioError as e:
                await self.push_error(f"audio frame rejected, not transcribed: {e}", exception=e)
                return
            if not audio:
                return  # all of it held in the resampler's lookahead for now; it goes with the next frames
            if audio is not frame.audio:
                # A copy: the original frame may also travel on downstream (audio passthrough) unchanged.
                frame = copy.copy(frame)
                frame.audio, frame.sample_rate, frame.num_channels = audio, self.sample_rate, 1
                frame.num_frames = len(audio) // 2
        await super().process_audio_frame(frame, direction)

    def _record_stt_audio_usage(self, audio: bytes | bytearray):
        """Usage metrics count the audio sent to a stream (`_count_sent`), not each frame as it arrives:
        a frame kept for a stream that then did not open, or dropped, was never sent; the keepalive's
        silence, which no frame carries, was (pipecat's WebsocketSTTService counts its keepalives too)."""

    def _count_sent(self, audio: bytes) -> None:
        super()._record_stt_audio_usage(audio)

    async def _push_held_audio(self) -> None:
        """Push the audio the resampler still holds: a flush must cover every sample received before it."""
        tail = self._frame_audio.flush() if self._frame_audio is not None else b""
        if not tail:
            return
        session = self._session
        open_now = session is not None and not session.closed
        if not open_now and self._opening is None:
            return  # no stream took the frames before it either; their loss was reported then
        if not open_now:
            await self._keep(tail)  # the frames before it wait for the opening stream too
            return
        try:
            await session.push(tail)
        except (AudioError, StreamError) as e:
            await self._report_failure("the end of the utterance was not transcribed", e)

    async def run_stt(self, audio: bytes) -> AsyncGenerator[Frame | None, None]:
        """Push the audio to the engine stream; transcripts arrive from the stream's event task. While a
        stream opens (in the background) the audio is kept for it; with none opening it is not transcribed."""
        async with self._lock:
            session = await self._ensure_session()
            if session is not None:
                try:
                    await session.push(audio)
                except AudioError as e:
                    await self.push_error(f"audio frame rejected, not transcribed: {e}", exception=e)
                except PushTimeoutError as e:
                    # The engine is overloaded; the stream carries on. A push that took its audio before it
                    # timed out has it sent later: that frame is late, not lost.
                    lost = "audio frame delayed" if e.accepted else "audio frame not transcribed"
                    await self.push_error(f"{lost}: {e}", exception=e)
                except StreamError:
                    # The stream ended under us (a lost connection, an engine error) before its event task
                    # saw it: that task reports it, once, with what of the utterance was lost. This frame
                    # is kept for a fresh stream, as the frames after it are (one ErrorFrame each before).
                    if self._session is session:
                        self._session = None
                    if await self._ensure_session() is None and self._opening is not None:
                        await self._keep(audio)
            elif self._opening is not None:
                await self._keep(audio)
        yield None

    # ---- audio while a stream opens --------------------------------------------------------------
    async def _keep(self, audio: bytes) -> None:
        """Keep audio for the stream being opened (bounded: see `_OPENING_BACKLOG_SECONDS`)."""
        if self._backlog_bytes + len(audio) > _OPENING_BACKLOG_SECONDS * self.sample_rate * 2:
            if not self._backlog_overflowed:
                self._backlog_overflowed = True
                await self.push_error(
                    f"audio not transcribed: no recognition stream is open yet and the "
                    f"{_OPENING_BACKLOG_SECONDS:g} s of audio kept for it meanwhile are full"
                )
            return
        self._backlog.append(audio)
        self._backlog_bytes += len(audio)

    def _backlog_unflushed(self) -> bool:
        """Audio kept since the last flush kept (a flush of it would owe a Final)."""
        return bool(self._backlog) and self._backlog[-1] is not None

    def _drop_backlog(self) -> float:
        """Forget the audio kept for an opening stream; the seconds of it."""
        seconds = self._backlog_bytes / 2 / self.sample_rate if self.sample_rate else 0.0
        self._backlog, self._backlog_bytes, self._backlog_overflowed = [], 0, False
        return seconds

    async def _replay_backlog(self, session: StreamSession) -> None:
        """Send the opened stream what was kept for it, in order: audio and flushes."""
        backlog = self._backlog
        self._drop_backlog()
        try:
            for item in backlog:
                if item is None:
                    await session.flush()
                else:
                    await session.push(item)
        except (AudioError, StreamError) as e:
            await self.push_error(f"audio received while the stream opened was not transcribed: {e}", exception=e)

    # ---- keepalive (remote mode) -----------------------------------------------------------------
    def _is_keepalive_ready(self) -> bool:
        """A connection to keep open: remote mode, and a stream open. Without one there is nothing to keep;
        the keepalive never opens a stream (the next audio frame does)."""
        session = self._session
        return self._remote is not None and not self._aborted and session is not None and not session.closed

    async def _send_keepalive(self, silence: bytes) -> None:
        """Send `silence` (100 ms of zeros at the stream's rate, from pipecat's keepalive task) so the
        server does not close a connection that no audio was sent on for `keepalive_timeout` seconds."""
        async with self._lock:  # ordered with audio, flushes and stream swaps, as every push is
            session = self._session
            if not self._is_keepalive_ready() or session is None:
                return
            if time.monotonic() - self._last_audio_time < self._keepalive_timeout:
                return  # audio came while this waited for the lock: the connection is not idle
            await self._push_held_audio()  # audio received before the pause goes ahead of the silence
            try:
                await session.keepalive(silence)
            except StreamError as e:
                # The connection is lost: as for any lost connection, the stream's event task reports it
                # (a non-fatal ErrorFrame) and drops the stream, and the next audio frame opens a new one.
                logger.debug(f"{self}: keepalive not sent: {e}")

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._in_utterance = True
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._in_utterance = False
            await self._finalize()

    async def _finalize(self) -> None:
        """End the utterance: flush the stream (or hand over to a new one if settings changed)."""
        async with self._lock:
            await self._push_held_audio()
            session = self._session
            if (session is None or session.closed) and self._opening is not None:
                if self._backlog_unflushed():  # the stream being opened flushes it when it has the audio
                    self.request_finalize()
                    self._backlog.append(None)
                return
            if session is None or session.closed:
                return
            try:
                if not session.unflushed:
                    # Nothing pushed since the last flush (muted, say): no transcript is coming, but a
                    # setting that waited for this utterance's end applies now, not an utterance later.
                    if self._needs_new_stream(session):
                        await self._swap()
                    return
                self.request_finalize()
                if self._needs_new_stream(session):
                    await self._swap()
                else:
                    await session.flush()
            except Exception as e:
                await self._report_failure("could not finalize the utterance", e)

    # ---- streams ---------------------------------------------------------------------------------
    async def _open_session(self, after: StreamSession | None = None) -> StreamSession:
        model, latency = self._settings.model, self._settings.latency_ms
        engine = await self._engine_for(model)
        stream = await engine.open_stream(latency_ms=latency, sample_rate=self.sample_rate)
        if self._remote is not None:
            self._note_server_model(stream)
        # `model`, not the server's name: the session is compared with `settings.model` for swaps.
        session = StreamSession(stream, latency, model, after=after, on_sent=self._count_sent)
        self._sessions.add(session)
        session.task = self.create_task(self._read_events(session), name="monosemantic_events")
        await self._connection_event("on_connected")
        return session

    async def _connection_event(self, name: str, *args) -> None:
        """pipecat's connection events, as a hosted STT service's websocket raises them: each stream is
        its own connection to the server (an in-process stream has none, and raises none)."""
        if self._remote is not None:
            await self._call_event_handler(name, *args)

    async def _ensure_session(self) -> StreamSession | None:
        """The current stream; with none, start opening one in the background (at most once per backoff
        after a failure) and return None: the caller never waits on a connection or a model load."""
        if self._session is not None and not self._session.closed:
            return self._session
        if self._aborted or self._opening is not None or time.monotonic() < self._retry_at:
            return None
        self._session = None
        self._opening = self.create_task(self._open_in_background(), name="monosemantic_open")
        return None

    async def _open_in_background(self, after: StreamSession | None = None) -> None:
        """Open a stream with the current settings; then hand it what was kept meanwhile, or report why it
        did not open. `after`: the stream it replaces (a settings change, `_swap`), which the new stream
        retires once open; if it cannot open, `after` carries on and gets the audio kept instead."""
        tried = (self._settings.latency_ms, self._settings.model)  # what `_open_session` opens with
        try:
            session, error = await self._open_session(after=after), None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            session, error = None, e
        async with self._lock:
            self._opening = None
            old, self._swap_from = self._swap_from, None
            if self._aborted:
                return  # _abort closes every session it knows, this one included, and drops the backlog
            if session is not None and (session.closed or session.ended):
                # It ended before it got any audio: a failed open, reported here (its event task leaves
                # the report of a stream not adopted to this), with what its event task saw.
                why = session.end_reason or (self._describe(session.error) if session.error is not None else None)
                ended = f"the stream ended as soon as it opened: {why}" if why else "the stream closed as soon as it opened"
                session, error = None, StreamError(ended)
            if session is None:
                if old is None or old.closed or old.error is not None:
                    await self._open_failed(error, self._drop_backlog())
                    return
                await self._swap_failed(error, old, tried)
                session = old
            else:
                self._session = session
                session.adopted = True  # from here on its event task counts a quick failure of it
                await self._replay_backlog(session)
            if old is not None and session is not old:
                try:
                    await old.retire()  # flushed when the swap began: it closes after its last Final
                except Exception as e:
                    logger.debug(f"{self}: retiring the replaced stream failed: {e}")
                logger.debug(f"{self}: stream reopened (latency_ms={session.latency_ms}, model={session.model})")
            # Settings that changed while it opened (it opened with those it read first) apply now if no
            # utterance is in progress, as they would have with a stream open; else at the utterance's end.
            if not self._in_utterance and self._needs_new_stream(session):
                try:
                    await self._swap()
                except Exception as e:
                    await self._report_failure("could not switch streams", e)

    async def _swap_failed(self, e: Exception, old: StreamSession, tried: tuple) -> None:
        """The stream for new settings could not open: the stream it was to replace carries on, with the
        audio kept meanwhile (nothing lost, in order), and the settings it was opened with revert to that
        stream's (a later update, received while it opened, stays and is tried next)."""
        latency, model = tried
        # A connection that failed, as in `_open_failed`: an application watching the connection hears
        # of it whether or not an old stream carries on.
        await self._connection_event("on_connection_error", f"could not open a recognition stream: {e}")
        # Not a failure of the service: left to classify the exception, pipecat would take a server's
        # refusal (HTTP 400 for a mode it lacks) for a permanent INVALID_REQUEST and write the service
        # off, and no more audio would reach the old stream that carries on. The setting was the
        # application's, and it is undone here.
        await self.push_error(
            f"cannot apply latency_ms={latency}, model={model}: "
            f"{e}; keeping latency_ms={old.latency_ms}, model={old.model}",
            exception=e,
            category=ErrorCategory.APPLICATION,
        )
        if self._settings.latency_ms == latency:
            self._settings.latency_ms = old.latency_ms
        if self._settings.model == model:
            self._settings.model = old.model
            self._sync_model_name_to_metrics()
        self._session = old
        await self._replay_backlog(old)

    async def _open_failed(self, e: Exception, lost_seconds: float) -> None:
        self._session = None
        # A checkpoint that cannot load, or a setting the model refuses, will fail the same way every
        # time: mark the service unusable (a settings update makes it usable again).
        # A server that refuses for good (a wrong key) is too; unreachable or full is not.
        permanent = isinstance(e, (ModelLoadError, MissingDependencyError, ValueError, AudioError)) or (
            isinstance(e, StreamError) and getattr(e, "retryable", True) is False
        )
        lost = f"; the {lost_seconds:.2g} s of audio received while it was opening were not transcribed"
        lost = lost if lost_seconds else ""
        await self._connection_event("on_connection_error", f"could not open a recognition stream: {e}")
        await self._failed_attempt(f"could not open a recognition stream: {e}{lost}", e, permanent)

    async def _failed_attempt(self, what: str, e: Exception | None, permanent: bool = False) -> None:
        """One more failed attempt in a row to get a working stream (an open that failed, or a stream
        that ended at once): the next open backs off, and at `max_open_failures` the service gives up.
        One ErrorFrame, `what` and what happens next."""
        self._open_failures += 1
        wait = min(_REOPEN_BACKOFF_MAX_SECONDS, _REOPEN_BACKOFF_SECONDS * 2 ** (self._open_failures - 1))
        self._retry_at = time.monotonic() + wait
        session = self._session
        # Audio that met a stream already ended may have opened the next one before this was counted: the
        # backoff is for the open after it.
        reopening = self._opening is not None or (session is not None and not session.closed and not session.ended)
        retry = "" if permanent or reopening else f"; audio is not transcribed until a stream opens (next try in {wait:g} s)"
        limit = self._max_open_failures
        if not permanent and limit is not None and self._open_failures >= limit:
            # Left retryable, this would never leave the service unusable, and a failover strategy would
            # never switch away from it (pipecat's websocket services give up after a few reconnects too).
            permanent = True
            retry = (
                f"; giving up after {self._open_failures} failed attempts in a row (max_open_failures="
                f"{limit}): audio is not transcribed until the service is made usable again"
            )
        await self.push_error(f"{what}{retry}", exception=e, force_treat_as_permanent=permanent)

    def _needs_new_stream(self, session: StreamSession) -> bool:
        return session.latency_ms != self._settings.latency_ms or session.model != self._settings.model

    async def _swap(self) -> None:
        """Under the lock, at an utterance boundary: switch to a stream with the current settings. The
        current stream is flushed (it finishes its utterance and delivers its Final first) and the new
        one opens in the background, as any stream does: no frame waits for it, and audio (and flushes)
        received meanwhile is kept for it and replayed in order once it opens. The old stream is then
        retired (closed after its Final). If the new one cannot open, the old one carries on with the
        audio kept (nothing is lost) and the settings go back to its own."""
        await self._push_held_audio()  # it belongs to the utterance the old stream finishes
        old = self._session
        if old is None or old.closed or self._opening is not None:
            return  # the next stream to open, opens with the current settings
        await old.flush()
        if self._aborted:
            return  # cancelled while flushing: _abort closes the old stream, and nothing opens
        self._session, self._swap_from = None, old
        self._opening = self.create_task(self._open_in_background(after=old), name="monosemantic_open")

    async def _drain(self) -> None:
        """Flush every stream, wait for the Finals owed, close (waiting `stop_timeout` at most in all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._stop_timeout
        self._draining = True
        async with self._lock:
            await self._push_held_audio()
            self._retry_at = float("inf")  # no audio after EndFrame; nothing reopens
            opening, kept = self._opening, bool(self._backlog)
        if opening is not None:
            if kept:  # audio waits for this stream: give it the time allowed for transcripts in flight
                await asyncio.wait({opening}, timeout=self._stop_timeout)
            if not opening.done():
                await self.cancel_task(opening, timeout=1.0)
                async with self._lock:
                    self._opening = self._swap_from = None
                    lost = self._drop_backlog()
                if lost:
                    await self.push_error(
                        f"no recognition stream opened within {self._stop_timeout} s of the end of the "
                        f"pipeline; the {lost:.2g} s of audio received meanwhile were not transcribed"
                    )
        async with self._lock:
            self._session = None
            for session in list(self._sessions):
                try:
                    await session.retire()
                except Exception as e:
                    await self._report_failure("could not flush at stop", e)
        sessions = [s for s in self._sessions if s.task is not None]
        if sessions:
            _, pending = await asyncio.wait([s.task for s in sessions], timeout=max(0.0, deadline - loop.time()))
            # A stream that owes no Final (one replaced by a settings change, whose Final came before the
            # wait for its successor used up the time) is merely closing: _abort ends it, nothing is lost.
            if any(s.outstanding for s in sessions if s.task in pending):
                await self.push_error(
                    f"the final transcript did not arrive within {self._stop_timeout} s of the end "
                    f"of the pipeline; closing without it"
                )
        await self._abort()

    async def _abort(self) -> None:
        """Close every stream now and stop reading events; stop opening one, or loading a model."""
        self._aborted = True
        for task in (self._opening, self._loading):
            if task is not None and task is not asyncio.current_task():
                await self.cancel_task(task, timeout=1.0)  # a connection attempt is not waited for
        self._opening = self._loading = self._swap_from = None
        self._pending_model = None
        self._drop_backlog()
        self._session = None
        sessions, self._sessions = list(self._sessions), set()
        for session in sessions:
            try:
                await session.close()
            except Exception as e:  # a closing stream has nothing left to lose; log, don't raise
                logger.warning(f"{self}: closing a stream failed: {e}")
        for session in sessions:
            if session.task is not None and session.task is not asyncio.current_task():
                await self.cancel_task(session.task)

    async def _report_failure(self, what: str, e: Exception) -> None:
        """Report a push or flush that failed, unless it failed because the stream is over (its connection
        lost, the engine ended it): the stream's event task reports that, once, with what of the utterance
        was lost. A push or flush that timed out (an overloaded engine) leaves the stream working, and is
        reported here."""
        if isinstance(e, StreamError) and not isinstance(e, PushTimeoutError):
            logger.debug(f"{self}: {what}: {e} (the stream's end is reported by its event task)")
            return
        await self.push_error(f"{what}: {e}", exception=e)

    # ---- events out ------------------------------------------------------------------------------
    async def _read_events(self, session: StreamSession) -> None:
        try:
            if session.after is not None:
                await session.after.done.wait()
                session.after = None
            async for event in session.stream:
                if self._aborted:
                    break
                if isinstance(event, (Partial, Final)) and not session.heard:
                    session.heard = True
                    self._open_failures = 0  # a stream that transcribes: the failures in a row are over
                if isinstance(event, Partial):
                    await self._on_partial(event)
                elif isinstance(event, Final):
                    done = session.final_arrived()
                    await self._on_final(event)
                    if done:
                        await session.close()  # the iterator ends after the events already produced
                elif isinstance(event, Error):
                    await self._on_engine_error(session, event)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = f"{self._describe(session.error)}, then " if session.error is not None else ""
            quick = self._ended(session, f"{error}connection lost: {e}")
            if self._reports_end(session):
                await self._connection_event("on_connection_error", f"{error}connection lost: {e}")
                await self._report_end(session, f"{error}reading transcripts failed: {e}{self._lost(session)}", quick, e)
        else:
            if session.error is not None:
                quick = self._ended(session, self._describe(session.error))
            else:
                quick = self._ended(session, None if session.closed else "the server ended the stream")
            if session.error is not None and self._reports_end(session):
                # Reported now that the stream's events are over, when what of the utterance was lost is known.
                await self._connection_event("on_connection_error", self._describe(session.error))
                await self._report_end(session, f"{self._describe(session.error)}{self._lost(session)}", quick)
            elif not session.closed and self._reports_end(session):
                # The server ended it unasked and without a word (a real server says why, or answers a
                # close): transcription stopped, and the utterance in progress is lost; the next audio
                # opens a new stream (a quick end backs off first).
                await self._connection_event("on_connection_error", "the server ended the stream")
                await self._report_end(session, f"the server ended the recognition stream{self._lost(session)}", quick)
        finally:
            session.done.set()
            self._sessions.discard(session)
            if self._session is session:
                self._session = None  # the next audio frame opens a fresh stream
            try:
                await session.close()
            except Exception:
                pass
            # Its connection is over: closed by the service (a settings change, the pipeline's end) or by
            # the server, or lost.
            await self._connection_event("on_disconnected")

    def _ended(self, session: StreamSession, why: str | None) -> bool:
        """Mark the stream's events over, with `why` when the service did not end it (before any wait, so
        that an open still adopting it sees both), and say whether this end would be a quick failure: an
        adopted stream, ended within `_QUICK_FAILURE_SECONDS` of opening, before any transcript. A stream
        adopted and not quick to end has shown the server working: the failures in a row are over."""
        session.ended, session.end_reason = True, why
        if not session.adopted or self._aborted or session.heard:
            return False
        if time.monotonic() - session.opened_at < _QUICK_FAILURE_SECONDS:
            return True
        self._open_failures = 0
        return False

    def _reports_end(self, session: StreamSession) -> bool:
        """Whether the stream's event task reports its end: not once cancelled, and not for a stream the
        service had not taken yet (its open reports that end, as the open's failure: one ErrorFrame)."""
        return session.adopted and not self._aborted

    async def _report_end(self, session: StreamSession, what: str, quick: bool, e: Exception | None = None) -> None:
        """Report a stream's end that the service did not ask for; a quick one (see `_ended`) as a failed
        attempt to get a working stream."""
        if not quick:
            await self.push_error(what, exception=e)
            return
        age = time.monotonic() - session.opened_at
        await self._failed_attempt(f"{what}; the stream ended {age:.1f} s after it opened, before any transcript", e)

    def _language(self) -> Language | str | None:
        # pipecat stores a Language (or a code it does not know, as given) after converting the setting
        return self._settings.language

    async def _on_partial(self, event: Partial) -> None:
        if not self._settings.interim_results or not event.text or self._aborted:
            return
        await self.push_frame(
            InterimTranscriptionFrame(event.text, self._user_id, time_now_iso8601(), self._language(), result=event)
        )

    def _finals_owed(self) -> int:
        """Finals still to come for flushes already made: sent to a stream, or kept for one opening."""
        return sum(s.outstanding for s in self._sessions) + self._backlog.count(None)

    async def _on_final(self, event: Final) -> None:
        if self._aborted:
            return
        # An earlier utterance's final, while the flush of a later one (the user paused, said a few words
        # and stopped again before it came) still owes its own: that later final ends what was said, and
        # pipecat's end of speech and TTFB are the later stop's.
        last = not self._finals_owed()
        if not event.text:
            if not last:
                return
            # Nothing was said (a cough, a VAD false start): no transcript, but the wait for one is over.
            # There is no time to a transcript to report: the measurement is abandoned, as pipecat's own
            # timeout does when no transcript comes (stopping it reported this answer's time as a TTFB).
            await self.cancel_ttfb_metrics()
            await self._cancel_ttfb_timeout()
            return
        # Usage first, so tracing attaches it to the span this transcript closes.
        await self.emit_stt_usage_metrics()
        if last:
            self.confirm_finalize()
        language = self._language()
        # Finalized tells pipecat's turn strategies that nothing more is coming (Smart Turn's ends a
        # complete turn on it at once). A final that comes while the user speaks again (the previous
        # utterance's, late), or while a later flush still owes its final, is not that: the rest of
        # what was said is still to come. Deepgram's is finalized only for a finalize requested since
        # the last VADUserStartedSpeakingFrame. At the pipeline's end nothing more comes whatever.
        finalized = (last and not self._user_speaking) or self._draining
        await self.push_frame(
            TranscriptionFrame(
                event.text, self._user_id, time_now_iso8601(), language, result=event, finalized=finalized
            )
        )
        await self._handle_transcription(event.text, True, language)

    @staticmethod
    def _lost(session: StreamSession) -> str:
        """What an ended stream's error adds when audio pushed to it will not be transcribed."""
        if session.unflushed or session.outstanding:
            return " (the audio of the utterance in progress was not transcribed)"
        return ""

    @staticmethod
    def _describe(event: Error) -> str:
        return f"engine error '{event.code}': {event.message}"

    async def _on_engine_error(self, session: StreamSession, event: Error) -> None:
        """Take the stream out of service and close it; its event task reports the error once its events
        are over. A fatal error ends the stream anyway. A non-fatal one (docs/protocol.md: the server
        refused a message, or is shutting down; or a server message the client could not read) leaves it
        open: unclosed, its connection and its slot on the server stayed held, unused, until the server's
        idle timeout, and the utterance in progress was never flushed. Retired, the stream finishes that
        utterance if it still can, and closes after its last Final."""
        if session.error is not None:
            return  # already out of service: its first error is the one reported
        session.error = event
        async with self._lock:  # ordered with pushes: a flush covers every push made to the stream
            if self._session is session:
                self._session = None  # the next audio frame opens a fresh stream
            if self._aborted:
                return
            try:
                await session.retire()
            except Exception as e:  # the stream is over: the audio not flushed is lost, the report says so
                logger.debug(f"{self}: retiring a stream after its error failed: {e}")
                await session.close()

    @traced_stt
    async def _handle_transcription(self, transcript: str, is_final: bool, language: Language | None = None):
        """Tracing hook (pipecat's STT spans); does nothing itself."""

    # ---- settings --------------------------------------------------------------------------------
    async def _update_settings(self, delta: STTSettings) -> dict[str, Any]:
        """Apply a settings delta. `language` and `interim_results` apply at once; `latency_ms` and
        `model` need a new engine stream, opened at once when no utterance is in progress and otherwise
        when the current one ends (the utterance is finished in the mode it started in). A new model
        loads in the background first (`_load_model`): `settings.model` changes once it has loaded. In
        remote mode the server's model is fixed: a `model` change is refused (an ErrorFrame) and the rest
        applies."""
        if is_given(delta.model):
            model = delta.model
            delta = copy.copy(delta)  # the caller's delta is left as it was
            delta.model = NOT_GIVEN  # `_settings.model` is the model streams open with: not before it loads
            # (The server's own model, by the name its `ready` gave, is no change either.)
            if self._remote is not None and model not in (self._settings.model, self._server_model):
                await self.push_error(
                    f"cannot switch to model {model!r} in remote mode: the server transcribes with the "
                    f"model `monosemantic serve` was started with, fixed until it restarts; keeping "
                    f"{self._settings.model!r}"
                )
            elif self._remote is None and model != self._pending_model:
                await self._stop_loading()  # the latest update wins
                if model != self._settings.model:
                    self._pending_model = model
                    self._loading = self.create_task(self._load_model(model), name="monosemantic_load_model")
        changed = await super()._update_settings(delta)
        if "latency_ms" in changed:
            self._retry_at, self._open_failures = 0.0, 0
            await self._swap_if_idle()
        self._warn_unhandled_updated_settings(changed.keys() - {"model", "language", "latency_ms", "interim_results"})
        return changed

    async def _stop_loading(self) -> None:
        task, self._loading, self._pending_model = self._loading, None, None
        if task is not None:
            await self.cancel_task(task, timeout=1.0)

    async def _load_model(self, model: str) -> None:
        """Load `model`'s engine off the frame path; once it has loaded, make it the setting, so the next
        utterance boundary (or now, between utterances) switches to it without loading anything. If it
        cannot load: one ErrorFrame naming it, and the current model stays."""
        try:
            await self._engine_for(model)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._loading = self._pending_model = None
            await self.push_error(
                f"cannot switch to model {model!r}: {e}; keeping {self._settings.model!r}", exception=e
            )
            return
        self._loading = self._pending_model = None
        self._settings.model = model
        self._sync_model_name_to_metrics()
        logger.info(f"{self}: model {model!r} loaded; streams switch to it at the next utterance boundary")
        await self.set_usable(True)  # a model that loads may be what makes the service work again
        self._retry_at, self._open_failures = 0.0, 0
        await self._swap_if_idle()

    async def _swap_if_idle(self) -> None:
        """Open a stream with the current settings now if no utterance is in progress (else `_finalize`
        does, at the utterance's end)."""
        async with self._lock:
            session = self._session
            if session is not None and not self._in_utterance and self._needs_new_stream(session):
                try:
                    await self._swap()
                except Exception as e:
                    await self._report_failure("could not switch streams", e)
