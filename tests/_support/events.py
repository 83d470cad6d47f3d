"""Reading a stream's events in tests (a local EngineStream or a RemoteStream alike)."""

from __future__ import annotations

from monosemantic import Final


async def final_of(stream) -> Final:
    """The stream's next Final; AssertionError if the stream ends without one."""
    async for event in stream:
        if isinstance(event, Final):
            return event
    raise AssertionError("the stream ended without a Final")


async def utterances_in_frames(stream, pcm, frame: int, parts: int = 2, breathe_every: int | None = None) -> list:
    """Push `pcm` in `frame`-sample pieces as `parts` utterances (a flush after each), then read the
    events up to the last Final and close. `breathe_every`: yield to the loop after this many samples,
    so an engine in this process keeps up."""
    import asyncio

    import numpy as np

    for part in np.array_split(pcm, parts):
        for i in range(0, len(part), frame):
            await stream.push(part[i : i + frame])
            if breathe_every and i % breathe_every == 0:
                await asyncio.sleep(0.01)
        await stream.flush()
    events = []
    async for event in stream:
        events.append(event)
        if sum(isinstance(e, Final) for e in events) == parts:
            break
    await stream.close()
    return events


def by_kind(events) -> dict:
    """Each event type's events, in order: what stays the same however the engine's ticks interleave
    the kinds (VAD events against partials of earlier audio, when audio arrives faster than real time)."""
    return {kind: [e for e in events if type(e) is kind] for kind in {type(e) for e in events}}
