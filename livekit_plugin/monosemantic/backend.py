"""The one place the plugin gets an engine, and the mapping of monosemantic errors to LiveKit's.

The plugin needs only this much of an engine, so the in-process engine and a remote one (a WebSocket
client with the same interface) are interchangeable behind `EngineLike`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from livekit.agents import APIConnectionError, APIError, APIStatusError

import monosemantic


class EngineStreamLike(Protocol):
    vad: bool  # whether its engine reports voice activity (a server may run without)

    async def push(self, pcm) -> None: ...
    async def flush(self, at: int | None = None) -> object: ...
    async def close(self) -> None: ...
    def __aiter__(self) -> AsyncIterator[monosemantic.Event]: ...


class EngineLike(Protocol):
    async def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> EngineStreamLike: ...


@dataclass(frozen=True)
class EngineSpec:
    """Which shared engine an STT uses: every STT of a process with an equal spec shares one engine, so
    all of the process's sessions are batched together."""

    model: str
    device: str
    dtype: str
    config: "monosemantic.EngineConfig | None"


async def acquire_engine(spec: EngineSpec) -> EngineLike:
    """The process's shared engine for `spec`, loading the model in a worker thread on first use."""
    try:
        return await monosemantic.aget_engine(spec.model, device=spec.device, dtype=spec.dtype, config=spec.config)
    except Exception as exc:
        raise as_api_error(exc, "loading the speech model failed") from exc


def remote_engine(base_url: str, api_key: str | None) -> EngineLike:
    """A client of a `monosemantic serve` instance (one per STT; each stream is its own connection)."""
    try:
        from monosemantic.client import RemoteEngine
    except ImportError as exc:
        raise APIConnectionError(f"remote mode needs the server extra: {exc}", retryable=False) from exc
    # keepalive: the session's audio input may pause for minutes (push-to-talk, input switched off); the
    # stream lives as long as the session, not until the server's idle timeout.
    return RemoteEngine(base_url, api_key, keepalive=True)


def acquire_engine_blocking(spec: EngineSpec) -> EngineLike:
    return monosemantic.get_engine(spec.model, device=spec.device, dtype=spec.dtype, config=spec.config)


def as_api_error(exc: BaseException, what: str) -> APIError:
    """LiveKit's error for a monosemantic failure; `retryable` says whether the base class's retry (per
    conn_options) can help."""
    if isinstance(exc, APIError):
        return exc
    message = f"{what}: {exc}"
    from monosemantic.client.errors import RemoteError, ServerRejectedError

    if isinstance(exc, ServerRejectedError):  # the server refused before the upgrade: keep its status
        return APIStatusError(message, status_code=exc.status, retryable=exc.retryable)
    if isinstance(exc, RemoteError):  # unreachable, or the connection dropped
        return APIConnectionError(message, retryable=exc.retryable)
    if isinstance(exc, monosemantic.CapacityError):
        # the engine is full; a slot frees when another session's stream closes
        return APIStatusError(message, status_code=503, retryable=True)
    if isinstance(exc, (monosemantic.ModelLoadError, monosemantic.MissingDependencyError)):
        return APIConnectionError(message, retryable=False)  # a bad path or missing package stays bad
    if isinstance(exc, (monosemantic.AudioError, ValueError, TypeError)):
        return APIStatusError(message, status_code=400, retryable=False)  # a bad option or bad audio
    if isinstance(exc, monosemantic.StreamError):
        return APIConnectionError(message, retryable=True)  # overloaded or shut down: a new stream may do
    return APIConnectionError(message, retryable=True)


def engine_error(event: monosemantic.Error) -> APIError:
    """The engine closed our stream: a failed batch step ('internal') or an engine shutdown ('closed').
    Both are worth a retry: the next attempt opens a fresh stream (on a fresh engine after a shutdown)."""
    return APIConnectionError(f"the speech engine closed the stream ({event.code}): {event.message}", retryable=True)
