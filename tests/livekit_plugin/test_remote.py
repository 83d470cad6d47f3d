"""Remote mode: `STT(base_url=...)` against a real `monosemantic serve` app on loopback gives the same
transcripts and events as the in-process engine; server refusals and unreachable servers become
LiveKit's API errors, retried only when a retry can help."""

from __future__ import annotations

import asyncio
import socket

import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError
from livekit.agents.stt import SpeechEventType as T

from _support.server import RunningServer
from livekit.plugins import monosemantic as lk_monosemantic

pytestmark = pytest.mark.timeout(300)

@pytest.fixture(scope="module")
def server(ms_model):
    with RunningServer(ms_model("nemotron_rnnt"), api_key="s3cret", max_streams=4) as running:
        yield running


def finals(events):
    return [e.alternatives[0] for e in events if e.type == T.FINAL_TRANSCRIPT]


def test_remote_stream_equals_offline_transcription(server, ms_model, audio_clips, lk):
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0870.wav"]
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160)

    async def main():
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{server.port}", api_key="s3cret")
        try:
            return await lk.drive(stt.stream(), audio, realtime_factor=4.0)
        finally:
            await stt.aclose()

    events = asyncio.run(main())
    turns = lk.check_invariants(events, len(audio) / 16000)
    text = " ".join(f.text for f in finals(events) if f.text)
    assert turns and text
    # The server's VAD may cut the clip into several utterances; one utterance is offline-exact.
    if len([f for f in finals(events) if f.text]) == 1:
        assert text == expected.text
    usage = sum(e.recognition_usage.audio_duration for e in events if e.type == T.RECOGNITION_USAGE)
    assert usage == pytest.approx(len(audio) / 16000, abs=1e-3)


def test_remote_recognize_equals_offline_transcription(server, ms_model, audio_clips, lk):
    from livekit import rtc

    audio = audio_clips["jfk.wav"]
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160)
    pcm = lk.to_int16(audio)

    async def main():
        stt = lk_monosemantic.STT(base_url=f"http://127.0.0.1:{server.port}", api_key="s3cret")
        try:
            return await stt.recognize(rtc.AudioFrame(pcm.tobytes(), 16000, 1, len(pcm)))
        finally:
            await stt.aclose()

    event = asyncio.run(main())
    assert event.alternatives[0].text == expected.text
    assert [str(w) for w in event.alternatives[0].words] == [w.text for w in expected.words]


async def run_until_error(stt, conn_options, errors: list):
    """Iterate a stream until it fails, collecting the STT's error events into `errors`."""
    stt.on("error", errors.append)
    stream = stt.stream(conn_options=conn_options)
    try:
        async for _ in stream:
            pass
    finally:
        await stt.aclose()


def test_wrong_key_is_a_non_retryable_401(server):
    stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{server.port}", api_key="wrong")
    with pytest.raises(APIStatusError) as info:
        asyncio.run(run_until_error(stt, APIConnectOptions(max_retry=3, retry_interval=0.01, timeout=10), []))
    assert info.value.status_code == 401 and not info.value.retryable


def test_unreachable_server_is_retried_then_a_connection_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{port}")
    errors = []
    conn_options = APIConnectOptions(max_retry=2, retry_interval=0.01, timeout=5)
    with pytest.raises(APIConnectionError) as info:
        asyncio.run(run_until_error(stt, conn_options, errors))
    # each failed attempt is reported as recoverable until the retries run out
    assert [e.recoverable for e in errors] == [True, True, False]
    assert f"127.0.0.1:{port}" in str(info.value)
