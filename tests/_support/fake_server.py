"""A fake `monosemantic serve` endpoint on loopback, configurable for the server behaviours (and
misbehaviours) a real server does not show on demand: a handshake held back or refused, a ready message
late, malformed or never sent, a scripted list of messages, a connection cut or closed after so much
audio, flushes never answered, a reader that stops answering.

`FakeServer` records every connection (its `latency_ms`, then the byte count of each audio message and
each flush) and, by default, serves it as a minimal server: it answers each flush with a Final whose text
is "c<connection>:<bytes of audio since the previous flush>" and a client's `close` with a clean close
frame (code 1000). Subclasses refine one connection's behaviour through `after_audio`, `before_final` and
`final_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import WSMsgType, web

# The protocol's first message, as a fake server sends it.
READY = {"type": "ready", "protocol": 1, "stream_id": "x", "latency_ms": 160, "sample_rate": 16000,
         "model_sample_rate": 16000, "latency_modes": [160]}


@contextlib.asynccontextmanager
async def fake_server(handler):
    """A WebSocket endpoint at /v1/stream run by `handler` (a `FakeServer`, or any aiohttp handler) on
    loopback; yields its ws:// URL."""
    app = web.Application()
    app.router.add_get("/v1/stream", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Connection:
    """One connection the fake server took: what it received, and how it ended."""

    n: int
    latency_ms: str | None
    request: Any = None
    ws: web.WebSocketResponse | None = None
    received: list[int | str] = field(default_factory=list)  # audio byte counts, and "flush"
    closed: bool = False  # the client sent `close`
    cut: bool = False  # the server cut it (no close frame)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the server is done with it

    def audio(self) -> int:
        return sum(x for x in self.received if x != "flush")

    def abort(self) -> None:
        """Cut the connection without a close frame (a server process killed, a proxy restarted)."""
        self.cut = True
        self.request.transport.abort()


class FakeServer:
    """An aiohttp handler for `fake_server`; every argument's default is a well-behaved server.

    hold: connection number -> an asyncio.Event holding that connection's handshake back until set
        (never set: a server that never answers).
    refuse: connection numbers refused with HTTP 400 (once their hold is released).
    ready: the first message (None: none is sent); `latency_ms` follows the connection's query unless
        `ready` is given. `ready_delay`: seconds between the upgrade and that message.
    script: messages sent right after `ready` (a dict as JSON, a str as is).
    then: what the connection does next: "serve" (read, record, answer), "close" (a close frame with
        `close_code` and `close_reason`), "abort" (cut), "hang" (neither read nor answer).
    cut_after: connection number -> audio bytes after which it is cut.
    answer_flushes: False: flushes are recorded but get no Final.
    on_close: what a client's `close` gets: "close" (a clean close frame) or "abort" (a cut).
    autoping: False: the server answers no WebSocket ping (a frozen reader).
    """

    def __init__(
        self,
        *,
        hold: dict[int, asyncio.Event] | None = None,
        refuse: tuple[int, ...] = (),
        ready: dict | None = READY,
        ready_delay: float = 0.0,
        script: tuple[dict | str, ...] | list[dict | str] = (),
        then: Literal["serve", "close", "abort", "hang"] = "serve",
        close_code: int = 1000,
        close_reason: str = "",
        cut_after: dict[int, int] | None = None,
        answer_flushes: bool = True,
        on_close: Literal["close", "abort"] = "close",
        autoping: bool = True,
    ):
        self.hold = hold or {}
        self.refuse = refuse
        self.ready = ready
        self._ready_follows_query = ready is READY
        self.ready_delay = ready_delay
        self.script = list(script)
        self.then = then
        self.close_code, self.close_reason = close_code, close_reason
        self.cut_after = cut_after or {}
        self.answer_flushes = answer_flushes
        self.on_close = on_close
        self.autoping = autoping
        self.connections: list[Connection] = []

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        conn = Connection(len(self.connections), request.query.get("latency_ms"), request)
        self.connections.append(conn)
        try:
            return await self._serve(conn)
        finally:
            conn.done.set()

    async def _serve(self, conn: Connection) -> web.StreamResponse:
        if conn.n in self.hold:
            await self.hold[conn.n].wait()
        if conn.n in self.refuse:
            return web.json_response({"error": "unknown latency mode"}, status=400)
        ws = conn.ws = web.WebSocketResponse(autoping=self.autoping)
        await ws.prepare(conn.request)
        if self.ready_delay:
            await asyncio.sleep(self.ready_delay)
        if self.ready is not None:
            ready = self.ready
            if self._ready_follows_query:
                ready = {**ready, "latency_ms": int(conn.latency_ms or 160)}
            await ws.send_json(ready)
        for message in self.script:
            await (ws.send_str(message) if isinstance(message, str) else ws.send_json(message))
        if self.then == "close":
            await ws.close(code=self.close_code, message=self.close_reason.encode())
        elif self.then == "abort":
            conn.abort()
        elif self.then == "hang":
            await asyncio.sleep(3600)  # until the test's server shuts down
        else:
            await self._read(conn, ws)
        return ws

    async def _read(self, conn: Connection, ws: web.WebSocketResponse) -> None:
        pending = 0
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                conn.received.append(len(msg.data))
                pending += len(msg.data)
                if conn.n in self.cut_after and conn.audio() >= self.cut_after[conn.n]:
                    conn.abort()
                else:
                    await self.after_audio(conn, ws)
            elif msg.type is WSMsgType.TEXT:
                kind = json.loads(msg.data)["type"]
                if kind == "flush":
                    conn.received.append("flush")
                    if self.answer_flushes:
                        await self.before_final(conn)
                        text = self.final_text(conn, pending)
                        await ws.send_json({"type": "final", "text": text, "words": [], "start": 0, "end": 0})
                    pending = 0
                elif kind == "close":
                    conn.closed = True
                    if self.on_close == "abort":
                        conn.abort()
                    else:
                        await ws.close(code=1000, message=b"close")
            if conn.cut:
                break

    # ---- for subclasses ------------------------------------------------------------------------------
    async def after_audio(self, conn: Connection, ws: web.WebSocketResponse) -> None:
        """After each audio message (not one that cut the connection)."""

    async def before_final(self, conn: Connection) -> None:
        """Before a flush's Final is sent (wait here to hold it back)."""

    def final_text(self, conn: Connection, pending: int) -> str:
        return f"c{conn.n}:{pending}"

    # ---- for tests -----------------------------------------------------------------------------------
    def audio(self, n: int) -> int:
        """Bytes of audio connection `n` received."""
        return self.connections[n].audio()
