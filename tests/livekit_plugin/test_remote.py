"""Remote mode: `STT(base_url=...)` against a real `monosemantic serve` app on loopback gives the same
transcripts and events as the in-process engine; server refusals and unreachable servers become
LiveKit's API errors, retried only when a retry can help."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
from aiohttp import web
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError
from livekit.agents.stt import SpeechEventType as T

from _support.server import READY, RunningServer, fake_server
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


def test_a_remote_stt_serves_new_streams_after_aclose(server, ms_model, audio_clips, lk):
    """An STT is often held at module level and reused by the next session after the previous one
    closed it. In process that works (the shared engine stays up); remote, the closed client used to
    refuse every later stream, through LiveKit's retries, as a connection error."""
    from livekit import rtc

    audio = audio_clips["jfk.wav"]
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160)
    pcm = lk.to_int16(audio)

    async def main():
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{server.port}", api_key="s3cret")
        first = await stt.recognize(rtc.AudioFrame(pcm.tobytes(), 16000, 1, len(pcm)))
        await stt.aclose()
        try:
            again = await stt.recognize(
                rtc.AudioFrame(pcm.tobytes(), 16000, 1, len(pcm)),
                conn_options=APIConnectOptions(max_retry=0, retry_interval=0.01, timeout=30),
            )
            streamed = await lk.drive(stt.stream(), audio, realtime_factor=4.0)
        finally:
            await stt.aclose()
        return first, again, streamed

    first, again, streamed = asyncio.run(main())
    assert first.alternatives[0].text == again.alternatives[0].text == expected.text
    assert " ".join(f.text for f in finals(streamed) if f.text)


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


def test_a_server_without_vad_gives_turns_and_interims_from_the_text(ms_model, audio_clips, lk):
    """Against `serve --no-vad` the plugin expected speech events that never came: no START and no
    INTERIM until the flush. The server's `ready` now says it runs no VAD, and turns open at the first
    text, as in process with `EngineConfig(vad=None)`."""
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0870.wav"]

    async def main(port):
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{port}")
        try:
            return await lk.drive(stt.stream(), audio, realtime_factor=4.0)
        finally:
            await stt.aclose()

    with RunningServer(ms_model("nemotron_rnnt"), vad=False, max_streams=2) as server:
        events = asyncio.run(main(server.port))
    turns = lk.check_invariants(events, len(audio) / 16000)
    kinds = [e.type for e in events]
    assert turns and kinds.index(T.START_OF_SPEECH) < kinds.index(T.INTERIM_TRANSCRIPT) < kinds.index(T.FINAL_TRANSCRIPT)
    assert finals(events)[-1].end_time == pytest.approx(len(audio) / 16000, abs=1e-3)


def test_a_connection_lost_at_a_vad_flush_is_a_retryable_connection_error(server, audio_clips, lk, monkeypatch):
    """The flush the plugin makes at the VAD's speech end ran outside the error mapping: a server gone at
    that moment ended the stream with the client's raw ConnectionLostError, which LiveKit neither
    retries nor reports as recoverable."""
    from monosemantic.client import ConnectionLostError
    from monosemantic.client.remote import RemoteStream

    async def lost(self):
        raise ConnectionLostError("the connection to the server was lost: gone", 1006)

    monkeypatch.setattr(RemoteStream, "flush", lost)
    speech = audio_clips["jfk.wav"]
    audio = np.concatenate([speech, np.zeros(16000 * 3, np.float32)])  # the VAD ends the turn first

    async def main():
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{server.port}", api_key="s3cret")
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=10))
        events = []
        reader = lk.start_reader(stream, events)
        feeding = asyncio.create_task(lk.feed(stream, audio, realtime_factor=4.0))
        await lk.wait_for(lambda: errors, timeout=60)
        feeding.cancel()  # the stream may have closed for good (the retry fails the same way)
        await asyncio.gather(feeding, return_exceptions=True)
        await stream.aclose()
        await asyncio.gather(reader, return_exceptions=True)
        await stt.aclose()
        return errors

    errors = asyncio.run(main())
    assert isinstance(errors[0].error, APIConnectionError) and errors[0].error.retryable
    assert errors[0].recoverable  # retried on a new connection


def test_recognize_against_a_server_that_never_answers_times_out_and_is_retried(lk):
    """A server that opened the stream and then hung (a stuck engine) while its connection stays up,
    answering pings: recognize() waited for the Final forever and LiveKit's retry never started. It now
    fails after conn_options.timeout without any event, with the retryable APITimeoutError."""
    connections = []

    async def wedged(request):
        ws = web.WebSocketResponse()  # autoping: the connection looks alive
        await ws.prepare(request)
        connections.append(ws)
        await ws.send_json(READY)
        async for msg in ws:  # takes the audio and the flush, answers nothing
            if msg.type is web.WSMsgType.TEXT and msg.json()["type"] == "close":
                break  # (so that the test's connections end at once)
        return ws

    async def main():
        async with fake_server(wedged) as url:
            stt = lk_monosemantic.STT(base_url=url)
            errors = []
            stt.on("error", errors.append)
            frames = list(lk.frames(np.zeros(16000, np.float32)))
            options = APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=1.0)
            try:
                with pytest.raises(APIConnectionError) as info:
                    await asyncio.wait_for(stt.recognize(frames, conn_options=options), 30)
            finally:
                await stt.aclose()
            return info.value, errors

    error, errors = asyncio.run(main())
    assert len(connections) == 2  # the timeout was retried on a new connection
    assert isinstance(error.__cause__, APITimeoutError)
    assert [(type(e.error), e.recoverable) for e in errors] == [(APITimeoutError, True), (APITimeoutError, False)]
