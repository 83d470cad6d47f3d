"""A real `monosemantic serve` app on 127.0.0.1 (port 0) in a thread with its own event loop, so tests
can drive it with real WebSocket clients from `asyncio.run` and inspect its state."""

from __future__ import annotations

import asyncio
import json
import threading
import http.client

import numpy as np
from aiohttp import web

from monosemantic.events import Final
from monosemantic.server import ServerConfig, create_app
from monosemantic.server.app import STATE, drain_before_cleanup, wait_ready


class RunningServer:
    def __init__(self, model, **config):
        self.config = ServerConfig(**{"heartbeat_seconds": None, **config})
        self.model = model
        self.port = 0
        self.running = False

    def __enter__(self) -> "RunningServer":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app = create_app(self.config, model=self.model)
        self.runner = web.AppRunner(self.app, shutdown_timeout=5)
        self.thread.start()
        self.call(self._start(), timeout=120)
        self.running = True
        return self

    def __exit__(self, *exc) -> None:
        if not self.running:
            return
        self.running = False
        # As `serve` does on SIGTERM: drain while connections still read, then aiohttp's cleanup.
        self.call(drain_before_cleanup(self.runner, self.app[STATE]), timeout=60)
        self.call(self.runner.cleanup(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def restart(self) -> None:
        """Start again on the same port (a server coming back after a crash or a deploy)."""
        self.__exit__()
        self.__enter__()

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]
        await wait_ready(self.app)

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def state(self):
        return self.app[STATE]

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    def get(self, path: str, upgrade: bool = False) -> tuple[int, str]:
        """Status and body of a GET; `upgrade`: as a WebSocket handshake (what a refusal's body answers)."""
        headers = {}
        if upgrade:
            headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode() if resp.status != 101 else ""
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        """The value of one sample line of /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def open_streams(self) -> int:
        """Streams the engine holds (not just sessions): a leaked slot shows here."""
        return self.call(_engine_streams(self.state))

    def wait_until(self, predicate, timeout: float = 10.0) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


async def _engine_streams(state) -> int:
    with state.engine.core.lock:
        return len(state.engine.core.streams)


def pcm16(audio: np.ndarray) -> bytes:
    """Float clips read from 16-bit files -> the exact int16 PCM they came from."""
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


async def send_audio(ws, audio: np.ndarray, frame_ms: int = 20, pause_every: int = 10) -> None:
    data = pcm16(audio)
    step = 16000 * frame_ms // 1000 * 2
    for n, i in enumerate(range(0, len(data), step)):
        await ws.send_bytes(data[i : i + step])
        if n % pause_every == 0:
            await asyncio.sleep(0)  # interleave with other clients, as real-time senders do


async def receive_until(ws, kind: str, timeout: float = 30.0) -> list[dict]:
    """JSON messages up to and including the first of type `kind`."""
    messages = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type.name != "TEXT":
            raise AssertionError(f"connection ended before a {kind!r} message: {msg} after {messages[-3:]}")
        messages.append(json.loads(msg.data))
        if messages[-1]["type"] == kind:
            return messages


def finals(events) -> list[Final]:
    return [e for e in events if isinstance(e, Final)]


def check_still_serves(server: RunningServer, model, audio: np.ndarray, latency_ms: int = 160) -> None:
    """A fresh client gets an exact final, and every slot is free after: the server survived whatever the
    test before did."""
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws, params={"latency_ms": str(latency_ms)}) as ws:
                await ws.receive(timeout=10)
                await send_audio(ws, audio)
                await ws.send_json({"type": "flush"})
                final = (await receive_until(ws, "final"))[-1]
                await ws.send_json({"type": "close"})
                return final

    assert asyncio.run(main())["text"] == model.transcribe(audio, latency_ms=latency_ms).text
    assert server.wait_until(lambda: server.open_streams() == 0 and server.state.open_streams == 0)


class RawClient:
    """A bare WebSocket client on a blocking socket: it reads only when told to, and can vanish without
    a closing handshake. For the faults a well-behaved library client never commits."""

    def __init__(self, port: int, query: str = "", rcvbuf: int | None = None, timeout: float = 10.0):
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(
            (f"GET /v1/stream{'?' + query if query else ''} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: leave the first frames unread in the socket
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = b"\x01\x02\x03\x04"
        n = len(payload)
        if n < 126:
            header = bytes([0x80 | opcode, 0x80 | n])
        elif n < 1 << 16:
            header = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
        body = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
        self.sock.sendall(header + mask + body.tobytes())

    def close(self) -> None:
        self.sock.close()


def with_default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts with SIGINT: a process started in the background
    by a shell without job control (`cmd &` in a script, nohup, some CI runners) inherits SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler, so the child would never see the test's Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
