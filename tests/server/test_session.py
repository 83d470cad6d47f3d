"""A session's protocol against docs/server.md and docs/protocol.md, through RemoteStream and raw
WebSockets: rapid flushes and closes, a final given up on at close, events equal to the local engine's at
resampled rates, shutting_down at shutdown (heard during the drain, naming the closed point at 44.1 kHz),
and a closed stream refusing any push."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import numpy as np
import pytest

from monosemantic import Engine, EngineConfig, Error, Final
from monosemantic.client import ConnectionLostError, RemoteEngine

from _support.server import RunningServer, pcm16

pytestmark = pytest.mark.timeout(120)
LATENCY = 160


@pytest.fixture(scope="module")
def server(model):
    with RunningServer(model, max_streams=4) as running:
        yield running


async def _messages_until_close(ws, timeout=20.0):
    """The JSON messages up to the end of the connection, and the message that ended it."""
    out = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return out, msg
        out.append(json.loads(msg.data))


def test_rapid_flushes_some_empty_then_close_get_every_final_in_order(server, audio_clips):
    """Utterances of 0..N samples flushed back to back, then `close` (twice) at once: one final per
    flush, in order, each covering exactly the audio sent since the previous flush, all before the 1000
    close; the slot is free after."""
    speech = pcm16(np.concatenate(list(audio_clips.values())))
    lengths = [0, 16000, 0, 0, 7, 24000, 1, 0, 12345]

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws, params={"latency_ms": str(LATENCY)}) as ws:
                await ws.receive(timeout=10)
                at = 0
                for n in lengths:
                    if n:
                        await ws.send_bytes(speech[2 * at : 2 * (at + n)])
                    at += n
                    await ws.send_json({"type": "flush"})
                await ws.send_json({"type": "close"})
                await ws.send_json({"type": "close"})
                messages, last = await _messages_until_close(ws)
                return messages, ws.close_code, last.extra

    messages, code, reason = asyncio.run(asyncio.wait_for(main(), 60))
    finals = [(round(m["start"] * 16000), round(m["end"] * 16000)) for m in messages if m["type"] == "final"]
    ends = np.cumsum(lengths).tolist()
    assert finals == list(zip([0] + ends[:-1], ends))
    assert code == 1000 and reason == "close"
    assert not [m for m in messages if m["type"] == "error"]
    assert server.wait_until(lambda: server.open_streams() == 0)


def test_a_final_given_up_on_at_close_is_not_a_clean_end(model, audio_clips):
    """protocol.md: `close` delivers the finals of earlier flushes "(up to 30 s)"; docs/server.md:
    `close()` on a RemoteStream delivers them, and a final still owed when the connection ends is
    ConnectionLostError ("that utterance is lost"). When the server gives up waiting
    (final_timeout_seconds) it says so, with a fatal `final_timeout` error and close code 1013 (it closed
    with 1000 and no error, and the flushed utterance vanished in silence). The engine is held still, so
    the final cannot come in time."""
    import threading

    speech = audio_clips["jfk.wav"][:32000]
    stall = threading.Event()
    running = RunningServer(model, max_streams=1, final_timeout_seconds=0.2).__enter__()
    try:
        running.state.engine.core.add_tick_hook(lambda plan, elapsed: stall.wait(30))

        async def main():
            async with RemoteEngine(running.http) as engine:
                stream = await engine.open_stream(latency_ms=LATENCY)
                await stream.push(speech)
                await stream.flush()
                await stream.close()
                events = []
                try:
                    async for event in stream:
                        events.append(event)
                except ConnectionLostError as exc:
                    events.append(exc)
                stall.set()
                return events, stream._ws.close_code

        events, code = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        stall.set()
        running.__exit__(None, None, None)
    kinds = [type(e).__name__ for e in events]
    assert not any(isinstance(e, Final) for e in events) and code == 1013, (code, kinds)
    errors = [e for e in events if isinstance(e, Error)]
    assert [e.code for e in errors] == ["final_timeout"] and "did not come within 0.2 s" in errors[0].message


@pytest.mark.parametrize("rate", [8000, 44100])
def test_remote_events_equal_the_local_engines_at_rates_the_server_resamples(server, model, audio_clips, rate):
    """docs/server.md: RemoteStream has the same events as a local EngineStream (times in model-rate
    samples). At 8 and 44.1 kHz, in 20 ms int16 frames: the same VAD events and Final (text, tokens,
    words, start/end) from a RemoteStream (coalescing, through the server's resampler) as from a local
    stream of an engine of the same model."""
    from monosemantic.audio import resample
    from monosemantic.events import Partial, Usage

    clip = audio_clips["jfk.wav"]
    audio = np.concatenate([np.zeros(8000, np.float32), clip, np.zeros(16000, np.float32)])
    x = np.round(np.clip(resample(audio, 16000, rate), -1, 1) * 32767).astype(np.int16)
    frame = rate // 50

    async def run(open_stream):
        stream = await open_stream()
        for i in range(0, len(x), frame):
            await stream.push(x[i : i + frame])
        await stream.flush()
        events = []
        async for event in stream:
            events.append(event)
            if isinstance(event, Final):
                break
        await stream.close()
        events += [e async for e in stream]
        return [e for e in events if not isinstance(e, (Usage, Partial))]

    async def main():
        async with Engine(model, EngineConfig(max_streams=1)) as engine:
            local = await run(lambda: engine.open_stream(latency_ms=LATENCY, sample_rate=rate))
        async with RemoteEngine(server.http) as engine:
            remote = await run(lambda: engine.open_stream(latency_ms=LATENCY, sample_rate=rate))
        return local, remote

    local, remote = asyncio.run(asyncio.wait_for(main(), 60))
    assert any(isinstance(e, Final) and e.text for e in local)
    assert remote == local


def _start_shutdown(running):
    """Begin the server's shutdown (as SIGTERM does: the drain, then aiohttp's runner cleanup) in a
    thread; returns once every session is draining."""
    import threading

    thread = threading.Thread(target=running.__exit__, args=(None, None, None), daemon=True)
    sessions = list(running.state.sessions)
    thread.start()
    assert running.wait_until(lambda: all(s.draining for s in sessions), timeout=10)
    return thread


@contextlib.contextmanager
def stalled_server(model, **config):
    """A server whose engine loop stands still at its next tick until `stall` is set; `shutdown()` begins
    the server's shutdown in a thread, joined on the way out once the engine runs again."""
    import threading

    stall = threading.Event()
    running = RunningServer(model, **config).__enter__()
    threads = []
    try:
        running.state.engine.core.add_tick_hook(lambda plan, elapsed: stall.wait(30))
        yield running, stall, lambda: threads.append(_start_shutdown(running))
    finally:
        stall.set()
        for thread in threads:
            thread.join(30)
        running.__exit__(None, None, None)


