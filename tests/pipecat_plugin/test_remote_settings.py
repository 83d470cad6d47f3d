"""Settings updates of the Pipecat service in remote mode that the server refuses (the real pipecat-ai
package, the real engine and a real `monosemantic serve` app)."""

from __future__ import annotations

import asyncio

import pytest
from pipecat.frames.frames import STTUpdateSettingsFrame

from _support.server import RunningServer
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(240)


def test_a_latency_mode_the_server_refuses_keeps_the_service_usable_and_transcribing(harness, model, speech):
    """The server refuses an unknown mode with HTTP 400. Pipecat classifies an exception carrying a 400
    as a permanent INVALID_REQUEST and writes the processor off (no more audio reaches it) unless the
    ErrorFrame says otherwise; but the old stream carries on, so the next utterance must be transcribed."""
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]

    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}", api_key="k3y")
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(latency_ms=999)))
            await h.wait_for(lambda: h.errors())
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=30)
            usable = stt.is_usable
            await h.end()
            return h, stt, usable

    with RunningServer(model, api_key="k3y") as server:
        h, stt, usable = asyncio.run(main(server.port))
    assert [f.text for f in h.finals()] == expected
    [error] = h.errors()
    assert "latency_ms=999" in error.error and not error.category.is_permanent
    assert usable and stt._settings.latency_ms == 160
