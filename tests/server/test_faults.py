"""Faults on a real server: clients that vanish, never read, or send garbage; every bad input gets a
clear error (or a close with a reason) and the server stays fine for everyone else."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time

import aiohttp
import numpy as np
import pytest

from _support.server import RawClient, RunningServer, check_still_serves, pcm16, receive_until, send_audio

pytestmark = pytest.mark.timeout(240)
LATENCY = 160


@pytest.fixture(scope="module")
def server(model):
    # Small limits, so that the faults are reachable in seconds.
    with RunningServer(
        model, max_streams=4, max_outgoing_messages=4, socket_send_buffer_bytes=8192,
        max_frame_bytes=64 * 1024, idle_timeout_seconds=4.0,
    ) as running:
        yield running




def test_client_vanishing_mid_utterance_frees_its_slot(server, model, audio_clips):
    audio = audio_clips["jfk.wav"]
    clients = [RawClient(server.port, f"latency_ms={LATENCY}") for _ in range(4)]  # every slot
    half = pcm16(audio[: len(audio) // 2])
    for client in clients:
        for i in range(0, len(half), 32000):
            client.send(half[i : i + 32000])
    assert server.wait_until(lambda: server.open_streams() == 4)
    for client in clients:
        client.close()  # no closing handshake, mid-utterance
    assert server.wait_until(lambda: server.open_streams() == 0, timeout=10)
    assert server.metric('monosemantic_streams_closed_total{reason="client_gone"}') >= 4
    check_still_serves(server, model, audio)


def test_a_websocket_close_frame_is_a_hangup_not_a_client_gone(server, model, audio_clips):
    """A client that ends with a WebSocket close frame (an orderly hang-up, without the protocol's
    `close`) was counted as `client_gone`, as a reset or a vanished peer: an operator could not tell
    clean hang-ups from network trouble."""
    gone_before = server.metric('monosemantic_streams_closed_total{reason="client_gone"}')
    hangup_before = server.metric('monosemantic_streams_closed_total{reason="client_hangup"}')

    async def main():
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(server.ws, params={"latency_ms": str(LATENCY)})
            await ws.receive(timeout=10)  # ready
            await send_audio(ws, audio_clips["jfk.wav"][:16000])
            await ws.close(code=1000)  # mid-utterance, without {"type": "close"}
            return ws.close_code

    assert asyncio.run(main()) == 1000
    assert server.wait_until(lambda: server.open_streams() == 0 and server.state.open_streams == 0)
    assert server.metric('monosemantic_streams_closed_total{reason="client_hangup"}') == hangup_before + 1
    assert server.metric('monosemantic_streams_closed_total{reason="client_gone"}') == gone_before


def test_a_client_that_never_reads_is_cut_with_a_reason(server, model, audio_clips):
    speech = pcm16(np.concatenate(list(audio_clips.values())))
    client = RawClient(server.port, "latency_ms=80", rcvbuf=4096, timeout=5)
    sent, deadline = 0, time.monotonic() + 90
    try:
        while time.monotonic() < deadline and not server.metric('monosemantic_streams_closed_total{reason="slow_consumer"}'):
            for i in range(0, len(speech), 32000):
                client.send(speech[i : i + 32000])
                sent += 32000
    except OSError:
        pass  # the server cut the connection
    client.close()
    assert server.wait_until(lambda: server.metric('monosemantic_streams_closed_total{reason="slow_consumer"}') == 1)
    # The per-connection queue never exceeded its bound, and the slot is free.
    assert server.wait_until(lambda: server.open_streams() == 0)
    assert server.metric('monosemantic_stream_errors_total{code="slow_consumer"}') == 1
    check_still_serves(server, model, audio_clips["jfk.wav"])


def test_malformed_messages_get_errors_and_the_stream_stays_exact(server, model, audio_clips):
    audio = audio_clips["61-70968-0000.flac"]

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws, params={"latency_ms": str(LATENCY)}) as ws:
                await ws.receive(timeout=10)
                replies = []
                for bad in ("not json", "[1, 2]", '{"type": 5}', '{"type": "explode"}', '{"no": "type"}', "{" * 100000):
                    await ws.send_str(bad[:60000])
                    replies.append((await receive_until(ws, "error"))[-1])
                await ws.send_bytes(b"\x01\x02\x03")  # odd byte count: rejected whole, reported
                replies.append((await receive_until(ws, "error"))[-1])
                await send_audio(ws, audio)
                await ws.send_json({"type": "flush"})
                final = (await receive_until(ws, "final"))[-1]
                return replies, final

    replies, final = asyncio.run(main())
    assert [r["code"] for r in replies] == ["bad_json", "bad_json", "bad_message", "unknown_type", "bad_message", "bad_json", "bad_audio"]
    assert all(r["message"] and r["fatal"] is False for r in replies)
    assert final["text"] == model.transcribe(audio, latency_ms=LATENCY).text and final["end"] * 16000 == len(audio)


def test_a_frame_of_the_limit_is_taken_and_a_larger_one_closes_with_1009(server, model, audio_clips):
    """--max-frame-bytes is the largest message accepted, itself included (RemoteStream sends 64 KiB
    frames); one byte pair more closes with 1009 and the error code as the close reason."""
    limit = server.config.max_frame_bytes

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws) as ws:
                await ws.receive(timeout=10)
                await ws.send_bytes(b"\x00" * limit)
                await ws.send_json({"type": "flush"})
                final = (await receive_until(ws, "final"))[-1]
                await ws.send_bytes(b"\x00" * (limit + 2))
                while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
                    pass  # the usage/speech messages of the first frame
                return final, msg, ws.close_code

    final, msg, code = asyncio.run(main())
    assert final["end"] * 16000 == limit // 2
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and code == 1009
    assert msg.extra == "message_too_large"
    assert server.wait_until(lambda: server.open_streams() == 0)
    assert server.metric('monosemantic_streams_closed_total{reason="message_too_large"}') == 1
    check_still_serves(server, model, audio_clips["jfk.wav"])


def test_a_client_leaving_while_its_audio_waits_for_the_engine_frees_its_slot_at_once(model, audio_clips):
    """The engine stalls (a tick hook that blocks), so the client's audio backs up: the stream's buffer
    fills, the push waits, the socket is no longer read. The client then vanishes (RST). Without looking
    at the socket itself, the server would notice only once the backlog was read, i.e. after the stall
    or the push timeout; it must close the engine stream (free the slot) promptly."""
    speech = pcm16(np.concatenate(list(audio_clips.values())))
    stall = threading.Event()

    def stall_engine(plan, elapsed) -> None:  # engine thread, outside the core's lock
        stall.wait(60)

    with RunningServer(model, max_streams=1, max_buffered_seconds=1.0, push_timeout_seconds=120.0) as running:
        running.state.engine.core.add_tick_hook(stall_engine)
        try:
            client = RawClient(running.port, f"latency_ms={LATENCY}", timeout=0.5)
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    for i in range(0, len(speech), 32000):
                        client.send(speech[i : i + 32000])
            except socket.timeout:
                pass  # nothing read any more: the kernel's buffers are full
            assert running.wait_until(lambda: running.open_streams() == 1)
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST: gone, with seconds of its audio still unread in the server's socket
            assert running.wait_until(lambda: running.open_streams() == 0, timeout=5)
            assert running.wait_until(lambda: running.state.open_streams == 0, timeout=5)  # the session ended too
        finally:
            stall.set()
            running.state.engine.core.remove_tick_hook(stall_engine)
        assert running.metric('monosemantic_streams_closed_total{reason="client_gone"}') == 1
        check_still_serves(running, model, audio_clips["jfk.wav"])


def test_an_idle_connection_is_closed_with_a_reason(server):
    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws) as ws:
                ready = json.loads((await ws.receive(timeout=10)).data)
                started = time.monotonic()
                messages = []
                async for msg in ws:
                    messages.append(json.loads(msg.data))
                return ready, messages, ws.close_code, time.monotonic() - started

    ready, messages, code, waited = asyncio.run(main())
    assert ready["type"] == "ready" and 3.5 < waited < 10
    assert messages[-1]["type"] == "error" and messages[-1]["code"] == "idle_timeout" and messages[-1]["fatal"]
    assert code == 1008


def test_a_stream_the_engine_ends_just_before_a_push_is_counted_by_the_engines_reason(server, model, audio_clips, monkeypatch):
    """The engine fails a stream (Error('internal'), a failed step) on its thread while the receive loop
    is about to push the next frame: the push meets a closed stream before the pump has read the error.
    That is the engine's end, reported by the pump; it was logged and counted as 'overloaded' (a warning
    'closing stream: ... closed', streams_closed{reason="overloaded"}), sending the operator after a
    capacity problem that was not there."""
    from monosemantic.engine.frontdoor import EngineStream
    from monosemantic.events import Error

    real_push, pushes = EngineStream.push, [0]

    async def push_after_the_engine_failed_the_stream(self, pcm):  # the server's loop
        pushes[0] += 1
        if pushes[0] == 3:  # as if the engine thread closed it right now: its events are not read yet
            self._core.close(self.handle, Error("internal", "a step failed (simulated)"))
        await real_push(self, pcm)

    monkeypatch.setattr(EngineStream, "push", push_after_the_engine_failed_the_stream)
    overloaded_before = server.metric('monosemantic_streams_closed_total{reason="overloaded"}')
    internal_before = server.metric('monosemantic_streams_closed_total{reason="internal"}')

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws, params={"latency_ms": str(LATENCY)}) as ws:
                await ws.receive(timeout=10)
                try:
                    await send_audio(ws, audio_clips["jfk.wav"][:16000])
                except ConnectionError:
                    pass
                messages = [json.loads(msg.data) async for msg in ws if msg.type is aiohttp.WSMsgType.TEXT]
                return messages, ws.close_code

    messages, code = asyncio.run(main())
    monkeypatch.undo()
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["internal"] and code == 1011
    assert server.wait_until(lambda: server.open_streams() == 0 and server.state.open_streams == 0)
    assert server.metric('monosemantic_streams_closed_total{reason="internal"}') == internal_before + 1
    assert server.metric('monosemantic_streams_closed_total{reason="overloaded"}') == overloaded_before


def test_a_client_that_reads_is_not_cut_by_a_burst_of_events(model, audio_clips):
    """A tick hands a stream's events to the server in one go (a stream catching up on a backlog gets a
    partial for each of its chunks, and VAD events), and the pump queued them all without letting the
    sender run: past `max_outgoing_messages` the client was cut as `slow_consumer`, although it read
    everything; docs/protocol.md says that close means the client did not read its messages. One message
    of room makes any burst of two such a case."""
    audio = audio_clips["jfk.wav"]

    async def main(running: RunningServer):
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(running.ws, params={"latency_ms": str(LATENCY)}) as ws:
                await ws.receive(timeout=10)
                await ws.send_bytes(pcm16(audio))  # a backlog: the engine steps it as fast as it can
                await ws.send_json({"type": "flush"})
                # The server's event loop busy for a while (other connections' work, a slow machine):
                # the engine's events of several ticks meanwhile reach the stream in one hand-off.
                for _ in range(3):
                    await asyncio.sleep(0.2)
                    running.loop.call_soon_threadsafe(time.sleep, 0.5)
                messages = await receive_until(ws, "final")
                await ws.send_json({"type": "close"})
                return messages

    with RunningServer(model, max_streams=2, max_outgoing_messages=1) as running:
        messages = asyncio.run(main(running))
        assert [m for m in messages if m["type"] == "error"] == []
        assert messages[-1]["text"] == model.transcribe(audio, latency_ms=LATENCY).text
        assert sum(m["type"] == "partial" for m in messages) > 1
        assert running.metric('monosemantic_streams_closed_total{reason="slow_consumer"}') == 0