def test_audio_sent_during_the_shutdown_is_reported_with_shutting_down(model, audio_clips):
    """docs/server.md, Shutdown: a `shutting_down` message with the same point as `closed` reports audio
    sent during the shutdown. The connections keep reading during the drain (aiohttp's shutdown used to
    discard the frame, and the message never came). The engine is held still so the drain's final comes
    after the frame: the message then follows that final."""
    speech = pcm16(audio_clips["jfk.wav"][:32000])
    with stalled_server(model, max_streams=1) as (running, stall, shutdown):

        async def main():
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(running.ws, params={"latency_ms": str(LATENCY)}) as ws:
                    await ws.receive(timeout=10)
                    await ws.send_bytes(speech)
                    assert await asyncio.to_thread(
                        running.wait_until, lambda: running.metric("monosemantic_audio_received_seconds_total") == 2.0
                    )
                    await asyncio.to_thread(shutdown)
                    await ws.send_bytes(b"\x00\x00" * 1600)  # during the shutdown: not transcribed, reported
                    before = []  # while the engine stands still (the drain's final cannot come yet)
                    deadline = time.monotonic() + 1
                    while not any(m.get("code") == "shutting_down" for m in before):
                        try:
                            msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
                        except asyncio.TimeoutError:
                            break
                        before.append(json.loads(msg.data))
                    stall.set()
                    rest, _ = await _messages_until_close(ws)
                    return before, rest, ws.close_code

        before, rest, code = asyncio.run(asyncio.wait_for(main(), 60))
    messages = before + rest
    closed = messages[-1]
    assert code == 1001 and closed["code"] == "closed" and closed["transcribed_until"] == 2.0
    assert [m["type"] for m in messages if m["type"] == "final"] == ["final"]
    dropped = [m for m in messages if m["type"] == "error" and m["code"] == "shutting_down"]
    assert len(dropped) == 1, [m["type"] + ":" + m.get("code", "") for m in messages]
    # The frame came before the drain's final fixed the point: the message follows that final, then closed.
    order = [m.get("code", m["type"]) for m in messages]
    assert dropped[0]["transcribed_until"] == 2.0 and order.index("final") < order.index("shutting_down") < order.index("closed")


