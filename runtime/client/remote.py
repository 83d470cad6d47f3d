"""RemoteEngine / RemoteStream: the EngineStream interface over a `monosemantic serve` connection.

    async with RemoteEngine("ws://127.0.0.1:8080", api_key=...) as engine:
        stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
        await stream.push(pcm)            # int16 bytes, int16 or float32 numpy
        await stream.flush()              # -> a Final covering everything pushed so far
        async for event in stream: ...   # the same monosemantic.events dataclasses, times in samples
        await stream.close()

A background task reads the socket all the time, as the engine's event queue fills whether or not the
caller iterates: a caller that is slow to iterate never looks like a slow consumer to the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import numbers
import os
import time
import weakref
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..audio import as_float32, check_rate, typed_view_as_array
from ..errors import AudioError, StreamError, missing_dependency
from ..event_queue import EventQueue
from ..events import Error, Event, Final
from ..server.protocol import MAX_FLUSH_AT, STREAM_PATH, ProtocolError, message_to_event, timing_from_ready
from ..validate import check_positive_seconds, flush_point
from ..engine.coalesce import Coalescer
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    ServerCapacityError,
    ServerRejectedError,
    ServerUnreachableError,
)

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise missing_dependency("aiohttp", "server", "monosemantic.client") from exc

_log = logging.getLogger("monosemantic.client")

_END = object()
FRAME_BYTES = 64 * 1024  # pushes larger than this go out as several frames, far below the server's limit
_CLEAN_CLOSE = 1000
_GOING_AWAY = 1001
# A keepalive goes after a third of the server's idle timeout without a send: two chances before it
# expires. A server that does not say its timeout has the default's, 60 s.
_KEEPALIVE_SHARE = 1 / 3
_DEFAULT_IDLE_TIMEOUT = 60.0
_CUT_SECONDS = 1.0  # the closing handshake a hung server gets before its connection is dropped
_KEEPALIVE = b""  # an empty binary frame: no audio, and it resets the server's idle timeout


def to_pcm16(pcm) -> bytes:
    """int16 little-endian bytes from bytes (passed through), an int16 array, or float audio in [-1, 1]
    (the protocol carries 16-bit PCM: float samples beyond it, which a local stream takes as they are,
    are clipped). A typed memoryview is read as an array of its dtype, as a local stream reads it.
    AudioError for an odd byte count, NaN/inf, or a dtype/shape that is not mono PCM."""
    pcm = typed_view_as_array(pcm)
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        data = bytes(pcm)
        if len(data) % 2:
            raise AudioError(f"PCM bytes must be 16-bit samples: got an odd byte count ({len(data)})")
        return data
    if isinstance(pcm, np.ndarray) and pcm.dtype == np.int16 and pcm.ndim == 1:
        return pcm.astype("<i2", copy=False).tobytes()
    samples = as_float32(pcm)
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _forget_cancelled_drain(ws) -> None:
    """aiohttp's connection keeps one future for the writers waiting for the socket to drain, and a
    writer cancelled in that wait (a push cancelled under backpressure) cancels the future itself: every
    later send on the connection then raised CancelledError at once until the socket drained, so the
    flush after a cancelled push failed. Forget the cancelled future; the next wait makes a new one.
    (Private attributes of aiohttp 3.x, looked up defensively: without them this does nothing.)"""
    protocol = getattr(getattr(ws, "_writer", None), "protocol", None)
    waiter = getattr(protocol, "_drain_waiter", None)
    if isinstance(waiter, asyncio.Future) and waiter.cancelled():
        protocol._drain_waiter = None


def stream_url(base_url: str) -> str:
    """ws(s)://host:port/v1/stream from a ws://, wss://, http:// or https:// base URL."""
    parts = urlsplit(base_url if "://" in base_url else f"ws://{base_url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}: use ws://, wss://, http:// or https://")
    path = parts.path.rstrip("/")
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class RemoteStream:
    """One stream on a server; the same methods and events as monosemantic.EngineStream."""

    def __init__(self, ws, ready: dict, engine: "RemoteEngine", coalesce: bool = True, keepalive: bool = False):
        self._ws = ws
        self._engine = engine
        self.stream_id: str = ready["stream_id"]
        self.latency_ms: int = ready["latency_ms"]
        self.sample_rate: int = ready["sample_rate"]
        self.model_sample_rate: int = ready["model_sample_rate"]
        # Whether the server reports voice activity; servers before this field always did.
        self.vad: bool = bool(ready.get("vad", True))
        # The server's model, by name (no server paths); None from servers before the field.
        model = ready.get("model")
        self.model: str | None = model if isinstance(model, str) and model else None
        self._events = EventQueue()  # bounded for a reader far behind (event_queue)
        self._closed = False  # close() was called
        self._owed = 0  # flushes sent whose final has not arrived: a close() still waits for them
        self._ended = False
        self._gone: ConnectionLostError | None = None  # set once the connection is over
        # Pushes and flushes one at a time, in call order (as EngineStream): a flush sent between a push's
        # frames would end the utterance in the middle of that push's audio.
        self._lock = asyncio.Lock()
        # Audio a push accepted and has not handed to the socket yet: a push cancelled while the server
        # holds it back leaves the rest here, to go first at the next push or flush (never dropped).
        self._unsent = memoryview(b"")
        # Small pushes gathered until the server can use them (engine/coalesce.py): audio accepted, not
        # yet handed to the socket either. Without the server's StepTiming (an older server) every push
        # goes out as it comes.
        timing = timing_from_ready(ready) if coalesce else None
        self._coalescer = Coalescer(timing, self.sample_rate, self.model_sample_rate) if timing is not None else None
        self._held = bytearray()
        loop = asyncio.get_running_loop()
        self._last_send = loop.time()
        self._keepalive = None
        # The background tasks hold the stream weakly, as the local engine's callbacks do: a stream its
        # caller drops without close() is collected, and then closed like close() by the finalizer (its
        # server slot freed; with keepalive on it was held until RemoteEngine.aclose()).
        ref = weakref.ref(self)
        self._reader = engine._track(asyncio.create_task(_read(ref, ws, engine)))
        if keepalive:
            idle = ready.get("idle_timeout")
            if not isinstance(idle, (int, float)) or isinstance(idle, bool) or not 0 < idle < float("inf"):
                idle = _DEFAULT_IDLE_TIMEOUT
            self._keepalive = asyncio.create_task(_keep_alive(ref, idle * _KEEPALIVE_SHARE))
        self._finalizer = weakref.finalize(self, _close_dropped, loop, ws, engine)
        self._finalizer.atexit = False

    # ---- sending -------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StreamError("the stream is closed")
        if self._gone is not None:
            raise ConnectionLostError(str(self._gone), self._gone.code)

    async def _send(self, send, payload) -> None:
        try:
            await send(payload)
            self._last_send = asyncio.get_running_loop().time()
        except asyncio.CancelledError:
            _forget_cancelled_drain(self._ws)
            raise
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise ConnectionLostError(f"the connection to the server was lost: {exc}", self._ws.close_code) from None

    async def push(self, pcm) -> None:
        """Send audio (int16 bytes, int16 or float numpy at the stream's sample rate). AudioError for
        invalid audio (the stream stays usable); ConnectionLostError when the connection is gone. Waits
        while the server applies backpressure; if cancelled then, the audio not yet sent goes first at
        the stream's next push or flush (also a push cancelled while an earlier push's audio waited:
        it takes its own behind it). One cancelled before its turn, while another push or flush of the
        stream ran, has taken nothing."""
        self._check_open()  # first, as a local stream: a closed stream says so whatever the audio
        data = to_pcm16(pcm)
        async with self._lock:
            try:
                await self._send_unsent()
            except asyncio.CancelledError:
                # Cancelled while an earlier push's rest waited for the socket, before this push held its
                # own audio: hold it now, behind that rest (it goes at the next push or flush), so that a
                # push cancelled in its turn has always taken its audio, as one cancelled mid-send has.
                self._hold(data)
                raise
            if self._hold(data):
                await self._send_held()
            # A send the socket takes at once never yields to the event loop: a caller pushing in a loop
            # (a file transcribed faster than real time) would starve the reader of this very stream,
            # which then neither read its events nor answered the server's close (a server ending the
            # stream, at shutdown say, then had to cut the connection, and the final and the close were
            # lost with it).
            await asyncio.sleep(0)

    def _hold(self, data: bytes) -> bool:
        """Add a push's audio to the held audio; True when all of it must go now."""
        self._held += data
        coalescer = self._coalescer
        return coalescer is None or coalescer.add(len(data) // 2, time.monotonic()) or len(self._held) >= FRAME_BYTES

    async def _send_held(self) -> None:
        """Hand the held audio to the socket (after any unsent rest of an earlier send)."""
        await self._send_unsent()
        if self._held:
            self._unsent = memoryview(bytes(self._held))
            self._held.clear()
            if self._coalescer is not None:
                self._coalescer.mark_sent()
            await self._send_unsent()

    async def _send_unsent(self) -> None:
        while self._unsent.nbytes:
            self._check_open()
            piece, self._unsent = self._unsent[:FRAME_BYTES], self._unsent[FRAME_BYTES:]
            # An uncompressed frame reaches the transport before send_bytes first awaits (it then waits
            # for the transport to drain): a cancellation there finds the piece already sent.
            await self._send(self._ws.send_bytes, piece)

    async def flush(self, at: int | None = None) -> None:
        """End the utterance: a Final follows, covering all audio pushed before this call; with `at`, the
        audio up to that stream sample, as EngineStream.flush (the server moves the point up past audio
        it has already encoded; the Final's `end` says where it went). Unlike EngineStream.flush it
        returns None: the point is the server's to settle. A server older than `at` flushes at the end
        of the audio sent."""
        at = flush_point(at)
        self._check_open()
        async with self._lock:
            await self._send_held()
            self._check_open()
            self._owed += 1  # before the send: the final may arrive before the send returns
            coalescer = self._coalescer
            # A point past any stream's audio (the protocol's bound) is a plain flush, as locally: sent as
            # seconds the server would refuse it (or Python fail to make a float of it), the Final owed.
            cut = at is not None and at < MAX_FLUSH_AT * self.model_sample_rate and (
                coalescer is None or at < coalescer.written
            )
            if coalescer is not None:
                # The frame reaches the transport before the send first waits: it is sent from here on.
                # A cut never goes before the last flush point (the server moves it up to there at least;
                # where exactly, its Final says): the step points count from there, not from `at`.
                coalescer.cut(max(at, coalescer.utterance_start)) if cut else coalescer.flushed()
            # On the wire, times are seconds of the stream (round(seconds * rate) gives the sample back).
            message = f'{{"type":"flush","at":{at / self.model_sample_rate!r}}}' if cut else '{"type":"flush"}'
            await self._send(self._ws.send_str, message)

    async def close(self) -> None:
        """End the stream: the server still sends the finals of flushes sent before, then the iterator
        ends; audio pushed after the last flush is dropped. If the connection is lost before those
        finals arrive, the iterator raises ConnectionLostError. (A local EngineStream's close is
        immediate and drops a Final not yet sent too; code that must work with both waits for the
        Final.)"""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._held.clear()  # audio after the last flush: dropped, as the server would drop it
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._gone is None and not self._ws.closed:
            try:
                await self._ws.send_str('{"type":"close"}')
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                pass
        self._engine._forget(self)

    async def wait_closed(self, timeout: float = 10.0) -> None:
        """Until the server has closed the connection (after close()); cuts it after `timeout`."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            # A server that did not end the stream in `timeout` hardly answers a closing handshake
            # either, which aiohttp waits 10 s for: the cut got a second, then the connection is dropped
            # (a cancelled close drops it).
            try:
                await asyncio.wait_for(self._ws.close(), _CUT_SECONDS)
            except asyncio.TimeoutError:
                pass
            await asyncio.gather(self._reader, return_exceptions=True)

    # ---- receiving (the reader task runs _read, below) -----------------------------------------------
    def _finish(self, code: int | None, reason: str, fatal_seen: bool) -> None:
        self._finalizer.detach()  # the connection is over: nothing to close when the stream is dropped
        if self._keepalive is not None:
            self._keepalive.cancel()
        code = None if code == 1006 else code
        describe = f"the server closed the stream (code {code}{', ' + reason if reason else ''})" if code else "the connection to the server was lost"
        self._gone = ConnectionLostError(describe, code)
        if fatal_seen or (code in (_CLEAN_CLOSE, None) and self._closed and not self._owed) or (code == _CLEAN_CLOSE and not self._owed):
            # A clean end, or the server already said why. After close() a vanished connection is the
            # expected end too, unless finals were still owed: then their audio is lost, and that is
            # raised below like any lost connection (also after a clean close frame that came without
            # them, from a server that did not say why).
            pass
        elif code == _CLEAN_CLOSE:
            self._events.put_nowait(ConnectionLostError(
                f"{describe} with the final of {self._owed} flush{'es' if self._owed > 1 else ''} still owed: that audio "
                f"was not transcribed", code))
        elif code == _GOING_AWAY:
            self._events.put_nowait(Error("closed", "the server shut down"))
        elif code is not None:
            self._events.put_nowait(Error(reason or f"close_{code}", describe))
        else:
            self._events.put_nowait(self._gone)  # raised by the iterator, after the events before it
        self._events.put_nowait(_END)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        item = await self._events.get()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        if isinstance(item, ConnectionLostError):
            raise item
        return item


async def _read(ref: "weakref.ref[RemoteStream]", ws, engine: "RemoteEngine") -> None:
    """The stream's reader: every server message into its event queue, until the connection ends. It
    holds the stream only while handling a message, never across a wait, so that a stream its caller
    dropped can be collected; after that (its finalizer has sent `close`) it reads on, for nobody, to the
    server's close."""
    fatal_seen = False
    try:
        while True:
            stream = None
            msg = await ws.receive()
            stream = ref()
            if msg.type is aiohttp.WSMsgType.TEXT:
                if stream is None:
                    continue
                fatal = False
                try:
                    data = json.loads(msg.data)
                    if not isinstance(data, dict):
                        raise ProtocolError("bad_message", "server message is not a JSON object")
                    event = message_to_event(data, stream.model_sample_rate)
                    fatal = data.get("type") == "error" and data.get("fatal") is True
                except ProtocolError as exc:
                    if exc.code == "unknown_type" and isinstance(data.get("type"), str):
                        # A later server's addition within protocol version 1: not meant for this client.
                        _log.debug("ignoring a server message of unknown type %r", data["type"])
                        continue
                    event = Error("protocol", f"unreadable message from the server: {exc}")
                except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
                    event = Error("protocol", f"unreadable message from the server: {exc}")
                fatal_seen = fatal_seen or fatal
                if isinstance(event, Final) and stream._owed:
                    stream._owed -= 1
                    if not stream._owed and stream._coalescer is not None:
                        # The last flush's point, as the server put it: a flush(at=...) is moved up past
                        # audio the server had already encoded, which only the server knows.
                        stream._coalescer.cut(event.end)
                if event is not None:
                    stream._events.put_nowait(event)
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                if stream is not None:
                    reason = msg.extra if msg.type is aiohttp.WSMsgType.CLOSE and isinstance(msg.extra, str) else ""
                    stream._finish(ws.close_code, reason, fatal_seen)
                return
    except Exception as exc:  # anything unexpected ends the stream as a lost connection
        stream = ref()
        if stream is not None:
            stream._finish(None, repr(exc), fatal_seen)
    finally:
        if not ws.closed:
            # (after the server's close frame this returns at once; a hung server gets _CUT_SECONDS)
            try:
                await asyncio.wait_for(ws.close(), _CUT_SECONDS)
            except asyncio.TimeoutError:
                pass
        # The connection is over: aclose() has nothing left to close here, and a caller that drops a
        # stream the server ended (without close()) must not leave it in the engine for good.
        stream = ref()
        if stream is not None:
            engine._forget(stream)


async def _keep_alive(ref: "weakref.ref[RemoteStream]", interval: float) -> None:
    """Send an empty frame whenever the stream sent nothing for `interval` seconds: an input that pauses
    (a muted microphone, push-to-talk, an agent's audio input switched off) is not a client gone, and
    without it the server ends the stream at its idle timeout (`idle_timeout`, a fatal error the adapters
    then retry with a reconnect). Audio held for coalescing is not sent by it. Holds the stream only
    between its waits, as the reader does."""
    loop = asyncio.get_running_loop()
    while True:
        stream = ref()
        if stream is None or stream._closed or stream._gone is not None:
            return
        wait = stream._last_send + interval - loop.time()
        if wait > 0:
            stream = None
            await asyncio.sleep(wait)
            continue
        if stream._lock.locked():  # a push or flush is sending (or waiting for the server to take it)
            stream._last_send = loop.time()
            continue
        async with stream._lock:
            try:
                await stream._send(stream._ws.send_bytes, _KEEPALIVE)  # (which notes the send's time)
            except ConnectionLostError:
                return  # the reader reports the end


def _close_dropped(loop: asyncio.AbstractEventLoop, ws, engine: "RemoteEngine") -> None:
    """Finalizer of a stream garbage-collected without close(): close it as close() does, on its loop (a
    finalizer runs wherever the collection happened, another thread included)."""
    try:
        loop.call_soon_threadsafe(engine._send_close, ws)
    except RuntimeError:  # the loop is closed: its connections went with it
        pass


class RemoteEngine:
    """Opens streams on a `monosemantic serve` instance; `open_stream` mirrors Engine.open_stream."""

    def __init__(
        self,
        base_url: str = "ws://127.0.0.1:8080",
        api_key: str | None = None,
        *,
        connect_timeout: float = 10.0,
        heartbeat_seconds: float | None = 10.0,
        session: "aiohttp.ClientSession | None" = None,
        coalesce: bool = True,
        keepalive: bool = False,
    ):
        """`coalesce`: gather a stream's small pushes and send them at the points where the server can
        use them (engine/coalesce.py): the same results, at the same times, in several times fewer
        messages for the server to handle. False: every push is one message (or more), as it comes.
        `heartbeat_seconds`: a connection that brings nothing for this long is pinged, and lost
        (ConnectionLostError, which adapters retry) when no pong comes within half as long. Without it a
        server that stopped answering while the connection stayed open (a frozen process, a network cut
        that sent no reset) left pushes, flushes and reads waiting forever. None: no pings.
        `keepalive`: while a stream sends nothing, send an empty frame every third of the server's idle
        timeout, so that a stream whose input pauses stays open (the adapters turn it on: their streams
        live as long as a call). False: a stream silent for the idle timeout is closed by the server
        with `idle_timeout`. Either way a stream its caller drops without close() is closed, as close()
        does, once it is garbage-collected (its server slot freed)."""
        check_positive_seconds("connect_timeout", connect_timeout)
        if heartbeat_seconds is not None:
            check_positive_seconds("heartbeat_seconds", heartbeat_seconds)
        self.url = stream_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get("MONOSEMANTIC_API_KEY")
        if self.api_key is not None and (
            not isinstance(self.api_key, str) or not self.api_key.isprintable()
        ):
            # It travels in an HTTP header: aiohttp would refuse it only at each connection, with its own
            # ValueError about header characters.
            raise ValueError("api_key must be a string without control characters (it is sent in an HTTP header)")
        self.connect_timeout = connect_timeout
        self.heartbeat_seconds = heartbeat_seconds
        self.coalesce = bool(coalesce)
        self.keepalive = bool(keepalive)
        self._session = session
        self._own_session = session is None
        # Weakly: a stream its caller drops is collected and closed by its finalizer (RemoteStream).
        self._streams: weakref.WeakSet[RemoteStream] = weakref.WeakSet()
        self._tasks: set[asyncio.Task] = set()  # readers, and closes of dropped streams, until they end
        self._closed = False
        # The server's model as its latest stream's `ready` named it: unknown until a stream opens (and
        # None from servers before the field). Adapters label their metrics with it.
        self.model: str | None = None

    def _check_open(self) -> None:
        # As a local Engine once closed: reopening its own HTTP session would leak it unclosed.
        if self._closed:
            raise StreamError("this RemoteEngine is closed: make a new one to open more streams")

    async def __aenter__(self) -> "RemoteEngine":
        self._check_open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> RemoteStream:
        """A new stream on the server. AudioError for a sample rate the local engine refuses too (checked
        before connecting), ServerCapacityError when the server is full, AuthenticationError for a bad
        key, ServerRejectedError for other refusals, ServerUnreachableError when it cannot be reached,
        ConnectionLostError when it accepts the connection but does not open the stream."""
        # The local engine's own check (AudioError), so that either engine refuses the same rates, and a
        # fractional rate is not silently truncated into the URL.
        sample_rate = check_rate(sample_rate)
        self._check_open()
        if self._session is None:
            # Every stream holds its own connection for its whole life: aiohttp's default pool of 100
            # would make the 101st open wait for a free connection until it timed out.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        params = {"sample_rate": str(sample_rate)}
        if latency_ms is not None:
            # As the local engine: 160.0 or "160" is not a mode (int() would turn 160.7 into one).
            if isinstance(latency_ms, bool) or not isinstance(latency_ms, numbers.Integral):
                raise ValueError(f"latency_ms={latency_ms!r} is not a mode: modes are integers of milliseconds")
            params["latency_ms"] = str(int(latency_ms))
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            ws = await asyncio.wait_for(
                self._session.ws_connect(
                    self.url, params=params, headers=headers, autoping=True, heartbeat=self.heartbeat_seconds,
                    compress=0, max_msg_size=64 * 2**20,
                ),
                self.connect_timeout,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise _rejection(exc) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise ServerUnreachableError(f"cannot connect to {self.url}: {str(exc) or type(exc).__name__}") from None
        try:
            msg = await ws.receive(timeout=self.connect_timeout)
        except asyncio.TimeoutError:
            # Upgraded but silent (not a monosemantic server, or one stuck): it would hardly answer a
            # closing handshake either, so that gets a second before the connection is cut.
            try:
                await asyncio.wait_for(ws.close(), _CUT_SECONDS)
            except asyncio.TimeoutError:
                pass
            raise ConnectionLostError(
                f"the server accepted the connection but sent no ready message within {self.connect_timeout:g} s", ws.close_code
            ) from None
        try:
            ready = json.loads(msg.data) if msg.type is aiohttp.WSMsgType.TEXT else None
        except ValueError:
            ready = None
        if not isinstance(ready, dict) or ready.get("type") != "ready" or not _usable_ready(ready):
            await ws.close()
            raise ConnectionLostError(f"the server did not open the stream (first message: {msg.data!r})", ws.close_code)
        stream = RemoteStream(ws, ready, self, coalesce=self.coalesce, keepalive=self.keepalive)
        self._streams.add(stream)
        self.model = stream.model
        return stream

    def _forget(self, stream: RemoteStream) -> None:
        self._streams.discard(stream)

    def _track(self, task: asyncio.Task) -> asyncio.Task:
        """Keep `task` referenced until it ends (the loop holds tasks weakly), for aclose() to wait for."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _send_close(self, ws) -> None:
        """The protocol's `close` for a stream dropped without close(): the server ends it (its slot
        freed), and its reader, still running, reads to the end and closes the connection."""
        if not ws.closed:
            self._track(asyncio.ensure_future(_send_quietly(ws, '{"type":"close"}')))

    async def aclose(self) -> None:
        """Close every open stream, wait for the server to end them, and release the HTTP session. The
        engine opens no more streams after."""
        self._closed = True
        streams = list(self._streams)
        for stream in streams:
            await stream.close()
        await asyncio.gather(*(s.wait_closed() for s in streams), return_exceptions=True)
        del streams
        # Streams dropped without close(): their readers wait for the server's close, as wait_closed()
        # does, then are cut (a reader cancelled closes its connection).
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=10.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


async def _send_quietly(ws, text: str) -> None:
    try:
        await ws.send_str(text)
    except (ConnectionError, aiohttp.ClientError, RuntimeError):
        pass  # the connection is already over: its reader ends with it


def _usable_ready(ready: dict) -> bool:
    """Whether a ready message has the fields a stream is built from, of their types. A malformed one
    (not a monosemantic server, a broken proxy) raised KeyError, TypeError or AudioError out of
    open_stream and left its connection open; it is a stream that did not open."""
    try:
        check_rate(ready.get("sample_rate"))
        check_rate(ready.get("model_sample_rate"))
    except AudioError:
        return False
    latency = ready.get("latency_ms")
    return isinstance(ready.get("stream_id"), str) and isinstance(latency, int) and not isinstance(latency, bool)


def _rejection(exc: "aiohttp.WSServerHandshakeError") -> ServerRejectedError:
    headers = exc.headers or {}
    reason = headers.get("X-Monosemantic-Error")
    retry = headers.get("Retry-After")
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    detail = headers.get("X-Monosemantic-Message")
    message = f"the server refused the stream: HTTP {exc.status}" + (f" ({reason})" if reason else "")
    if detail:
        message += f": {detail}"
    if exc.status == 401:
        return AuthenticationError(message, exc.status, reason, retry_after)
    if reason == "capacity":
        return ServerCapacityError(message, exc.status, reason, retry_after)
    return ServerRejectedError(message, exc.status, reason, retry_after)
