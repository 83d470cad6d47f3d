"""Remote mode: `STT(base_url=...)` against a real `monosemantic serve` app on loopback gives the same
transcripts and events as the in-process engine; server refusals and unreachable servers become
LiveKit's API errors, retried only when a retry can help."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import numpy as np
import pytest
from aiohttp import web
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError, APITimeoutError
from livekit.agents.stt import SpeechEventType as T

from _support.fake_server import READY, FakeServer, fake_server
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


def test_remote_metrics_name_the_servers_model(server, ms_model, audio_clips, lk):
    """STTMetrics are labelled with `STT.model`, which in remote mode was the constructor's `model` (by
    default monosemantic.DEFAULT_MODEL) whatever the server ran. Once a stream has opened it is the model
    the server's `ready` names (its checkpoint file's name here), and it stays so after aclose()."""
    from pathlib import Path

    from livekit import rtc
    from livekit.agents.metrics import STTMetrics

    import monosemantic

    served = Path(ms_model("nemotron_rnnt").source).name
    audio = audio_clips["jfk.wav"]
    pcm = lk.to_int16(audio)

    async def main():
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{server.port}", api_key="s3cret")
        metrics = []
        stt.on("metrics_collected", metrics.append)
        before = stt.model
        try:
            await lk.drive(stt.stream(), audio, realtime_factor=4.0)
            await stt.recognize(rtc.AudioFrame(pcm.tobytes(), 16000, 1, len(pcm)))
        finally:
            await stt.aclose()
        return before, metrics, stt.model

    before, metrics, after = asyncio.run(main())
    assert before == monosemantic.DEFAULT_MODEL  # nothing known of the server yet
    streamed = [m for m in metrics if isinstance(m, STTMetrics) and m.streamed]
    recognized = [m for m in metrics if isinstance(m, STTMetrics) and not m.streamed]
    assert streamed and recognized
    assert {m.metadata.model_name for m in streamed + recognized} == {served} and after == served


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

    async def lost(self, at=None):
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
    server = FakeServer(answer_flushes=False)  # takes the audio and the flush, answers nothing

    async def main():
        async with fake_server(server) as url:
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
    assert len(server.connections) == 2  # the timeout was retried on a new connection
    assert isinstance(error.__cause__, APITimeoutError)
    assert [(type(e.error), e.recoverable) for e in errors] == [(APITimeoutError, True), (APITimeoutError, False)]


def wedged_server(connections: list, answer_from: int | None = None):
    """A server that accepts each stream and then hangs (a stuck engine behind a live server): it reads
    the audio, flushes and `close` and answers nothing, while its connection stays up and answers pings.
    From connection number `answer_from` (0-based) on, it answers every flush with a Final ("hello")
    and ends the stream at `close`, as a healthy server does."""

    async def handler(request):
        ws = web.WebSocketResponse()  # autoping: the connection looks alive
        await ws.prepare(request)
        n = len(connections)
        connections.append(ws)
        await ws.send_json(READY)
        healthy, received = answer_from is not None and n >= answer_from, 0
        async for msg in ws:
            if msg.type is web.WSMsgType.BINARY:
                received += len(msg.data) // 2
            elif healthy and msg.type is web.WSMsgType.TEXT:
                kind = msg.json()["type"]
                if kind == "flush":
                    end = received / 16000
                    await ws.send_json({"type": "final", "text": "hello", "start": 0.0, "end": end,
                                        "words": [{"word": "hello", "start": 0.0, "end": end}]})
                elif kind == "close":
                    break
        return ws

    return handler


@contextlib.asynccontextmanager
async def stream_on_a_wedged_server(lk, connections: list, timeout: float, answer_from: int | None = None):
    """A plugin stream (one retry, `timeout` as conn_options.timeout) on `wedged_server`, read from the
    start, with one second of audio pushed. Yields (stream, reader, events, errors); closes it all."""
    async with fake_server(wedged_server(connections, answer_from)) as url:
        stt = lk_monosemantic.STT(base_url=url)
        errors, events = [], []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=timeout))
        reader = lk.start_reader(stream, events)
        try:
            await lk.feed(stream, np.zeros(16000, np.float32))
            yield stream, reader, events, errors
        finally:
            await stream.aclose()
            await stt.aclose()
            await asyncio.gather(reader, return_exceptions=True)


def test_a_stream_whose_flush_gets_no_final_from_a_hung_server_times_out_and_is_retried(lk):
    """The streaming side of the recognize() case above: after end_input() (the base class flushes) the
    stream waited for a Final the hung server never sent, and end_input() never returned. A Final owed
    with no event for conn_options.timeout now fails the run with the retryable APITimeoutError; the
    retry finds the input ended and closes its stream (whose end, too, the hung server never sends)."""
    connections: list = []

    async def main():
        async with stream_on_a_wedged_server(lk, connections, timeout=1.0) as (stream, reader, _, errors):
            stream.end_input()
            await asyncio.wait_for(reader, 30)  # (waited forever)
        return errors

    errors = asyncio.run(main())
    assert [(type(e.error), e.recoverable) for e in errors] == [(APITimeoutError, True)]
    assert len(connections) == 2  # retried on a new connection


def test_a_stream_goes_on_after_a_hung_flush_on_a_new_connection(lk):
    """A framework flush the hung server never answers: the run fails, the flush gets an empty FINAL
    (its audio is lost; the session waits for one after commit_user_turn), the retry opens a new
    connection (a healthy one here) and the stream goes on with the audio pushed after it."""
    connections: list = []

    async def main():
        async with stream_on_a_wedged_server(lk, connections, timeout=1.0, answer_from=1) as (stream, reader, events, errors):
            stream.flush()  # as the session does when it commits a turn
            await asyncio.wait_for(lk.wait_for(lambda: errors), 30)
            await lk.feed(stream, np.zeros(16000, np.float32))
            stream.end_input()
            await asyncio.wait_for(reader, 30)
        return events, errors

    events, errors = asyncio.run(main())
    assert [(type(e.error), e.recoverable) for e in errors] == [(APITimeoutError, True)]
    assert len(connections) == 2
    assert [e.alternatives[0].text for e in events if e.type == T.FINAL_TRANSCRIPT] == ["", "hello"]
    lk.check_invariants([e for e in events if e.type != T.FINAL_TRANSCRIPT], 0.0)  # its START and END


def test_a_stream_owing_no_final_is_not_timed_out_by_a_quiet_server(lk):
    """Silence between turns is normal: with no flush sent, a server that sends nothing for longer
    than conn_options.timeout is not a failure."""
    connections: list = []

    async def main():
        async with stream_on_a_wedged_server(lk, connections, timeout=0.2) as (_, reader, _, errors):
            await asyncio.sleep(1.0)  # five times the timeout without an event
            assert not reader.done()
        return errors

    errors = asyncio.run(main())
    assert errors == [] and len(connections) == 1


def test_aclose_cuts_the_connection_of_a_server_that_hung_while_nothing_was_owed(lk):
    """aclose() sends the server `close` and lets the run end; a server that hung answers neither. The
    connection was cut only when the run had timed out waiting for something owed (a Final): one that
    hung while nothing was owed (no flush sent) kept its connection open after aclose(), and with it a
    slot on the server, until the STT itself was closed."""
    import importlib

    plugin_stream = importlib.import_module("livekit.plugins.monosemantic.stream")

    async def main():
        async with fake_server(FakeServer(then="hang")) as url:  # never reads, never answers
            stt = lk_monosemantic.STT(base_url=url)
            stream = stt.stream(conn_options=APIConnectOptions(max_retry=0, timeout=30))
            try:
                await lk.feed(stream, np.zeros(16000, np.float32))
                await lk.wait_for(lambda: stream._es is not None)
                es = stream._es
                await stream.aclose()
                await asyncio.gather(*plugin_stream._cutting)  # the cut, if aclose made one
                return es._ws.closed
            finally:
                await stt.aclose()

    assert asyncio.run(main())


def test_a_pause_in_the_input_longer_than_the_servers_idle_timeout_keeps_the_stream(ms_model, audio_clips, lk):
    """The session's audio input switched off for a while (push-to-talk) sends the plugin nothing. The
    server ended such a connection at its idle timeout (60 s by default), and every pause that long
    cost an `idle_timeout` error event, a warning and a reconnect; the plugin now keeps it alive."""
    model = ms_model("nemotron_rnnt")
    first, second = audio_clips["jfk.wav"][: 16000 * 3], audio_clips["61-70968-0000.flac"][: 16000 * 3]

    async def main(port):
        stt = lk_monosemantic.STT(base_url=f"ws://127.0.0.1:{port}")
        errors, events = [], []
        stt.on("error", errors.append)
        stream = stt.stream()
        reader = lk.start_reader(stream, events)
        try:
            await lk.feed(stream, first, realtime_factor=4.0)
            stream.flush()
            await asyncio.sleep(2.5)  # no input for two and a half idle timeouts
            await lk.feed(stream, second, realtime_factor=4.0)
            stream.end_input()
            await asyncio.wait_for(reader, 60)
        finally:
            await stream.aclose()
            await stt.aclose()
        return errors, events

    with RunningServer(model, idle_timeout_seconds=1.0) as running:
        errors, events = asyncio.run(main(running.port))
    assert errors == []
    lk.check_invariants(events, 6.0)  # stream times count the audio
    assert " ".join(f.text for f in finals(events) if f.text)
