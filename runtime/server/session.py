"""One WebSocket connection <-> one engine stream.

Three coroutines per connection:
- the receive loop (the request handler's own task) pushes audio and acts on control messages; while
  the engine's buffer for the stream is full, `push` waits and the loop stops reading the socket, so
  TCP backpressure reaches the client instead of server memory growing; meanwhile a timer looks at the
  socket, so that a client leaving is still noticed (and its slot freed) while its backlog is unread;
- the pump turns engine events into JSON messages on a bounded outgoing queue;
- the sender writes that queue to the socket. A client that stops reading blocks the sender, the queue
  fills, and the connection is cut ("slow_consumer"), so memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import select
import time

from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import PushTimeoutError, StreamError
from ..events import Error, Final, Usage
from .config import ServerConfig
from .logs import StreamLog
from .metrics import ServerMetrics
from .protocol import Close, Flush, ProtocolError, check_audio, encode, error_message, event_to_message, parse_control

# Close codes by how a stream ends (docs/protocol.md); engine errors map by their code.
_ENGINE_ERROR_CLOSE = {"internal": WSCloseCode.INTERNAL_ERROR, "closed": WSCloseCode.GOING_AWAY}
# While a push or flush waits for room in the engine, the receive loop reads nothing, so it cannot see
# the client leave: the peer's socket is looked at this often instead.
PEER_CHECK_SECONDS = 0.25


class Session:
    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport,
        stream,
        *,
        stream_id: str,
        sample_rate: int,
        model_rate: int,
        config: ServerConfig,
        metrics: ServerMetrics,
    ):
        self.ws = ws
        self.transport = transport
        self.stream = stream
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.model_rate = model_rate
        self.config = config
        self.metrics = metrics
        self.log = StreamLog(stream_id)
        self.out: asyncio.Queue[str] = asyncio.Queue(maxsize=config.max_outgoing_messages)
        self.audio_lock = asyncio.Lock()  # a flush must not land between the pieces of one push
        self.pending_flushes: list[float] = []  # arrival times of flushes whose final has not come yet
        self.finals_done = asyncio.Event()
        self.finals_done.set()
        self.unflushed = 0  # samples received since the last flush (input rate)
        self.received = 0
        self.final_end = 0  # end of the last final sent (model-rate samples): transcribed up to here
        self.draining = False
        self.end_reason: str | None = None
        self.stream_ended = asyncio.Event()
        self._engine_error: Error | None = None
        self._slow = False
        self._told_draining = False
        # A frame came during the shutdown before the drain's final fixed the point transcription ends at:
        # `shutting_down` is sent once it is known (with the same point as `closed`, at any sample rate).
        self._shutdown_point_owed = False
        self._drained = False  # the drain's final came (or its wait ended): final_end is that point
        self._closer: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._pump: asyncio.Task | None = None
        self._receiver: asyncio.Task | None = None  # the receive loop
        self._engine_wait_since: float | None = None  # a push or flush waiting for the engine since then
        self._peer_check: asyncio.TimerHandle | None = None
        self._idle_check: asyncio.TimerHandle | None = None
        self._receiving_since: float | None = None  # loop time the receive loop began waiting for a message
        self._idle_fail: asyncio.Task | None = None
        self._peer_gone = False
        self._client_close_code: int | None = None  # the code of the client's close frame, if it sent one
        self._peer_close: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------
    async def run(self, ready: dict) -> None:
        self._sender = asyncio.create_task(self._send_loop())
        self._queue(encode(ready))
        self._pump = asyncio.create_task(self._pump_loop())
        self.log.info("stream opened", extra={"sample_rate": self.sample_rate, "latency_ms": self.stream.latency_ms})
        self._arm_peer_check()
        self._arm_idle_check(self.config.idle_timeout_seconds)
        self._receiver = asyncio.create_task(self._receive_loop())
        try:
            try:
                await asyncio.wait({self._receiver})
            finally:  # this handler cancelled (the server stopping): the receiver goes with it
                self._receiver.cancel()
            if not self._receiver.cancelled():  # cancelled by _close, which is closing the connection
                self._receiver.result()
        except Exception:
            self.log.exception("stream handler failed")
            self.end_reason = self.end_reason or "internal"
            self._start_close("internal", WSCloseCode.INTERNAL_ERROR, drain=False)
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        if self._peer_check is not None:
            self._peer_check.cancel()
        if self._idle_check is not None:
            self._idle_check.cancel()
        await self.stream.close()  # frees the slot at once when the client vanished mid-utterance
        await self._wait(self._pump, self.config.close_timeout_seconds)
        if self._idle_fail is not None:
            await asyncio.wait({self._idle_fail})  # the close it starts is the one to wait for
        if self._closer is None and not self.ws.closed:
            self._start_close(self.end_reason or "client_gone", WSCloseCode.GOING_AWAY, drain=False)
        if self._closer is not None:
            await self._wait(self._closer, 2 * self.config.close_timeout_seconds + 1)
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        reason = self.end_reason or "client_gone"
        self.metrics.streams_closed.labels(reason).inc()
        extra = {"reason": reason, "audio_seconds": round(self.received / self.sample_rate, 3)}
        if self._client_close_code is not None:
            extra["close_code"] = self._client_close_code
        self.log.info("stream closed", extra=extra)

    @staticmethod
    async def _wait(task: asyncio.Task | None, timeout: float) -> None:
        """Until `task` ends (however it ends), cancelling it after `timeout`."""
        if task is None:
            return
        await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})

    # ---- a client that leaves while the engine is behind ----------------------------------------------
    async def _into_engine(self, call, *args):
        """`call(*args)` (the engine stream's push or flush), marked as waiting for the engine: while it
        waits for room, the peer check below watches the client instead of the receive loop."""
        self._engine_wait_since = time.monotonic()
        try:
            return await call(*args)
        finally:
            self._engine_wait_since = None

    def _arm_peer_check(self) -> None:
        self._peer_check = asyncio.get_running_loop().call_later(PEER_CHECK_SECONDS, self._check_peer)

    def _check_peer(self) -> None:
        """A push blocked by backpressure leaves the socket unread, so the client's departure is not seen
        until its backlog has been read and transcribed (seconds of a slot, for nobody). Look at the
        socket itself; when the peer is gone, close the engine stream: that frees the slot and ends the
        waiting push."""
        since = self._engine_wait_since
        if since is not None and time.monotonic() - since >= PEER_CHECK_SECONDS and self._peer_left():
            self._peer_gone = True
            self.end_reason = self.end_reason or "client_gone"
            self.log.info("client left while its audio waited for the engine: closing the stream")
            self._peer_close = asyncio.ensure_future(self.stream.close())
            return
        self._arm_peer_check()

    def _peer_left(self) -> bool:
        """True once the connection is over: the transport closed (a failed write, an abort), or the
        socket reports a reset or a close in both directions. Not a mere FIN (a half-close): the audio
        before it is still to be read, and the client may still be listening."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            poller = select.poll()
            poller.register(sock.fileno(), 0)  # POLLERR and POLLHUP are reported whatever is asked
            return bool(poller.poll(0))
        except (OSError, ValueError):  # the socket was closed under us
            return True

    # ---- receiving -----------------------------------------------------------------------------------
    def _arm_idle_check(self, delay: float) -> None:
        self._idle_check = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """The idle timeout, as one timer per stream re-armed when it fires, rather than a timeout on each
        receive: that made and cancelled a timer for every audio message (about 9% of the event loop's
        time per message). Only time spent waiting for a message counts; a push waiting for the engine
        is not the client's silence."""
        timeout = self.config.idle_timeout_seconds
        since = self._receiving_since
        waited = 0.0 if since is None else asyncio.get_running_loop().time() - since
        if waited < timeout:
            self._arm_idle_check(timeout - waited)
        elif self._closer is None and self._idle_fail is None:
            self._idle_fail = asyncio.ensure_future(
                self._fail("idle_timeout", f"nothing received for {timeout:g} s", WSCloseCode.POLICY_VIOLATION)
            )

    async def _receive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._receiving_since = loop.time()
            try:
                msg = await self.ws.receive()
            finally:
                self._receiving_since = None
            if msg.type is WSMsgType.BINARY:
                if not await self._audio(msg.data):
                    return
            elif msg.type is WSMsgType.TEXT:
                try:
                    control = parse_control(msg.data)
                except ProtocolError as exc:
                    await self._refuse(exc)
                    continue
                if isinstance(control, Flush):
                    if not await self._flush(control.at_sample(self.model_rate)):
                        return
                elif isinstance(control, Close):
                    await self._close_gracefully()
                    return
            else:  # CLOSE / CLOSING / CLOSED / ERROR: the client left, or we are closing it
                error_code = getattr(msg.data, "code", None) if msg.type is WSMsgType.ERROR else None
                if error_code == WSCloseCode.MESSAGE_TOO_BIG:
                    self.end_reason = self.end_reason or "message_too_large"
                    self.metrics.errors.labels("message_too_large").inc()
                elif error_code in (WSCloseCode.PROTOCOL_ERROR, WSCloseCode.INVALID_TEXT):
                    # aiohttp refused a frame (and closed): a client that broke the protocol, not one gone.
                    self.end_reason = self.end_reason or "protocol_error"
                    self.metrics.errors.labels("protocol_error").inc()
                    self.log.warning("closing stream: %s", msg.data, extra={"code": "protocol_error"})
                elif msg.type is WSMsgType.CLOSE and self.end_reason is None:
                    # The client's close frame: an orderly hang-up, told apart from a connection that
                    # vanished (reset, timeout), which is network trouble for an operator to look at.
                    self.end_reason = "client_hangup"
                    self._client_close_code = msg.data
                self.end_reason = self.end_reason or "client_gone"
                return

    async def _refuse(self, exc: ProtocolError) -> None:
        """Answer a bad frame with its (non-fatal) error. Frames already in the socket's buffer come
        without the loop ever waiting, so the sender gets its turn here: otherwise a burst of bad frames
        filled the outgoing queue from this side alone, and a client that read everything was cut as a
        slow consumer."""
        self._error(exc.code, exc.message)
        await asyncio.sleep(0)

    async def _audio(self, data: bytes) -> bool:
        """Push one binary frame; False when the stream had to end."""
        try:
            check_audio(data)
        except ProtocolError as exc:
            await self._refuse(exc)
            return True
        if not data:
            return True
        async with self.audio_lock:
            if self.draining:
                if not self._told_draining:  # dropped audio is reported, never silent
                    self._told_draining = True
                    if self._drained:
                        self._tell_shutdown_point()
                    else:
                        self._shutdown_point_owed = True
                return True
            try:
                await self._into_engine(self.stream.push, data)
            except PushTimeoutError as exc:
                if self.stream_ended.is_set() or self._closer is not None or self._peer_gone:
                    return False  # the stream is already ending; whoever ended it reports why
                await self._fail("overloaded", str(exc), WSCloseCode.TRY_AGAIN_LATER)
                return False
            except StreamError:
                # The stream is closed: by this session, or by the engine (a failed step), whose error the
                # pump has not read yet; it reports it and closes the connection with its code.
                return False
            samples = len(data) // 2
            self.unflushed += samples
            self.received += samples
        self.metrics.audio_received.inc(samples / self.sample_rate)
        return True

    async def _flush(self, at: int | None = None) -> bool:
        async with self.audio_lock:
            self.pending_flushes.append(time.monotonic())
            self.finals_done.clear()
            try:
                point = await self._into_engine(self.stream.flush, at)
                # (The engine's thread may end the stream by now: asked after the flush, `written` then
                # raises StreamError too.)
                cut_before_the_end = at is not None and point < self.stream.written
            except PushTimeoutError as exc:
                if self.stream_ended.is_set() or self._closer is not None or self._peer_gone:
                    return False
                await self._fail("overloaded", str(exc), WSCloseCode.TRY_AGAIN_LATER)
                return False
            except StreamError:  # closed, as for a push
                return False
            if not cut_before_the_end:
                self.unflushed = 0  # (a cut before the end leaves the audio after it unflushed)
        return True

    async def _close_gracefully(self) -> None:
        """The client's `close`: deliver the finals of flushes it sent, then end with code 1000."""
        try:
            await asyncio.wait_for(self.finals_done.wait(), self.config.final_timeout_seconds)
        except asyncio.TimeoutError:
            # Not a clean end: the audio of those flushes is not transcribed, and the client must hear so.
            owed = len(self.pending_flushes)
            await self._fail(
                "final_timeout",
                f"the final of {owed} flush{'es' if owed > 1 else ''} did not come within {self.config.final_timeout_seconds:g} s "
                f"of the close (the server is overloaded): that audio is not transcribed",
                WSCloseCode.TRY_AGAIN_LATER,
            )
            return
        await self._end_stream()
        self.end_reason = self.end_reason or "client_close"
        self._start_close("close", WSCloseCode.OK, drain=True)

    async def drain(self, timeout: float) -> None:
        """Server shutdown: flush audio not yet flushed, deliver every final, then close (1001)."""
        self.draining = True

        async def finish_utterance():
            async with self.audio_lock:
                needs_flush = self.unflushed > 0 and not self.stream_ended.is_set()
            if needs_flush:
                await self._flush()
            await self.finals_done.wait()

        try:
            await asyncio.wait_for(finish_utterance(), timeout)
        except asyncio.TimeoutError:
            self.log.warning("shutdown: drain timeout reached before the stream's finals")
        self._drained = True
        if self._shutdown_point_owed:
            self._tell_shutdown_point()
        self.end_reason = self.end_reason or "shutdown"
        await self._end_stream()
        if self._engine_error is None:
            # Where transcription ends, exactly: audio still in transit when the shutdown began (in socket
            # buffers behind backpressure, or sent since) is not transcribed, and only the client knows how
            # much it sent. The field lets it compare; the message says it to a person.
            until = self.final_end / self.model_rate
            self._error(
                "closed",
                f"the server is shutting down; this stream is transcribed up to {until:.3f} s (the end of its last final), audio after that is not",
                fatal=True, transcribed_until=until,
            )
        self._start_close("shutdown", WSCloseCode.GOING_AWAY, drain=True)
        await self._wait(self._closer, 2 * self.config.close_timeout_seconds + 1)

    def _tell_shutdown_point(self) -> None:
        # The end of the drain's final, as `closed` will say: in model-rate samples, so that the two agree
        # at rates the engine resamples (received / sample_rate missed the resampler's rounding).
        until = self.final_end / self.model_rate
        self._error(
            "shutting_down",
            f"the server is shutting down: this stream is transcribed up to {until:.3f} s; audio after that is not",
            transcribed_until=until,
        )

    async def _fail(self, code: str, message: str, ws_code: int) -> None:
        """End the stream on a fatal condition: its remaining events, the error, then the close."""
        self.end_reason = self.end_reason or code
        self.log.warning("closing stream: %s", message, extra={"code": code})
        await self._end_stream(Error(code, message))
        self._start_close(code, ws_code, drain=True)

    async def _end_stream(self, error: Error | None = None) -> None:
        """Close the engine stream and let the pump forward what it still had (usage, speech_ended)."""
        await self.stream.close()
        await self._wait(self._pump, self.config.close_timeout_seconds)
        if error is not None and self._engine_error is None:
            self._error(error.code, error.message, fatal=True)

    # ---- sending -------------------------------------------------------------------------------------
    async def _pump_loop(self) -> None:
        async for event in self.stream:
            if isinstance(event, Final):
                self.final_end = event.end
                if self.pending_flushes:
                    self.metrics.final_seconds.observe(time.monotonic() - self.pending_flushes.pop(0))
                if not self.pending_flushes:
                    self.finals_done.set()
            elif isinstance(event, Usage):
                self.metrics.audio_processed.inc(event.audio_seconds)
            elif isinstance(event, Error):
                self._engine_error = event
                self.metrics.errors.labels(event.code).inc()
            if self.out.full():
                # The engine hands a stream a tick's events at once (several ticks' when this loop was
                # busy), and taking them here never waits: let the sender take what is queued before a
                # full queue is read as a client that does not read.
                await asyncio.sleep(0)
            self._queue(encode(event_to_message(event, self.model_rate)))
        self.stream_ended.set()
        self.finals_done.set()  # nothing more will come
        if self._engine_error is not None and not self.draining:
            self.end_reason = self.end_reason or self._engine_error.code
            self.log.warning("engine ended the stream: %s", self._engine_error.message)
            self._start_close(self._engine_error.code, _ENGINE_ERROR_CLOSE.get(self._engine_error.code, WSCloseCode.INTERNAL_ERROR), drain=True)

    def _error(self, code: str, message: str, fatal: bool = False, **fields) -> None:
        self.metrics.errors.labels(code).inc()
        self._queue(encode(error_message(code, message, fatal, **fields)))

    def _queue(self, text: str) -> None:
        if self._slow:
            return
        try:
            self.out.put_nowait(text)
        except asyncio.QueueFull:
            self._slow = True
            self.end_reason = self.end_reason or "slow_consumer"
            self.metrics.errors.labels("slow_consumer").inc()
            self.log.warning("client is not reading its messages: closing", extra={"queued": self.out.qsize()})
            self._start_close("slow_consumer", WSCloseCode.POLICY_VIOLATION, drain=False)

    async def _send_loop(self) -> None:
        while True:
            text = await self.out.get()
            try:
                await self.ws.send_str(text)
            except Exception:  # the connection is gone; the receive loop sees it too
                self.out.task_done()
                return
            self.out.task_done()

    async def _stop_receiving(self) -> None:
        """End the receive loop before a closing handshake. aiohttp's close() with a receive waiting
        hands that receive the close and cuts the connection at once, with the client's audio in flight
        unread: the reset that follows makes the client's side discard what it had not read yet, the
        last final and the close included. Without a receive waiting, close() reads (and drops) the
        client's frames until its close frame, and the client reads everything we sent."""
        receiver = self._receiver
        if receiver is None or receiver.done() or receiver is asyncio.current_task():
            return
        receiver.cancel()
        await asyncio.wait({receiver})

    def _start_close(self, reason: str, code: int, *, drain: bool) -> None:
        if self._closer is None:
            self._closer = asyncio.create_task(self._close(reason, code, drain))

    async def _close(self, reason: str, code: int, drain: bool) -> None:
        timeout = self.config.close_timeout_seconds
        if drain and self._sender is not None and not self._sender.done():
            try:
                await asyncio.wait_for(self.out.join(), timeout)
            except asyncio.TimeoutError:
                drain = False
        if not drain:
            # The client is not reading: it will hardly read a close frame either. Free the engine slot
            # now, give the close frame a moment (a merely slow reader still learns why), then cut.
            timeout = min(timeout, 1.0)
            await self.stream.close()
        if drain:
            await self._stop_receiving()
        try:
            # drain=False: aiohttp's drain waiter is shared with the (blocked) sender; its cancellation
            # must not look like ours.
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120], drain=drain), timeout)
            done = True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():
                raise  # this task itself is being cancelled
            done = False
        except (asyncio.TimeoutError, ConnectionError):
            done = False
        if self._sender is not None and not drain:
            self._sender.cancel()
        if (not done or not drain) and self.transport is not None:
            # A peer that does not read never completes the close, and the bytes queued for it would
            # keep the socket and its buffers alive: cut it.
            self.transport.abort()
