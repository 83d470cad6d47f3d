"""Engine streams that misbehave on purpose, for adapter tests: a wrapper passing every call through to
a real engine stream, whose subclasses override the one call that breaks."""

from __future__ import annotations


class PassThroughStream:
    """The EngineStream interface over a real stream `es`, unchanged."""

    def __init__(self, es):
        self._es, self.vad = es, es.vad

    async def push(self, pcm) -> None:
        await self._es.push(pcm)

    async def flush(self, at: int | None = None) -> None:
        await self._es.flush(at=at)

    async def close(self) -> None:
        await self._es.close()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self._es.__anext__()
