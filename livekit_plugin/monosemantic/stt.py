"""STT: monosemantic speech recognition for LiveKit Agents, on the process's shared engine."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import weakref

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    APITimeoutError,
    NotGivenOr,
    stt,
)
from livekit.agents.types import TimedString
from livekit.agents.utils import AudioBuffer, is_given, merge_frames

import monosemantic

from .backend import (
    EngineLike,
    EngineSpec,
    acquire_engine,
    acquire_engine_blocking,
    as_api_error,
    engine_error,
    remote_engine,
)
from .log import logger
from .options import STTOptions
from .stream import SpeechStream, frame_pcm
from .turns import SAMPLE_RATE


class STT(stt.STT):
    def __init__(
        self,
        *,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str = "auto",
        latency_ms: int = 160,
        language: str = "en",
        interim_results: bool = True,
        engine_config: "monosemantic.EngineConfig | None" = None,
        base_url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        """Streaming speech-to-text on a local monosemantic engine.

        Args:
            model: Hugging Face id or path of a cache-aware NeMo checkpoint (None:
                `monosemantic.DEFAULT_MODEL`, Nemotron Speech Streaming 0.6b).
            device: "auto" (CUDA when available), "cuda", "cuda:1", "cpu".
            dtype: "auto", "float32", "bfloat16", "float16".
            latency_ms: streaming latency mode (chunk duration); one of the checkpoint's modes.
            language: language code put on transcripts.
            interim_results: send INTERIM_TRANSCRIPT events.
            engine_config: how the shared engine batches streams (monosemantic.EngineConfig; None: its
                defaults). STTs with equal model, device, dtype and engine_config share one engine.
            base_url: the URL of a `monosemantic serve` instance (e.g. "ws://gpu-host:8080"): streams
                run there, batched with every other process's, instead of in this process (`model`,
                `device`, `dtype` and `engine_config` are then the server's business and ignored).
            api_key: the server's API key (default: the MONOSEMANTIC_API_KEY environment variable).
        """
        super().__init__(
            capabilities=stt.STTCapabilities(
                streaming=True,
                interim_results=True,
                aligned_transcript="word",
                offline_recognize=True,
                manual_flush=True,
            )
        )
        model = monosemantic.DEFAULT_MODEL if model is None else model
        if engine_config is not None and not isinstance(engine_config, monosemantic.EngineConfig):
            raise TypeError(f"engine_config must be a monosemantic.EngineConfig, got {type(engine_config).__name__}")
        if not base_url:  # (the server's business otherwise, and ignored)
            from monosemantic.asr import check_device_and_dtype

            check_device_and_dtype(device, dtype)
        self._spec = EngineSpec(os.fspath(model), str(device), str(dtype), engine_config)
        self._opts = STTOptions(latency_ms=latency_ms, language=language, interim_results=interim_results)
        self._opts.validate()
        self._streams: weakref.WeakSet[SpeechStream] = weakref.WeakSet()
        self._prewarm_task: asyncio.Task | None = None
        self._base_url, self._api_key = base_url, api_key
        self._remote = remote_engine(base_url, api_key) if base_url else None
        self._local: EngineLike | None = None  # the shared engine, once loaded (checks latency modes)
        self._server_model: str | None = None  # remote: the server's model as a closed client learnt it

    @property
    def model(self) -> str:
        """The model transcribing (LiveKit labels STTMetrics with it). In remote mode the server's, as
        its streams name it once one has opened (the `model` argument is ignored there); until then, or
        from a server that does not name it, the `model` argument."""
        if self._remote is not None:
            served = getattr(self._remote, "model", None) or self._server_model
            if served:
                return served
        return self._spec.model

    @property
    def provider(self) -> str:
        return "monosemantic"

    async def _engine(self) -> EngineLike:
        """The backend seam: where every stream and recognize() call gets its engine."""
        if self._remote is not None:
            return self._remote
        self._local = await acquire_engine(self._spec)
        return self._local

    def prewarm(self) -> None:
        """Load the model and start the shared engine ahead of the first stream. Inside a running event
        loop (AgentSession calls this when an agent starts) it loads in a worker thread without blocking
        the loop; called with no loop (a worker's prewarm function) it blocks until loaded."""
        if self._remote is not None:
            return  # the server loads and warms its model before it reports ready
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            acquire_engine_blocking(self._spec)
            return
        # One load at a time; a finished one (loaded, failed or cancelled by aclose) may be asked again:
        # the shared engine may have been closed since, or the load may succeed this time.
        if self._prewarm_task is None or self._prewarm_task.done():
            self._prewarm_task = loop.create_task(self._prewarm(), name="monosemantic.prewarm")

    async def _prewarm(self) -> None:
        try:
            await self._engine()
        except Exception as exc:  # the first stream reports it to the session; here it is only early
            logger.warning("prewarm failed: %s", exc)

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> SpeechStream:
        opts = dataclasses.replace(self._opts)
        if is_given(language):
            opts.language = language
            opts.validate()
        stream = SpeechStream(
            stt=self, opts=opts, acquire=self._engine, conn_options=conn_options, remote=self._remote is not None
        )
        self._streams.add(stream)
        return stream

    def update_options(
        self,
        *,
        latency_ms: NotGivenOr[int] = NOT_GIVEN,
        language: NotGivenOr[str] = NOT_GIVEN,
        interim_results: NotGivenOr[bool] = NOT_GIVEN,
    ) -> None:
        """Change options for new streams and every live one. A latency change reaches a live stream at
        its next utterance boundary (the engine stream is reopened there, no audio is lost)."""
        opts = dataclasses.replace(self._opts)
        if is_given(latency_ms):
            opts.latency_ms = latency_ms
        if is_given(language):
            opts.language = language
        if is_given(interim_results):
            opts.interim_results = interim_results
        opts.validate()
        if is_given(latency_ms):
            # Checked against the loaded model too, not only the live streams' engines: with no stream
            # live (prewarmed, or between sessions) a mode the model lacks would otherwise be kept, and
            # every later stream would fail with a non-retryable error.
            model = getattr(self._local, "model", None)
            if model is not None:
                model.context_for(latency_ms)
            for stream in self._streams:  # all checked before any changes: a refusal changes nothing
                stream.check_latency(latency_ms)
        self._opts = opts
        for stream in self._streams:
            stream.update_options(latency_ms=latency_ms, language=language, interim_results=interim_results)

    async def aclose(self) -> None:
        """Close this STT's streams (and, in remote mode, its connections to the server). The STT stays
        usable, in both modes: the shared engine stays up for the process's other sessions
        (`monosemantic.close_shared_engines()` stops it), and a remote STT opens new connections for
        later streams, as an STT held at module level and reused by the next session needs."""
        if self._prewarm_task is not None:
            self._prewarm_task.cancel()
            self._prewarm_task = None  # a later prewarm (the next session's) loads again
        await asyncio.gather(*(s.aclose() for s in list(self._streams)), return_exceptions=True)
        if self._remote is not None:
            # A closed client refuses new streams (and a reopened one would leak its HTTP session), so
            # later streams get a fresh client.
            closing, self._remote = self._remote, remote_engine(self._base_url, self._api_key)
            # The fresh client knows nothing of the server yet: metrics keep the name it gave.
            self._server_model = getattr(closing, "model", None) or self._server_model
            await closing.aclose()

    async def _recognize_impl(
        self,
        buffer: AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        """Transcribe a whole buffer: one stream of the shared engine, flushed once.

        On a remote engine `conn_options.timeout` bounds the wait without progress, not the whole call:
        once the audio is in, a stream that sends no event for that long (a server that accepted the
        stream, then hung while its connection stays up, answering pings) fails with APITimeoutError,
        which the base class retries. A working server is never that quiet while it works (a Partial at
        every step that finds words, a Usage every few seconds of audio), so a long buffer is not cut for
        its length. A local engine is not bounded, as in the stream (SpeechStream._check_progress): a
        healthy one slower than half real time can be silent longer while it works through a buffer that
        ends in silence, and a retry would land on the same engine. Pushing the audio is bounded by the
        engine itself (a local engine's push timeout, a remote connection's heartbeat)."""
        if is_given(language):
            dataclasses.replace(self._opts, language=language).validate()
        language = language if is_given(language) else self._opts.language
        frames = buffer if isinstance(buffer, list) else [buffer]
        frame = merge_frames(frames) if frames else None
        if frame is None or frame.samples_per_channel == 0:
            return _final_event(language, monosemantic.Final(text=""))
        engine = await self._engine()
        try:
            es = await engine.open_stream(latency_ms=self._opts.latency_ms, sample_rate=frame.sample_rate)
        except Exception as exc:
            raise as_api_error(exc, "opening a recognition stream failed") from exc
        try:
            await es.push(frame_pcm(frame))
            await es.flush()
            events = aiter(es)
            bound = conn_options.timeout if self._remote is not None else None
            while True:
                try:
                    event = await asyncio.wait_for(anext(events), bound)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise APITimeoutError(
                        f"recognition timed out: the speech engine sent nothing for {conn_options.timeout:g} s",
                    ) from None
                if isinstance(event, monosemantic.Final):
                    return _final_event(language, event)
                if isinstance(event, monosemantic.Error):
                    raise engine_error(event)
        except monosemantic.MonosemanticError as exc:
            raise as_api_error(exc, "recognition failed") from exc
        finally:
            await es.close()
        raise as_api_error(monosemantic.StreamError("the stream ended without a transcript"), "recognition failed")


def _final_event(language: str, final: "monosemantic.Final") -> stt.SpeechEvent:
    rate = SAMPLE_RATE  # engine times are model-rate samples whatever rate the buffer had
    words = [TimedString(w.text, start_time=w.start / rate, end_time=w.end / rate) for w in final.words]
    data = stt.SpeechData(
        language=language, text=final.text, start_time=final.start / rate, end_time=final.end / rate, words=words
    )
    return stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[data])