def test_shutting_down_and_closed_name_the_same_point_at_44100_hz(model, audio_clips):
    """docs/server.md, Shutdown: the `closed` message carries `transcribed_until`, and a `shutting_down`
    message the same point. At a rate the server resamples, `shutting_down` used to say received/44100
    while `closed` (and the drain's final) said the
    resampled end / 16000. The frame beyond the point is one that waited behind backpressure (read
    before the shutdown began)."""
    from monosemantic.audio import resample

    rate, frame = 44100, 8821  # 0.2 s frames; no whole number of them is a whole number of 16 kHz samples
    x = resample(np.concatenate(list(audio_clips.values()))[: 16000 * 4], 16000, rate)
    data = np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    with stalled_server(model, max_streams=1, max_buffered_seconds=1.0) as (running, stall, shutdown):

        async def main():
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(running.ws, params={"latency_ms": str(LATENCY), "sample_rate": str(rate)}) as ws:
                    await ws.receive(timeout=10)
                    for i in range(0, 8 * frame * 2, frame * 2):
                        await ws.send_bytes(data[i : i + frame * 2])
                    (session,) = running.state.sessions
                    # a push waits for room in the engine, and a frame behind it was already read
                    assert await asyncio.to_thread(
                        running.wait_until, lambda: session._engine_wait_since is not None and len(session.ws._reader._buffer) > 0
                    )
                    await asyncio.to_thread(shutdown)
                    stall.set()
                    messages, _ = await _messages_until_close(ws)
                    return messages, ws.close_code

        messages, code = asyncio.run(asyncio.wait_for(main(), 60))
    (final,) = [m for m in messages if m["type"] == "final"]
    (dropped,) = [m for m in messages if m["type"] == "error" and m["code"] == "shutting_down"]
    closed = messages[-1]
    assert code == 1001 and closed["code"] == "closed"
    assert closed["transcribed_until"] == final["end"]
    assert dropped["transcribed_until"] == closed["transcribed_until"], (dropped["transcribed_until"], closed["transcribed_until"])





def test_push_to_a_closed_stream_raises_stream_error_whatever_the_audio_as_locally(server, model):
    """docs/server.md: RemoteStream has the same methods as a local EngineStream, and a closed local stream
    refuses every push with StreamError (it checks the stream before the audio). A closed (or lost)
    remote stream does too (it converted the audio first: invalid audio there raised AudioError, "the
    stream stays usable")."""
    bad = [b"\x00\x01\x02", np.array([np.nan], np.float32), np.ones(4, np.int8)]

    async def errors(open_stream):
        stream = await open_stream()
        await stream.close()
        out = []
        for pcm in bad:
            try:
                await stream.push(pcm)
                out.append(None)
            except Exception as exc:
                out.append(type(exc).__name__)
        return out

    async def main():
        async with Engine(model, EngineConfig(max_streams=1)) as engine:
            local = await errors(lambda: engine.open_stream(latency_ms=LATENCY))
        async with RemoteEngine(server.http) as engine:
            remote = await errors(lambda: engine.open_stream(latency_ms=LATENCY))
        return local, remote

    local, remote = asyncio.run(main())
    assert local == ["StreamError"] * len(bad)
    assert remote == local


@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_flush_at_a_time_cuts_the_utterance_there_as_a_local_stream_does(model, audio_clips, rate):
    """docs/protocol.md: `{"type": "flush", "at": seconds}` ends the utterance at that time of the stream.
    Two utterances sent at once (the engine held still meanwhile, so it has encoded none of them), then
    a flush at the first one's end, then a plain flush: the same two Finals as a local stream given the
    same calls, at a rate the server resamples too; at 16 kHz each equals its part transcribed alone.
    The flush's time reaches the server exactly (seconds on the wire, `round(seconds * 16000)` back)."""
    from monosemantic.audio import resample

    a, b = audio_clips["jfk.wav"][:48000], audio_clips["61-70968-0000.flac"][:40000]
    both = np.concatenate([a, b])
    x = np.round(np.clip(resample(both, 16000, rate), -1, 1) * 32767).astype(np.int16)
    cut = len(a) + 1  # a sample the two sides must agree on: not a round number of seconds
    frame = rate // 50

    async def run(stream, until_flushed):
        for i in range(0, len(x), frame):
            await stream.push(x[i : i + frame])
        await stream.flush(at=cut)
        await stream.flush()
        await until_flushed()
        finals = []
        async for event in stream:
            if isinstance(event, Final):
                finals.append(event)
                if len(finals) == 2:
                    break
        await stream.close()
        return finals

    with stalled_server(model, max_streams=1) as (running, stall, _):

        async def main():
            async with Engine(model, EngineConfig(max_streams=1)) as engine:
                hold = __import__("threading").Event()
                engine.core.add_tick_hook(lambda plan, elapsed: hold.wait(30))
                local = await run(await engine.open_stream(latency_ms=LATENCY, sample_rate=rate), lambda: asyncio.to_thread(hold.set))
            async with RemoteEngine(running.http) as remote_engine:
                stream = await remote_engine.open_stream(latency_ms=LATENCY, sample_rate=rate)
                sessions = list(running.state.sessions)

                async def until_flushed():
                    # both flushes reached the engine while it stood still
                    assert await asyncio.to_thread(running.wait_until, lambda: len(sessions[0].pending_flushes) == 2)
                    stall.set()

                remote = await run(stream, until_flushed)
            return local, remote

        local, remote = asyncio.run(asyncio.wait_for(main(), 90))
    assert remote == local
    assert [(f.start, f.end) for f in local][0] == (0, cut)
    if rate == 16000:
        for final, part in zip(local, (both[:cut], both[cut:])):
            assert [t.id for t in final.tokens] == model.transcribe(part, latency_ms=LATENCY).token_ids


