"""Reading a stream's events in tests (a local EngineStream or a RemoteStream alike)."""

from __future__ import annotations

from monosemantic import Final


async def final_of(stream) -> Final:
    """The stream's next Final; AssertionError if the stream ends without one."""
    async for event in stream:
        if isinstance(event, Final):
            return event
    raise AssertionError("the stream ended without a Final")
