"""Hostile and malformed input on a real server: clients that leave in the middle of the handshake,
and bursts of bad frames. Each must get its documented answer (or none, when the client is gone),
never a traceback in the server's log, and must leave the server serving everyone else."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct

import pytest

from monosemantic.server.websocket import StreamSocket

from _support.server import RawClient, RunningServer, check_still_serves

pytestmark = pytest.mark.timeout(120)
LATENCY = 160


@pytest.fixture(scope="module")
def server(model):
    # A small outgoing queue, so that a queue that fills is reached in a few messages.
    with RunningServer(model, max_streams=2, max_outgoing_messages=4) as running:
        yield running


def server_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]




def test_a_client_that_leaves_during_the_handshake_is_not_a_server_error(server, model, audio_clips, caplog, monkeypatch):
    """A client that sends its upgrade request and resets the connection before the 101 (a connection
    storm, a client that gave up) left `ws.prepare` raising ClientConnectionResetError out of the handler:
    aiohttp logged "Error handling request" with a traceback for every such client. Here the handler is
    held, deterministically, until the server has seen the reset."""
    transports = []
    can_prepare = StreamSocket.can_prepare

    def remember(self, request):
        transports.append(request.transport)
        return can_prepare(self, request)

    monkeypatch.setattr(StreamSocket, "can_prepare", remember)
    engine = server.state.engine
    open_stream = engine.open_stream

    async def open_after_the_client_left(*args, **kwargs):
        stream = await open_stream(*args, **kwargs)
        for _ in range(1000):  # until the server has seen the reset (10 s at most)
            if transports[-1] is None or transports[-1].is_closing():
                break
            await asyncio.sleep(0.01)
        return stream

    monkeypatch.setattr(engine, "open_stream", open_after_the_client_left)
    opened = server.metric("monosemantic_streams_opened_total")
    caplog.set_level(logging.INFO)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert server.wait_until(lambda: len(transports) == 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, before the server has answered
    assert server.wait_until(lambda: server.open_streams() == 0 and any("GET /v1/stream" in r.getMessage() for r in caplog.records))
    monkeypatch.undo()
    assert server_errors(caplog) == []
    # Never served, so never counted as opened; its slot is free.
    assert server.metric("monosemantic_streams_opened_total") == opened and server.state.open_streams == 0
    check_still_serves(server, model, audio_clips["jfk.wav"])


def _frames(payloads: list[bytes], opcode: int) -> bytes:
    """Client frames (masked, with a zero mask) for one write: they reach the server together."""
    out = b""
    for payload in payloads:
        assert len(payload) < 126
        out += bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload
    return out


def _read_messages(sock, count: int) -> list:
    """`count` server frames: JSON objects for text frames, ("close", code, reason) for a close frame."""
    buf, out = b"", []
    while len(out) < count:
        while True:
            if len(buf) >= 2:
                n, head = buf[1] & 0x7F, 2
                if n == 126:
                    n, head = (int.from_bytes(buf[2:4], "big"), 4) if len(buf) >= 4 else (None, 4)
                elif n == 127:
                    n, head = (int.from_bytes(buf[2:10], "big"), 10) if len(buf) >= 10 else (None, 10)
                if n is not None and len(buf) >= head + n:
                    break
            data = sock.recv(65536)
            if not data:
                return out + [("eof",)]
            buf += data
        opcode, payload, buf = buf[0] & 0x0F, buf[head : head + n], buf[head + n :]
        if opcode == 0x1:
            out.append(json.loads(payload))
        elif opcode == 0x8:
            out.append(("close", int.from_bytes(payload[:2], "big"), payload[2:].decode()))
            return out
    return out


def test_a_burst_of_bad_frames_from_a_client_that_reads_is_not_a_slow_consumer(server, model, audio_clips, caplog):
    """Each bad frame is answered with an error message. The receive loop took a burst of them (frames
    already in the socket's buffer) without ever letting the sender run, so the outgoing queue filled
    from the loop's side alone, and a client that read everything was cut as `slow_consumer` (1008):
    docs/protocol.md says that close means the client did not read its messages."""
    client = RawClient(server.port, f"latency_ms={LATENCY}")
    try:
        assert _read_messages(client.sock, 1)[0]["type"] == "ready"
        burst = 12  # three times the queue's bound
        client.sock.sendall(_frames([b"\x01\x02\x03"] * (burst // 2), 0x2) + _frames([b"not json"] * (burst // 2), 0x1))
        replies = _read_messages(client.sock, burst)
        assert [r["code"] if isinstance(r, dict) else r for r in replies] == ["bad_audio"] * (burst // 2) + ["bad_json"] * (burst // 2)
        assert all(r["fatal"] is False for r in replies)
    finally:
        client.close()
    assert server.wait_until(lambda: server.open_streams() == 0)
    assert server.metric('monosemantic_streams_closed_total{reason="slow_consumer"}') == 0
    assert server_errors(caplog) == []
    check_still_serves(server, model, audio_clips["jfk.wav"])


@pytest.mark.parametrize("frame, code", [
    (_frames([b"\xff\xfe"], 0x1), 1007),  # a text frame that is not UTF-8
    (_frames([b"ab"], 0x3), 1002),  # a reserved opcode
    (_frames([b"ab"], 0x0), 1002),  # a continuation with nothing to continue
])
def test_a_frame_the_websocket_protocol_forbids_closes_with_a_reason(server, model, audio_clips, frame, code):
    """aiohttp fails such a connection itself, as RFC 6455 requires: the close frame came without a
    reason, where docs/protocol.md gives one for every close, and the stream was counted as
    `client_gone`, a client that vanished, where it was a client that broke the protocol."""
    before = server.metric('monosemantic_streams_closed_total{reason="protocol_error"}')
    client = RawClient(server.port, f"latency_ms={LATENCY}")
    try:
        assert _read_messages(client.sock, 1)[0]["type"] == "ready"
        client.sock.sendall(frame)
        assert _read_messages(client.sock, 1) == [("close", code, "protocol_error")]
    finally:
        client.close()
    assert server.wait_until(lambda: server.open_streams() == 0 and server.state.open_streams == 0)
    assert server.metric('monosemantic_streams_closed_total{reason="protocol_error"}') == before + 1
    assert server.metric('monosemantic_stream_errors_total{code="protocol_error"}') >= 1
    check_still_serves(server, model, audio_clips["jfk.wav"])
