"""The aiohttp application: routes, admission before the WebSocket upgrade, start-up (load, warm up)
and graceful shutdown (drain).

    app = create_app(ServerConfig(model="nvidia/..."))     # or create_app(config, model=loaded_model)
    web.run_app(app)  # or `await serve(config)`, which is what `monosemantic serve` runs
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import uuid

import numpy as np
from aiohttp import web

from ..errors import AudioError, CapacityError, MonosemanticError, StreamError
from ..events import Final
from .auth import authorized
from .config import ServerConfig
from .logs import AccessLogger
from .metrics import ServerMetrics
from .protocol import STREAM_PATH, ProtocolError, parse_stream_params, ready_message
from .session import Session
from .websocket import StreamSocket

log = logging.getLogger("monosemantic.server")


class ServerState:
    """What the handlers share: the engine, readiness, open sessions, metrics."""

    def __init__(self, config: ServerConfig, model=None):
        self.config = config
        self.model = model
        self.model_name: str | None = None  # what `ready` calls the model (public_model_name)
        self.engine = None
        self.metrics = ServerMetrics()
        self.ready = False
        self.draining = False
        self.failed: BaseException | None = None
        self.failed_event = asyncio.Event()
        self.sessions: set[Session] = set()
        self._tasks: list[asyncio.Task] = []
        self._drain: asyncio.Future | None = None
        # The gauge reads the same count as /readyz and the capacity check, when scraped.
        self.metrics.open_streams.set_function(lambda: self.open_streams)

    @property
    def open_streams(self) -> int:
        """Engine slots in use: what refuses the next connection. (A session keeps going while its
        connection's close handshake runs, after its slot is free, and an upgrade holds a slot before its
        session exists: counting sessions, /readyz said `capacity` for up to the close timeout after a
        slot was freed, and `ready` while every slot was taken.)"""
        return len(self.engine.core.streams) if self.engine is not None else 0

    # ---- start-up ------------------------------------------------------------------------------------
    async def on_startup(self, app: web.Application) -> None:
        # Loading runs in the background so /healthz answers at once and /readyz tells the truth.
        self._tasks.append(asyncio.create_task(self._prepare()))
        self._tasks.append(asyncio.create_task(self._sample_lag()))

    async def _prepare(self) -> None:
        from ..asr import load_model
        from ..engine.frontdoor import Engine

        try:
            if self.model is None:
                log.info("loading model %s", self.config.model)
                self.model = await asyncio.to_thread(
                    load_model, self.config.model, device=self.config.device, dtype=self.config.dtype
                )
            # Named while the checkpoint is where it was loaded from: whether it is a local path decides.
            self.model_name = public_model_name(getattr(self.model, "source", None) or self.config.model)
            engine = Engine(self.model, self.config.engine_config(self.model))
            engine.core.add_tick_hook(self.metrics.on_tick)
            await asyncio.to_thread(engine.core.start)  # captures CUDA graphs on GPU
            self.engine = engine
            await self._warm_up()
            self.ready = True
            log.info("ready: %s, %d streams, thread switch interval %g ms", self.model, self.config.max_streams,
                     sys.getswitchinterval() * 1000)
        except Exception as exc:
            log.error("start-up failed: %s", exc)
            self.failed = exc
            self.failed_event.set()

    async def _warm_up(self) -> None:
        """One short utterance through the whole path, so the first client does not pay for lazy
        initialisation."""
        stream = await self.engine.open_stream()
        noise = np.random.default_rng(0).standard_normal(self.model.sample_rate).astype(np.float32) * 0.01
        await stream.push(noise)
        await stream.flush()
        async for event in stream:
            if isinstance(event, Final):
                break
        await stream.close()

    async def _sample_lag(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.engine is None:
                continue
            lags = [self.engine.core.buffered_seconds(s.stream.handle) for s in list(self.sessions)]
            for lag in lags:
                self.metrics.buffered.observe(lag)
            self.metrics.buffered_max.set(max(lags, default=0.0))

    # ---- shutdown ------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Stop admitting, then let every open stream receive the finals of the audio it sent (once,
        whoever asks first: `serve` before aiohttp's cleanup, or the app's on_shutdown)."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_sessions())
        await self._drain

    async def _drain_sessions(self) -> None:
        self.draining = True
        sessions = list(self.sessions)
        if sessions:
            log.info("draining %d streams (timeout %g s)", len(sessions), self.config.drain_timeout_seconds)
            await asyncio.gather(*(s.drain(self.config.drain_timeout_seconds) for s in sessions), return_exceptions=True)

    async def on_shutdown(self, app: web.Application) -> None:
        # Under web.run_app or an AppRunner's cleanup this runs after aiohttp has marked every connection
        # as closing, and from then on aiohttp drops what clients send (flushes, closes, the audio that
        # `shutting_down` reports). `serve` drains before that; see drain_before_cleanup.
        await self.drain()

    async def on_cleanup(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.engine is not None:
            await self.engine.aclose()


STATE = web.AppKey("monosemantic_state", ServerState)


def public_model_name(source: str) -> str | None:
    """The model's name for clients: a Hugging Face id as given; a local file or directory by its final
    path component, as the server's directory layout (user names, mount points) is not the clients'
    business. None when there is no such component (a checkpoint at '/')."""
    if not source:
        return None
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        return source  # not a local path: the model loaded, so this is a repo id
    # abspath, not realpath: a symlink's own name is the one the operator chose (`current.nemo`).
    return os.path.basename(os.path.abspath(path)) or None


# Retry-After (seconds) of a 503, by its reason (the stream endpoint's and /readyz's names). A slot frees
# as soon as any stream ends, so a full server is worth asking again soon. A model load takes seconds to
# minutes: asking every second through it only loads the server, and 5 s delays a client at most that
# long once it is ready. A failed or draining server will not serve: no hint, go elsewhere.
RETRY_AFTER_SECONDS = {"capacity": 1, "not_ready": 5, "loading": 5}


def _reject(state: ServerState, status: int, reason: str, message: str, **extra) -> web.Response:
    """A refusal before the upgrade: JSON body {"error": reason, "message": ...}; both are also in the
    X-Monosemantic-Error / X-Monosemantic-Message headers, which WebSocket client libraries expose when
    they do not expose the body."""
    state.metrics.rejected.labels(reason).inc()
    # Header values must be single-line latin-1: keep the message to printable ASCII.
    header_message = "".join(c if " " <= c <= "~" else "?" for c in message)[:300]
    headers = {"X-Monosemantic-Error": reason, "X-Monosemantic-Message": header_message}
    retry_after = RETRY_AFTER_SECONDS.get(reason) if state.failed is None else None  # failed: never ready
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.json_response({"error": reason, "message": message, **extra}, status=status, headers=headers)


async def _stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    if not authorized(config.api_key, request.headers, request.query):
        return _reject(state, 401, "unauthorized", "missing or wrong API key (Authorization: Bearer <key> or ?token=<key>)")
    if state.draining:
        return _reject(state, 503, "draining", "the server is shutting down; connect to another instance")
    if not state.ready:
        return _reject(state, 503, "not_ready", "the model is still loading" if state.failed is None else "the server failed to start")
    try:
        params = parse_stream_params(request.query)
    except ProtocolError as exc:
        return _reject(state, 400, "bad_request", exc.message)
    ws = StreamSocket(
        max_frame_bytes=config.max_frame_bytes,
        heartbeat=config.heartbeat_seconds,
        timeout=config.close_timeout_seconds,
        compress=False,  # PCM does not deflate; compression would only cost CPU
    )
    if not ws.can_prepare(request).ok:
        return _reject(state, 400, "bad_request", f"{STREAM_PATH} is a WebSocket endpoint: send an upgrade request")
    try:
        stream = await state.engine.open_stream(latency_ms=params.latency_ms, sample_rate=params.sample_rate)
    except CapacityError:
        return _reject(
            state, 503, "capacity", f"all {config.max_streams} streams are in use; retry later or connect elsewhere",
            max_streams=config.max_streams, open_streams=state.open_streams,
        )
    except (ValueError, AudioError, StreamError) as exc:
        return _reject(state, 400, "bad_request", str(exc))
    stream_id = uuid.uuid4().hex[:16]
    session = Session(
        ws, request.transport, stream, stream_id=stream_id, sample_rate=params.sample_rate,
        model_rate=state.model.sample_rate, config=config, metrics=state.metrics,
    )
    if config.socket_send_buffer_bytes is not None and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.socket_send_buffer_bytes)
    try:
        await ws.prepare(request)
    except ConnectionError:
        # The client left before the upgrade was answered (it gave up, a connection storm): nobody to
        # serve, and no server error to log. aiohttp writes this response nowhere, quietly; the access log
        # shows 499, as nginx logs a client that closed its request.
        await stream.close()
        return web.Response(status=499)
    except BaseException:
        await stream.close()
        raise
    state.sessions.add(session)
    state.metrics.streams_opened.inc()
    try:
        ready = ready_message(
            stream_id, stream.latency_ms, params.sample_rate, state.model.sample_rate, state.model.latency_modes,
            vad=stream.vad, timing=stream.timing, idle_timeout=config.idle_timeout_seconds, model=state.model_name,
        )
        await session.run(ready)
    finally:
        state.sessions.discard(session)
    return ws


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.failed is not None:
        return web.json_response({"alive": False, "error": str(state.failed)}, status=500)
    return web.json_response({"alive": True})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = {"open_streams": state.open_streams, "max_streams": state.config.max_streams}
    reason = None
    if state.draining:
        reason = "draining"
    elif state.failed is not None:
        reason = "failed"
    elif not state.ready:
        reason = "loading"
    elif state.open_streams >= state.config.max_streams:
        reason = "capacity"
    if reason is not None:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS[reason])} if reason in RETRY_AFTER_SECONDS else None
        return web.json_response({"ready": False, "reason": reason, **body}, status=503, headers=headers)
    return web.json_response({"ready": True, **body})


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def create_app(config: ServerConfig, model=None) -> web.Application:
    """The server as an aiohttp Application. `model`: an already loaded ASRModel (tests, embedding);
    otherwise `config.model` is loaded in the background at start-up."""
    app = web.Application()
    state = ServerState(config, model)
    app[STATE] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get(STREAM_PATH, _stream)
    app.on_startup.append(state.on_startup)
    app.on_shutdown.append(state.on_shutdown)
    app.on_cleanup.append(state.on_cleanup)
    return app


async def drain_before_cleanup(runner: web.AppRunner, state: ServerState) -> None:
    """Stop listening, then drain the open streams while their connections still read what clients
    send. (AppRunner.cleanup runs on_shutdown only after marking every connection as closing, and
    aiohttp then discards incoming data: a client's flush or close during the drain, and the audio that
    `shutting_down` reports, would be lost.) Call it before `runner.cleanup()` when embedding the app."""
    for site in list(runner.sites):
        await site.stop()
    await state.drain()


async def wait_ready(app: web.Application, timeout: float = 300.0) -> None:
    """Until the app's model is loaded and warmed; raises what start-up raised."""
    state = app[STATE]
    deadline = asyncio.get_running_loop().time() + timeout
    while not state.ready:
        if state.failed is not None:
            raise state.failed
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the server did not become ready in time")
        await asyncio.sleep(0.02)


async def serve(config: ServerConfig, model=None) -> int:
    """Run until SIGTERM/SIGINT, then drain and return 0 (what `monosemantic serve` runs)."""
    previous = sys.getswitchinterval()
    if config.switch_interval_ms is not None:
        sys.setswitchinterval(config.switch_interval_ms / 1000)
    try:
        return await _serve(config, model)
    finally:
        sys.setswitchinterval(previous)


async def _serve(config: ServerConfig, model) -> int:
    app = create_app(config, model)
    state = app[STATE]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=config.drain_timeout_seconds + 2 * config.close_timeout_seconds + 5,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MonosemanticError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
    host, port = runner.addresses[0][:2]
    print(f"monosemantic serve: listening on http://{host}:{port} (WebSocket {STREAM_PATH})", file=sys.stdout, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(state.failed_event.wait())
    await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    log.info("shutting down")
    await drain_before_cleanup(runner, state)
    await runner.cleanup()
    if state.failed is not None:
        raise state.failed
    return 0