@pytest.mark.parametrize("coalesce, stalled, vad", [(True, False, True), (False, False, True), (True, True, True), (True, False, False)])
def test_random_flushes_at_a_time_through_the_server_cover_the_audio_once_as_locally(server, model, audio_clips, coalesce, stalled, vad):
    """RemoteStream.flush(at=...) at every kind of point (0, an earlier flush point, behind the engine,
    inside the audio, at and past its end) among plain flushes, at 16 kHz and at rates the server
    resamples, with the client's coalescing on and off: one Final per flush, in order, covering the
    audio once, each ending at `at` or after it (where the audio ended for a plain flush) and equal to
    its span transcribed alone, as for a local stream (tests/engine/test_scheduler_sequences.py).
    `stalled`: the engine stands still until every flush is sent, so each cut is exact, as a local
    stream's then is: at `at`, or at the previous flush point if `at` lies before it. Without VAD the
    server's engine streams gather pushes too (coalesce.py)."""
    import random

    from _support.cuts import check_cut_finals, drive_with_cuts

    clips = list(audio_clips.values())
    rates = [16000, 44100, 8000]

    async def one(engine, i):
        stream = await engine.open_stream(latency_ms=LATENCY, sample_rate=rates[i])
        audio, flushes = await drive_with_cuts(stream, random.Random(31 * i + coalesce), clips, rates[i], pcm16=True)
        return stream, audio, flushes

    async def main(url, release):
        async with RemoteEngine(url, coalesce=coalesce) as engine:
            driven = await asyncio.gather(*(one(engine, i) for i in range(len(rates))))
            await release()
            results = []
            for stream, audio, flushes in driven:
                await stream.close()
                results.append((audio, flushes, [e async for e in stream if isinstance(e, Final)]))
            return results

    async def nothing():
        pass

    if stalled:
        with stalled_server(model, max_streams=4, max_buffered_seconds=60.0) as (running, stall, _):
            results = asyncio.run(asyncio.wait_for(main(running.http, lambda: asyncio.to_thread(stall.set)), 90))
    elif not vad:
        with RunningServer(model, max_streams=4, vad=False) as running:
            results = asyncio.run(asyncio.wait_for(main(running.http, nothing), 90))
    else:
        results = asyncio.run(asyncio.wait_for(main(server.http, nothing), 90))
    for audio, flushes, finals in results:
        check_cut_finals(model, LATENCY, audio, flushes, finals, exact=stalled)


def test_a_stream_the_engine_ends_just_after_a_flush_at_a_time_is_reported_with_its_error(model, audio_clips, caplog):
    """The engine may end a stream (an error, its shutdown: from its own thread) at any moment, also
    between a flush and the next call into it. A flush with `at` then asked the ended stream how much audio it held, and
    the StreamError that raised escaped the receive loop: "stream handler failed" logged with its
    traceback, as a bug of the server. As for a push or a plain flush, the stream simply ends with the
    engine's error and its close code."""
    from monosemantic import Error as EngineError

    speech = pcm16(audio_clips["jfk.wav"][:32000])
    with RunningServer(model, max_streams=1) as running:

        async def main():
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(running.ws, params={"latency_ms": str(LATENCY)}) as ws:
                    await ws.receive(timeout=10)
                    (session,) = list(running.state.sessions)
                    stream = session.stream
                    flush = stream.flush

                    async def flush_then_the_engine_ends_the_stream(at=None):
                        point = await flush(at)
                        stream._core.close(stream.handle, EngineError("closed", "the engine was shut down"))
                        return point

                    stream.flush = flush_then_the_engine_ends_the_stream
                    await ws.send_bytes(speech)
                    await ws.send_json({"type": "flush", "at": 0.5})
                    messages, _ = await _messages_until_close(ws)
                    return messages, ws.close_code

        messages, code = asyncio.run(asyncio.wait_for(main(), 30))
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["closed"], messages
    assert code == 1001
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
