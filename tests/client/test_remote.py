"""RemoteEngine against a real server: the EngineStream interface and events, typed failures that
adapters can map to retryable errors, and the load test end to end."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import monosemantic.event_queue as event_queue
from monosemantic import AudioError, Engine, Error, Final, SpeechEnded, SpeechStarted, StreamError, Usage
from monosemantic.client import ConnectionLostError, RemoteEngine, ServerRejectedError, ServerUnreachableError
from monosemantic.client.loadtest import LoadtestConfig, run_loadtest, summarize

from _support.events import final_of
from _support.fake_server import READY, FakeServer, fake_server
from _support.server import RunningServer

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(model):
    with RunningServer(model, max_streams=6) as running:
        yield running


def test_events_match_the_local_engine(server, model, audio_clips):
    """Speech framed by silences: VAD events, usage and the final arrive as the engine's own
    dataclasses with sample times; bad input raises AudioError and leaves the stream usable."""
    clip = audio_clips["jfk.wav"]
    audio = np.concatenate([np.zeros(8000, np.float32), clip, np.zeros(24000, np.float32)])
    want = model.transcribe(audio, latency_ms=160)

    async def main():
        async with RemoteEngine(server.http) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=16000)
            with pytest.raises(AudioError):
                await stream.push(b"\x00\x01\x02")
            with pytest.raises(AudioError):
                await stream.push(np.array([np.nan], np.float32))
            for i in range(0, len(audio), 320):
                await stream.push((np.round(audio[i : i + 320] * 32768)).astype(np.int16))
            await stream.flush()
            events = []
            async for event in stream:
                events.append(event)
                if isinstance(event, Final):
                    break
            await stream.close()
            events += [e async for e in stream]
            with pytest.raises(StreamError):
                await stream.push(b"\x00\x00")
            return stream, events

    stream, events = asyncio.run(main())
    assert stream.latency_ms == 160 and stream.sample_rate == 16000 and stream.stream_id
    (final,) = [e for e in events if isinstance(e, Final)]
    assert final.text == want.text and final.start == 0 and final.end == len(audio)
    starts = [e.sample for e in events if isinstance(e, SpeechStarted)]
    ends = [e.sample for e in events if isinstance(e, SpeechEnded)]
    assert starts and len(starts) == len(ends) and all(isinstance(s, int) for s in starts + ends)
    assert 4000 <= starts[0] <= 16000  # speech begins after the half second of silence
    assert sum(e.audio_seconds for e in events if isinstance(e, Usage)) == pytest.approx(len(audio) / 16000, abs=0.1)
    assert not [e for e in events if isinstance(e, Error)]


def test_the_servers_model_is_known_once_a_stream_opens(server, model):
    """`ready` names the server's model (the checkpoint file's name, not its path): the stream has it,
    and the engine once a stream has opened, for adapters to label their metrics with."""

    async def main():
        async with RemoteEngine(server.http) as engine:
            before = engine.model
            stream = await engine.open_stream()
            await stream.close()
            return before, stream.model, engine.model

    before, on_stream, on_engine = asyncio.run(main())
    assert before is None and on_stream == on_engine == Path(model.source).name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ready", [READY, {**READY, "model": 5}, {**READY, "model": ""}])
def test_a_server_that_does_not_name_its_model_still_opens_streams(ready):
    """Servers before the field send no `model` (and a malformed one is no name): the stream opens all
    the same, with no model known."""

    async def main():
        async with fake_server(FakeServer(ready=ready)) as url:
            async with RemoteEngine(url, connect_timeout=5) as engine:
                stream = await engine.open_stream()
                await stream.close()
                return stream.model, engine.model

    assert asyncio.run(asyncio.wait_for(main(), 30)) == (None, None)


def test_a_remote_stream_nobody_reads_keeps_its_final_in_bounded_memory(model, audio_clips, monkeypatch):
    """The client's events from the socket wait in the same bounded queue as a local stream's. (VAD off:
    speech events are never dropped, so with them the bound would be twice their number.)"""
    monkeypatch.setattr(event_queue, "UNREAD_LIMIT", 4)
    audio = audio_clips["jfk.wav"]

    async def main(server):
        async with RemoteEngine(server.http) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=16000)
            most = 0
            for i in range(0, len(audio), 320):
                await stream.push(audio[i : i + 320])
                most = max(most, stream._events.qsize())
            await stream.flush()
            # The client's reader task fills the queue on this loop; nothing here reads it yet.
            while not any(isinstance(e, Final) for e in stream._events._queue):
                most = max(most, stream._events.qsize())
                await asyncio.sleep(0.02)
            await stream.close()
            return [e async for e in stream], most

    with RunningServer(model, max_streams=1, vad=False) as server:
        events, most = asyncio.run(asyncio.wait_for(main(server), 120))
    assert most <= 8  # 22 unread events here without the compaction
    (final,) = [e for e in events if isinstance(e, Final)]
    assert final.text == model.transcribe(audio, latency_ms=160).text
    assert sum(e.audio_seconds for e in events if isinstance(e, Usage)) == pytest.approx(len(audio) / 16000, abs=0.1)


def test_unreachable_and_lost_connections_are_typed_and_retryable(model, audio_clips):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def unreachable():
        async with RemoteEngine(f"ws://127.0.0.1:{port}", connect_timeout=5) as engine:
            with pytest.raises(ServerUnreachableError) as err:
                await engine.open_stream()
            return err.value

    err = asyncio.run(unreachable())
    assert err.retryable and isinstance(err, StreamError)

    running = RunningServer(model, max_streams=2).__enter__()

    async def lost():
        engine = RemoteEngine(running.http)
        stream = await engine.open_stream(latency_ms=160)
        await stream.push(audio_clips["jfk.wav"][:16000])
        # The server vanishes without a closing handshake (a crash, a dropped link).
        running.call(_abort_all(running.state))
        with pytest.raises(ConnectionLostError) as lost_err:
            async for _ in stream:
                pass
        with pytest.raises(ConnectionLostError):
            await stream.push(b"\x00\x00")
        await engine.aclose()
        return lost_err.value

    try:
        lost_err = asyncio.run(lost())
    finally:
        running.__exit__(None, None, None)
    assert lost_err.retryable and lost_err.code is None


async def _abort_all(state):
    for session in list(state.sessions):
        session.transport.abort()


def test_one_remote_engine_holds_more_than_100_streams(model, audio_clips):
    """Each stream is a connection for its whole life, so one RemoteEngine (one HTTP session) must not
    cap them at an HTTP pool size (aiohttp's default is 100)."""
    count = 104

    async def main():
        async with RemoteEngine(running.http, connect_timeout=20) as engine:
            streams = await asyncio.gather(*(engine.open_stream(latency_ms=160) for _ in range(count)))
            last = streams[-1]
            await last.push(audio_clips["jfk.wav"][:16000])
            await last.flush()
            async for event in last:
                if isinstance(event, Final):
                    return len(streams), event

    with RunningServer(model, max_streams=count, vad=False) as running:
        opened, final = asyncio.run(main())
    assert opened == count and final.end == 16000


def test_rejections_carry_status_and_reason(server):
    async def main():
        async with RemoteEngine(server.http) as engine:
            with pytest.raises(ServerRejectedError) as err:
                await engine.open_stream(latency_ms=7)
            return err.value

    err = asyncio.run(main())
    assert err.status == 400 and err.reason == "bad_request" and not err.retryable and "160" in str(err)


@pytest.mark.parametrize("coalesce", [True, False], ids=["gathered", "every_frame"])
def test_loadtest_streams_in_real_time_and_covers_all_audio(server, audio_clips, coalesce):
    cfg = LoadtestConfig(url=server.http, streams=3, duration_s=6.0, latency_ms=160, ramp_s=0.3, coalesce=coalesce)
    clips = [audio_clips["61-70968-0000.flac"], audio_clips["jfk.wav"]]  # 4.0 s and 11 s: flushes mid-run and at the end
    run = asyncio.run(run_loadtest(cfg, clips))
    summary = summarize(cfg, run)
    assert summary["opened"] == 3 and summary["errors"] == 0, summary["error_samples"]
    assert summary["all_audio_covered"] and summary["audio_sent_s"] == pytest.approx(18.0)
    assert summary["flushes"] == summary["finals"] == 5  # streams 0 and 2 start on the 4 s clip
    assert 0 < summary["time_to_final_ms"]["p50"] < 2000
    assert summary["per_minute"][0]["finals"] == 5
    # Lags from when the audio was spoken: partials (their `end` lags the audio their step read, by
    # less than a chunk) and the VAD's events (after its minimum silence) arrive within seconds.
    assert summary["coalesce"] is coalesce
    assert 0 < summary["partial_lag_ms"]["p50"] < 2000 and 0 < summary["vad_lag_ms"]["p50"] < 3000
    assert run.partial_lag.count == sum(r.partials for r in run.reports) == sum(m["partials"] for m in summary["per_minute"])


def test_loadtest_drift_compares_the_first_and_last_full_minutes():
    from monosemantic.client.loadtest import LoadtestRun, StreamReport, format_summary

    cfg = LoadtestConfig(url="ws://127.0.0.1:1", streams=1, duration_s=180.0)
    # time to final 100 ms in minute 0, 300 ms in minute 1, 120 ms in minute 2, 900 ms in the tail minute 3
    run = LoadtestRun([StreamReport(index=0, opened=True, flushes=20, finals=20, covered=20)])
    for m, t in ((0, 0.1), (1, 0.3), (2, 0.12), (3, 0.9)):
        for i in range(5):
            run.final(m * 60 + 1.0 + i, t)
    summary = summarize(cfg, run)
    drift = summary["drift"]
    assert (drift["first_minute"], drift["last_minute"]) == (0, 2)
    assert drift["p50_change"] == pytest.approx(0.2) and drift["p95_change"] == pytest.approx(0.2)
    assert "drift, minute 0 -> minute 2: time-to-final p50 +20%, p95 +20%" in format_summary(summary)
    assert summarize(LoadtestConfig(url=cfg.url, duration_s=59.0), run)["drift"] is None


def test_loadtest_counts_a_refused_open_as_an_error():
    """The summary said "errors 0" while listing the streams that could not open."""
    from monosemantic.client.loadtest import LoadtestRun, StreamReport, format_summary

    cfg = LoadtestConfig(url="ws://127.0.0.1:1", streams=2, duration_s=10.0)
    refused = StreamReport(index=1, open_error="ServerCapacityError: the server refused the stream")
    summary = summarize(cfg, LoadtestRun([StreamReport(index=0, opened=True), refused]))
    assert summary["errors"] == 1 and summary["error_samples"] == [refused.open_error]
    assert "errors 1," in format_summary(summary)


def test_loadtest_past_its_deadline_reports_what_it_measured(monkeypatch):
    """The run's hard deadline (the streams' time, their finals' waits, a margin) passes when streams fall
    far behind: a server slow to open them, or pushes held back by a server that stopped reading. The
    run then raised TimeoutError out of `monosemantic loadtest`, a traceback instead of the report of the
    run (the one that mattered: a server that could not keep up). Now the late streams are cut, each
    with an error that says so, and the report comes."""
    import monosemantic.client.loadtest as loadtest

    # Ready 3 s after the upgrade (past the deadline below, within the client's connect timeout), and
    # never a final.
    slow_to_open = FakeServer(ready_delay=3.0, answer_flushes=False)

    monkeypatch.setattr(loadtest, "DEADLINE_MARGIN_S", 0.0)
    cfg = LoadtestConfig(url="ws://unused", streams=2, duration_s=1.0, ramp_s=0.0, final_timeout_s=0.25)
    clip = np.zeros(16000, np.float32)

    async def main():
        async with fake_server(slow_to_open) as url:
            return await run_loadtest(LoadtestConfig(**{**cfg.__dict__, "url": url}), [clip])

    run = asyncio.run(main())  # deadline: 1 s of audio + 2 x 0.25 s for finals
    summary = summarize(cfg, run)
    reports = run.reports
    assert len(reports) == 2 and summary["errors"] == 2 and not summary["all_audio_covered"]
    assert all("deadline" in r.errors[-1] for r in reports), [r.errors for r in reports]


def test_loadtest_bounds(server):
    with pytest.raises(ValueError, match="streams"):
        LoadtestConfig(url=server.http, streams=5000)
    with pytest.raises(ValueError, match="duration"):
        LoadtestConfig(url=server.http, duration_s=1e6)


def test_loadtest_refuses_an_unwritable_json_path_before_running(tmp_path):
    """A --json path that cannot be written is one line of error at once, not a traceback after the run
    (the unreachable URL would make the run itself fail quickly, and then the write)."""
    for path in (tmp_path / "no_such_dir" / "load.json", tmp_path):
        done = subprocess.run(
            [sys.executable, "-m", "monosemantic", "loadtest", "--url", "ws://127.0.0.1:9", "--streams", "1",
             "--duration", "1", "--json", str(path)],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and f"--json {path}" in done.stderr
        assert done.stdout == ""  # refused before the run
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_upgrades_but_never_says_ready_is_a_typed_error():
    async def main():
        async with fake_server(FakeServer(ready=None, then="hang")) as url:
            async with RemoteEngine(url, connect_timeout=1.0) as engine:
                with pytest.raises(ConnectionLostError) as err:
                    await engine.open_stream()
                return err.value

    err = asyncio.run(asyncio.wait_for(main(), 30))
    assert isinstance(err, StreamError) and err.retryable and "no ready message within 1 s" in str(err)


def test_a_connection_lost_after_close_with_a_final_owed_raises():
    """close() after flush() still waits for the Final (the server drains it); a connection lost before
    it arrives loses that utterance, and the iterator must say so as without close()."""
    cut_after_close = FakeServer(answer_flushes=False, on_close="abort")  # gone before the flush's final

    async def close_and_lose(url, flush: bool):
        async with RemoteEngine(url) as engine:
            stream = await engine.open_stream()
            await stream.push(np.zeros(1600, np.float32))
            if flush:
                await stream.flush()
            await stream.close()
            try:
                return [e async for e in stream]
            except ConnectionLostError as exc:
                return exc

    async def main():
        async with fake_server(cut_after_close) as url:
            return await close_and_lose(url, flush=True), await close_and_lose(url, flush=False)

    owed, not_owed = asyncio.run(asyncio.wait_for(main(), 30))
    assert isinstance(owed, ConnectionLostError) and owed.code is None and owed.retryable
    assert not_owed == []  # nothing was owed: a connection ending after close() is the expected end


def test_a_clean_close_frame_with_a_final_owed_raises():
    """A server that answers `close` with a clean 1000 close frame but without the final of an earlier
    flush (and without an error saying why) has lost that utterance: the iterator raises, as for a lost
    connection (a clean close frame used to end it as if nothing were owed)."""
    clean_close_without_final = FakeServer(answer_flushes=False)  # a close is answered with 1000

    async def main():
        async with fake_server(clean_close_without_final) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                await stream.push(np.zeros(1600, np.float32))
                await stream.flush()
                await stream.close()
                with pytest.raises(ConnectionLostError) as lost:
                    [e async for e in stream]
                return lost.value

    lost = asyncio.run(asyncio.wait_for(main(), 30))
    assert lost.code == 1000 and "final of 1 flush still owed" in str(lost)


@pytest.mark.parametrize("rate", [16000.7, 16000.0, 0, -16000, 999, 384_001, True, "16000"])
def test_sample_rates_are_checked_as_the_local_engine_checks_them(server, model, rate):
    async def main():
        async with Engine(model) as local:
            with pytest.raises(AudioError) as local_err:
                await local.open_stream(sample_rate=rate)
        async with RemoteEngine(server.http) as remote:
            with pytest.raises(AudioError) as remote_err:
                await remote.open_stream(sample_rate=rate)
        return local_err.value, remote_err.value

    local_err, remote_err = asyncio.run(main())
    assert str(remote_err) == str(local_err)
    assert server.wait_until(lambda: server.open_streams() == 0)


@pytest.mark.parametrize("latency", [160.7, 160.0, "160", True])
def test_latency_modes_that_are_not_integers_are_refused_before_connecting(server, latency):
    """int() used to turn 160.7 into the 160 ms mode; the local engine refuses all of these."""

    async def main():
        async with RemoteEngine(server.http) as remote:
            with pytest.raises(ValueError, match="not a mode"):
                await remote.open_stream(latency_ms=latency)

    asyncio.run(main())
    assert server.open_streams() == 0


def small_send_buffer(addr_info):
    """A client socket whose kernel send buffer is small, so the server's backpressure reaches push()
    within a few frames, as over a real network."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return sock


@pytest.fixture(scope="module")
def throttling_server(model):
    with RunningServer(model, max_streams=2, vad=False, max_buffered_seconds=1.0) as running:
        yield running


async def throttled(server, audio, interrupt):
    """Push `audio` (two minutes) in a task; 0.3 s in, while the server still holds it back, run
    `interrupt(stream, push)`; then the utterance's Final."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_send_buffer)) as http:
        async with RemoteEngine(server.http, session=http) as engine:
            stream = await engine.open_stream(latency_ms=160)
            push = asyncio.create_task(stream.push(audio))
            await asyncio.sleep(0.3)
            assert not push.done()  # a second of server buffer for two minutes of audio
            await interrupt(stream, push)
            final = await final_of(stream)
            await stream.close()
            return final


def test_a_cancelled_push_sends_its_unsent_audio_first_at_the_next_flush(throttling_server, audio_clips):
    """As a local stream's: the frames a cancelled push had not sent were silently dropped."""
    audio = np.tile(audio_clips["jfk.wav"], 12)

    async def cancel_then_flush(stream, push):
        push.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await push
        await stream.flush()

    final = asyncio.run(throttled(throttling_server, audio, cancel_then_flush))
    assert final.start == 0 and final.end == len(audio)


def test_a_push_cancelled_behind_a_cancelled_push_takes_its_audio_too(throttling_server, audio_clips):
    """As a local stream's: a second push, cancelled while the first's unsent rest still waited for the
    socket (before it held its own audio), lost its audio from the Final in silence."""
    audio = np.tile(audio_clips["jfk.wav"], 12)
    second = audio_clips["jfk.wav"][:16000]

    async def cancel_twice_then_flush(stream, push):
        push.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await push
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(stream.push(second), 0.05)
        await stream.flush()

    final = asyncio.run(throttled(throttling_server, audio, cancel_twice_then_flush))
    assert final.start == 0 and final.end == len(audio) + len(second)


def test_a_flush_during_a_throttled_push_covers_that_push(throttling_server, audio_clips):
    """Pushes and flushes of a stream run one at a time, in call order, as a local stream's: the flush was
    sent between the push's frames, ending the utterance in the middle of its audio."""
    audio = np.tile(audio_clips["jfk.wav"], 12)

    async def flush_meanwhile(stream, push):
        await stream.flush()
        assert push.done()

    final = asyncio.run(throttled(throttling_server, audio, flush_meanwhile))
    assert final.start == 0 and final.end == len(audio)


def test_typed_memoryviews_are_read_as_their_dtype_as_a_local_stream_reads_them(server, audio_clips):
    """A memoryview of a float32 array went out as its raw bytes, read by the server as int16 PCM:
    twice the samples, other text, no error."""
    from monosemantic.client.remote import to_pcm16

    clip = audio_clips["jfk.wav"][:32000]
    pcm = to_pcm16(clip)
    as_int16 = np.frombuffer(pcm, "<i2")
    assert to_pcm16(memoryview(clip)) == pcm
    assert to_pcm16(memoryview(as_int16)) == pcm
    assert to_pcm16(memoryview(pcm)) == pcm  # raw bytes stay bytes
    assert to_pcm16(as_int16.astype(">i2")) == pcm  # big-endian PCM is PCM (it was refused)
    with pytest.raises(AudioError, match="dtype int8"):
        to_pcm16(memoryview(np.ones(4, np.int8)))

    async def main():
        async with RemoteEngine(server.http) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(memoryview(clip))
            await stream.flush()
            final = await final_of(stream)
            await stream.close()
            return final

    final = asyncio.run(main())
    assert final.end == len(clip)


def test_an_api_key_with_control_characters_is_refused_up_front():
    """It goes into an HTTP header: aiohttp refused it only when connecting, with a bare ValueError."""
    for key in ("k3y\n", "a\rb", "\x00"):
        with pytest.raises(ValueError, match="control characters"):
            RemoteEngine("ws://127.0.0.1:9", api_key=key)
    RemoteEngine("ws://127.0.0.1:9", api_key="ok key-ÿ")


def test_a_closed_remote_engine_opens_no_more_streams(server):
    """It reopened its own HTTP session on the next open_stream, which nothing then closed (aiohttp's
    "Unclosed client session" at exit); a local Engine once closed refuses too."""

    async def main():
        engine = RemoteEngine(server.http)
        stream = await engine.open_stream(latency_ms=160)
        await stream.close()
        await engine.aclose()
        with pytest.raises(StreamError, match="closed"):
            await engine.open_stream(latency_ms=160)
        with pytest.raises(StreamError, match="closed"):
            async with engine:
                pass
        assert engine._session is None

    asyncio.run(main())


@pytest.mark.parametrize("reads", [True, False])
def test_a_server_that_stops_answering_with_the_connection_open_is_a_lost_connection(reads):
    """A frozen server (or a network cut that sent no reset) keeps the connection open and answers
    nothing: pushes, flushes and reads used to wait forever. The heartbeat's unanswered ping ends the
    stream with ConnectionLostError, which adapters retry. `reads`: the server still takes the audio (the
    client pushes freely) or takes nothing (the client's pushes wait for the socket to drain)."""
    # No pongs (pings are answered only by a live reader). It takes audio and pings alike and answers
    # nothing, or takes nothing.
    frozen = FakeServer(autoping=False, answer_flushes=False, then="serve" if reads else "hang")

    async def main():
        async with fake_server(frozen) as url:
            async with RemoteEngine(url, heartbeat_seconds=1.0) as engine:
                stream = await engine.open_stream()
                frame = np.zeros(16000, np.int16)  # 1 s: a stopped reader fills the socket buffers soon

                async def push_until_lost():
                    while True:
                        await stream.push(frame)
                        await asyncio.sleep(0.05)

                with pytest.raises(ConnectionLostError) as pushed:
                    await asyncio.wait_for(push_until_lost(), 20)
                with pytest.raises(ConnectionLostError) as read:
                    await asyncio.wait_for(anext(stream), 5)
                with pytest.raises(ConnectionLostError):
                    await stream.flush()
                return pushed.value, read.value

    pushed, read = asyncio.run(asyncio.wait_for(main(), 60))
    assert pushed.retryable and read.retryable and "lost" in str(read)


@pytest.mark.parametrize("kwargs", [{"heartbeat_seconds": 0}, {"heartbeat_seconds": float("inf")},
                                    {"connect_timeout": float("nan")}, {"connect_timeout": None}])
def test_remote_engine_timeouts_must_be_positive_finite_seconds(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RemoteEngine("ws://127.0.0.1:1", **kwargs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ready", [
    {"type": "ready"},  # no fields: KeyError
    {**READY, "model_sample_rate": 0, "steps": {"first": 1480, "every": 2560}},  # ValueError from the resampler
    {**READY, "sample_rate": "16000", "steps": {"first": 1480, "every": 2560}},  # AudioError, about our own rate
    {**READY, "stream_id": None, "latency_ms": "160"},
])
def test_a_malformed_ready_message_is_a_stream_that_did_not_open(ready):
    """open_stream documents ConnectionLostError for a server that accepts the connection but does not
    open the stream. A ready message without its fields, or with them of the wrong types, raised
    KeyError, ValueError or AudioError instead, and left the connection open."""
    malformed_ready = FakeServer(ready=ready)

    async def main():
        async with fake_server(malformed_ready) as url:
            async with RemoteEngine(url, connect_timeout=5) as engine:
                with pytest.raises(ConnectionLostError) as lost:
                    await engine.open_stream()
                # The client closed its side, before the engine (and its HTTP session) closes.
                await asyncio.wait_for(malformed_ready.connections[0].done.wait(), 10)
                return lost.value

    lost = asyncio.run(asyncio.wait_for(main(), 30))
    assert lost.retryable and "did not open the stream" in str(lost)


@pytest.mark.timeout(60)
def test_numbers_python_cannot_convert_are_unreadable_messages_not_a_lost_connection():
    """A malformed server message is an Error('protocol') event and the stream goes on. Numbers that JSON
    allows but Python cannot convert (an id of 1e999, a time of 1e308 s, whose sample count overflows,
    an integer too large for a float) and nesting deeper than the parser's recursion raised
    OverflowError / RecursionError out of the reader: the stream ended as a lost connection, and the
    events after it were lost."""
    bad = [
        '{"type":"partial","text":"a","stable_text":"a","start":1e308,"end":0}',
        '{"type":"final","text":"a","start":0,"end":1,"words":[],"tokens":[{"id":1e999,"text":"a","start":0,"end":1}]}',
        '{"type":"usage","audio_seconds":' + "9" * 400 + "}",
        "[" * 100_000,
    ]

    usage = {"type": "usage", "audio_seconds": 1.0}
    garbage = FakeServer(script=[m for text in bad for m in (text, usage)], then="close", close_reason="close")

    async def main():
        async with fake_server(garbage) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                return [e async for e in stream]

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert [type(e).__name__ for e in events] == ["Error", "Usage"] * len(bad)
    assert all(e.code == "protocol" for e in events[::2]) and all(e == Usage(1.0) for e in events[1::2])


@pytest.mark.parametrize("keepalive", [True, False])
def test_keepalive_holds_a_paused_stream_open_across_the_idle_timeout(model, audio_clips, keepalive):
    """A caller whose input pauses (a muted microphone) sends nothing; the server ends such a stream at
    its idle timeout. keepalive=True sends empty frames in the pause, which carry no audio: the Final
    covers exactly the audio pushed. Without it the server's timeout stands (a forgotten stream's slot
    is freed)."""
    first, second = audio_clips["jfk.wav"][: 16000 * 3], audio_clips["61-70968-0000.flac"][: 16000 * 2]
    want = model.transcribe(np.concatenate([first, second]), latency_ms=160)

    async def main(url):
        async with RemoteEngine(url, keepalive=keepalive) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(first)
            await asyncio.sleep(2.5)  # two and a half idle timeouts without audio
            events = []
            try:
                await stream.push(second)
                await stream.flush()
                async for event in stream:
                    events.append(event)
                    if isinstance(event, Final):
                        break
            except ConnectionLostError:
                pass
            await stream.close()
            return events + [e async for e in stream]

    with RunningServer(model, idle_timeout_seconds=1.0) as running:
        events = asyncio.run(main(running.http))
    errors = [e for e in events if isinstance(e, Error)]
    if keepalive:
        assert not errors
        (final,) = [e for e in events if isinstance(e, Final)]
        assert final.text == want.text and final.end == len(first) + len(second)
    else:
        assert [e.code for e in errors] == ["idle_timeout"]


def test_streams_the_server_ended_are_not_kept_by_a_long_lived_remote_engine(model):
    """A RemoteEngine forgot a stream only at its close(): the streams a server ended (its idle timeout,
    a restart, an error) that their caller dropped after reading the end, as a local stream may be
    dropped, stayed in the engine with their sockets' buffers and event queues, one more for every
    stream the process ever had."""
    import gc
    import weakref

    async def cycle(engine, count):
        streams = await asyncio.gather(*(engine.open_stream() for _ in range(count)))
        for stream in streams:
            await stream.push(np.zeros(1600, dtype=np.int16))
        for stream in streams:
            events = [e async for e in stream]  # the server ends the stream at its idle timeout
            assert [e.code for e in events if isinstance(e, Error)] == ["idle_timeout"]
        refs = [weakref.ref(stream) for stream in streams]
        del streams, stream  # dropped without close(), as a local stream may be
        await asyncio.sleep(0.1)
        gc.collect()
        return sum(ref() is not None for ref in refs)

    async def main(url):
        async with RemoteEngine(url) as engine:
            few = await cycle(engine, 2)
            many = await cycle(engine, 8)
            return few, many

    with RunningServer(model, max_streams=8, idle_timeout_seconds=0.5, vad=False) as running:
        few, many = asyncio.run(asyncio.wait_for(main(running.http), 60))
    assert (few, many) == (0, 0), f"{few} of 2 ended streams kept, then {many} of 8"


@pytest.mark.parametrize("keepalive", [True, False])
def test_a_remote_stream_dropped_without_close_frees_its_server_slot(model, audio_clips, keepalive):
    """A local stream dropped without close() gives its slot back when it is garbage-collected. A remote
    one stayed open: its reader task held it, so it was never collected; with keepalive=True its empty
    frames kept the server's slot until RemoteEngine.aclose(), without it the slot waited out the
    server's idle timeout. It is now closed (the protocol's `close`) once collected, as close() would."""
    import gc
    import weakref

    async def main(running):
        async with RemoteEngine(running.http, keepalive=keepalive) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(audio_clips["jfk.wav"][:16000])
            await stream.flush()
            async for event in stream:
                if isinstance(event, Final):
                    break
            ref = weakref.ref(stream)
            del stream, event  # dropped, as a local stream may be
            gc.collect()
            freed = await asyncio.to_thread(running.wait_until, lambda: running.open_streams() == 0, 10.0)
            kept = len(engine._streams)
        return ref() is None, freed, kept

    # An idle timeout far beyond the test's wait: only the client's close can free the slot in time.
    with RunningServer(model, idle_timeout_seconds=120.0) as running:
        collected, freed, kept = asyncio.run(main(running))
        assert running.wait_until(lambda: running.metric('monosemantic_streams_closed_total{reason="client_close"}') == 1)
    assert collected and freed and kept == 0


@pytest.mark.timeout(60)
def test_a_message_type_from_a_newer_server_is_ignored():
    """A server of a later release may add message types within protocol version 1 (docs/protocol.md).
    The client turned each into Error('protocol'), which the adapters take as the end of their stream:
    every call's utterance in progress was split at such a message. Messages of a known type that are
    malformed stay errors."""

    newer = FakeServer(
        script=[{"type": "end_of_turn", "probability": 0.9, "time": 1.0}, {"type": "usage", "audio_seconds": 1.0}, {"type": 7}],
        then="close",
        close_reason="close",
    )

    async def main():
        async with fake_server(newer) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                return [e async for e in stream]

    events = asyncio.run(asyncio.wait_for(main(), 30))
    assert events[0] == Usage(1.0)
    assert [e.code for e in events[1:]] == ["protocol"]  # a type that is not a name is malformed


def test_wait_closed_drops_the_connection_of_a_hung_server_after_its_timeout():
    """A server that hung answers neither the protocol's close nor the closing handshake. wait_closed's
    cut closed the WebSocket, which waits for the server's close frame for aiohttp's 10 s: a 1 s cut took
    11 s. The handshake now gets a second, then the connection is dropped."""

    async def main():
        async with fake_server(FakeServer(then="hang")) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                await stream.close()
                await asyncio.wait_for(stream.wait_closed(0.1), 5)  # (it took 10.1 s)
                return stream._ws.closed

    assert asyncio.run(main())


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_flush_at_a_sample_far_past_the_audio_is_a_plain_flush_as_locally(server, model, audio_clips, coalesce):
    """flush(at=n) with n at or past the end of the audio is a plain flush (docs/engine.md), whatever n:
    a local stream compares integers. A remote stream sent n as seconds, which the protocol refuses past
    10^9 s (the server answered bad_message, did not flush, and the client then waited for a Final that
    never came: close() raised ConnectionLostError, the utterance lost) and which Python cannot make a
    float of past ~10^308 (OverflowError, after counting a Final owed). Such a point is past any audio."""
    audio = audio_clips["jfk.wav"][:16000]
    want = model.transcribe(audio, latency_ms=160).token_ids

    async def main():
        async with RemoteEngine(server.http, coalesce=coalesce) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=16000)
            finals = []
            for at in (16000 * 10**9 + 1, 10**400):
                await stream.push(audio)
                await stream.flush(at=at)
                finals.append(await final_of(stream))
            await stream.close()
            errors = [e async for e in stream if isinstance(e, Error)]
            return finals, errors

    finals, errors = asyncio.run(asyncio.wait_for(main(), 60))
    assert errors == []
    assert [(f.start, f.end) for f in finals] == [(0, 16000), (16000, 32000)]
    assert all([t.id for t in f.tokens] == want for f in finals)


def test_a_flush_at_a_sample_before_the_last_flush_point_keeps_the_servers_step_points():
    """A flush's point never goes before an earlier flush point (the server moves it up to it, an empty
    Final): a flush(at=0) after a flush at 1 s starts the next utterance at 1 s. The client gathers
    pushes up to the server's step points counted from the utterance's start; it counted them from 0
    instead until the Final came back, holding audio past the points where the server could use it
    (later partials). Here the server answers no flush: every step point from 1 s on must be sent."""
    from aiohttp import web

    first, every = 1480, 2560

    async def handler(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({**READY, "steps": {"first": first, "every": every}})
        async for msg in ws:
            if msg.type.name != "BINARY" and '"close"' in msg.data:
                break
        return ws

    async def main():
        async with fake_server(handler) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                sent: list[int] = []
                send = stream._ws.send_bytes

                async def counted(data, *args, **kwargs):
                    sent.append(len(data) // 2)
                    return await send(data, *args, **kwargs)

                stream._ws.send_bytes = counted
                await stream.push(np.zeros(16000, np.int16))
                await stream.flush()
                await stream.flush(at=0)
                pushed, late = 16000, []
                for _ in range(50):
                    await stream.push(np.zeros(320, np.int16))
                    pushed += 320
                    due = 16000 + first + max(0, (pushed - 16000 - first) // every) * every
                    if pushed >= 16000 + first and sum(sent) < due:
                        late.append((pushed, sum(sent), due))
                await stream.close()
                return late

    assert asyncio.run(asyncio.wait_for(main(), 30)) == []
