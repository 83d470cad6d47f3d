"""Latency options of the LiveKit STT checked against the loaded model, also with no stream live, and
prewarm around aclose (real livekit-agents base classes, a real engine on the tiny checkpoint)."""

from __future__ import annotations

import asyncio

import pytest
from livekit.agents.stt import SpeechEventType as T

import monosemantic
from livekit.plugins import monosemantic as lk_monosemantic

pytestmark = pytest.mark.timeout(120)

NO_VAD = monosemantic.EngineConfig(vad=None)


def test_a_latency_mode_the_model_lacks_is_refused_before_the_first_stream(checkpoint, audio_clips, lk):
    """The STT is prewarmed (its model loaded) and has no stream yet, as between an agent's start and
    its first session. A mode the model lacks used to be accepted silently there, and every stream
    after it failed with a non-retryable error; it is refused at once, as it is while a stream is
    live, and changes nothing."""
    audio = audio_clips["jfk.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stt.prewarm()
        await asyncio.wait_for(stt._prewarm_task, 60)  # the model is loaded
        with pytest.raises(ValueError, match="123"):
            stt.update_options(latency_ms=123)
        assert stt._opts.latency_ms == 160
        return await lk.drive(stt.stream(), audio)

    events = asyncio.run(main())
    assert [e.alternatives[0].text for e in events if e.type == T.FINAL_TRANSCRIPT][0]


def test_prewarm_after_aclose_loads_again(checkpoint):
    """An STT held at module level is closed at a session's end and prewarmed by the next agent; the
    first prewarm's task, cancelled by aclose, was kept, and every later prewarm did nothing (the next
    session's first stream paid for the load)."""
    from monosemantic.engine.shared import shared_engines

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stt.prewarm()
        await stt.aclose()  # at once: the first load is cancelled (or done)
        monosemantic.close_shared_engines()  # the process let the engine go meanwhile
        assert not shared_engines()
        stt.prewarm()
        await asyncio.wait_for(stt._prewarm_task, 60)
        return len(shared_engines())

    assert asyncio.run(main()) == 1
