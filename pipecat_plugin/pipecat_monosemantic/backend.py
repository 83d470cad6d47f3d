"""Where the service gets its recognizer: the one seam between the Pipecat adapter and an engine.

The service only needs an object with `open_stream(latency_ms=, sample_rate=)` returning a stream with
`push` / `flush` / `close` and async iteration of `monosemantic` events. The in-process engine
(`monosemantic.Engine`, shared by every service of the process) is one; a remote client speaking the same
interface over WebSocket is another.
"""

from __future__ import annotations

import os
from typing import AsyncIterator, Protocol

from monosemantic.events import Event


class StreamLike(Protocol):
    """One recognition stream (see `monosemantic.EngineStream`)."""

    async def push(self, pcm) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...


class EngineLike(Protocol):
    """Something that opens recognition streams (see `monosemantic.Engine`)."""

    async def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> StreamLike: ...


async def local_engine(model: str | os.PathLike, *, device: str, dtype: str, config) -> EngineLike:
    """The process-wide shared engine for this model: every service (and LiveKit STT) of the process
    asking for the same model, device, dtype and configuration lands in the same batches. The model loads
    in a worker thread on first use."""
    import monosemantic

    return await monosemantic.aget_engine(model, device=device, dtype=dtype, config=config)


def remote_engine(base_url: str, api_key: str | None) -> EngineLike:
    """A client of a `monosemantic serve` instance (each stream is its own WebSocket connection)."""
    from monosemantic.client import RemoteEngine

    return RemoteEngine(base_url, api_key)
