"""Server configuration. Imports nothing heavy, so the CLI can build it before aiohttp is needed."""

from __future__ import annotations

from dataclasses import dataclass

from ..validate import check_positive_seconds, finite_real


@dataclass(frozen=True)
class ServerConfig:
    """How `monosemantic serve` listens, admits and bounds its clients. The engine itself (batching,
    VAD) is configured by an EngineConfig built from these fields plus its own defaults."""

    model: str = ""
    """Model source (Hugging Face repo id, .nemo file or checkpoint directory). Ignored when the app is
    given an already loaded model."""

    device: str = "auto"
    """Device for the model: auto (CUDA if available), cpu, cuda or cuda:N."""

    dtype: str = "auto"
    """Encoder precision: auto, float32, bfloat16, float16."""

    host: str = "127.0.0.1"
    """Interface to bind. Loopback by default: exposing the server is an explicit choice."""

    port: int = 8080
    """TCP port; 0 picks a free one (the chosen port is logged)."""

    api_key: str | None = None
    """When set, /v1/stream needs `Authorization: Bearer <key>` or `?token=<key>`; otherwise 401 before
    the WebSocket upgrade. /healthz, /readyz and /metrics stay open (put them behind your network
    policy). Printable characters without leading or trailing whitespace (what a header can carry)."""

    max_streams: int = 64
    """Streams served at once; one more connection is refused before the upgrade (503, reason
    "capacity")."""

    max_batch: int = 64
    """Most streams of one latency mode stepped together (EngineConfig.max_batch)."""

    default_latency_ms: int | None = None
    """Latency mode of connections that do not ask for one (None: the checkpoint's default)."""

    vad: bool = True
    """Run voice activity detection (speech_started / speech_ended messages)."""

    max_frame_bytes: int = 1 << 20
    """Largest WebSocket message accepted (aiohttp max_msg_size). A bigger one closes the connection
    with code 1009. 1 MiB is 32 s of 16 kHz PCM: generous for 20-100 ms frames."""

    max_buffered_seconds: float = 10.0
    """Audio one stream may have sent but the engine not yet processed. While it is full the server stops
    reading that socket (TCP backpressure reaches the client)."""

    push_timeout_seconds: float = 30.0
    """How long the engine may stay too far behind a stream before it is closed (error "overloaded")."""

    max_outgoing_messages: int = 1000
    """Messages queued for one client that has not read them yet. A client that stops reading fills it
    and is disconnected (close code 1008, reason "slow_consumer"), so it cannot grow server memory."""

    socket_send_buffer_bytes: int | None = None
    """SO_SNDBUF of each stream's socket (None: the OS default, which Linux grows up to several MB per
    connection). Bytes the kernel holds for a client that does not read come on top of the outgoing
    queue; a small value bounds them and detects such a client sooner."""

    idle_timeout_seconds: float = 60.0
    """A connection that sends nothing (no audio, no message) for this long is closed ("idle_timeout").
    Voice clients send audio continuously, silence included."""

    heartbeat_seconds: float | None = 30.0
    """WebSocket ping interval; a peer that does not answer is dropped (half-open TCP). None: off."""

    close_timeout_seconds: float = 5.0
    """How long a closing handshake (and the delivery of the last messages) may take before the
    connection is cut."""

    final_timeout_seconds: float = 30.0
    """How long a `close` message waits for the finals of flushes sent before it."""

    drain_timeout_seconds: float = 30.0
    """On SIGTERM/SIGINT: how long open streams get to receive the finals of their audio before the
    server closes them anyway and exits."""

    usage_interval_seconds: float = 5.0
    """A usage message follows every this many seconds of a stream's processed audio (and one at close)."""

    switch_interval_ms: float | None = None
    """Python's thread switch interval while `serve` runs (`sys.setswitchinterval`; None: Python's 5 ms).
    The event loop (every message and event) and the engine's loop thread share one interpreter, and a
    thread that let go of the GIL (a socket call, a numpy copy) waits up to this long to get it back from
    one running Python. With a thread busy in Python half the time beside it, 0.5 ms took a CPU server's
    partial lag p95 from 142-170 to 106-120 ms (BENCHMARKS.md, nineteenth session); on a GPU, where the
    engine's loop runs Python between launches, it is not measured yet. Process-wide: `serve` sets it for
    its run and puts the old value back."""

    def __post_init__(self):
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be at least 1024")
        if self.max_outgoing_messages < 1:
            raise ValueError("max_outgoing_messages must be at least 1")
        timeouts = ("idle_timeout_seconds", "close_timeout_seconds", "final_timeout_seconds", "drain_timeout_seconds")
        for name in timeouts + (("heartbeat_seconds",) if self.heartbeat_seconds is not None else ()):
            check_positive_seconds(name, getattr(self, name))
        if self.api_key is not None and not (
            isinstance(self.api_key, str) and self.api_key.isprintable() and self.api_key.strip() == self.api_key != ""
        ):
            # Clients present it in an HTTP header, whose value carries no control character and loses its
            # outer whitespace, or as ?token=, which an empty value does not set: every client got 401.
            # (The key itself stays out of the message, which goes to logs.)
            raise ValueError(
                "api_key must be a non-empty string of printable characters without leading or trailing "
                "whitespace (a trailing newline from a secret file?): no client could present it"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.switch_interval_ms is not None and not (
            finite_real(self.switch_interval_ms) and 0 < self.switch_interval_ms <= 1000
        ):
            raise ValueError(f"switch_interval_ms must be more than 0 and at most 1000 (ms), got {self.switch_interval_ms!r}")
        # The engine's own fields, checked by its config now: the server builds it only after the model
        # has loaded (minutes for a real checkpoint), and a bad flag then failed the start-up that late.
        self._engine_config()

    def _engine_config(self, **model_dependent):
        from ..engine.config import EngineConfig
        from ..vad.policy import VADConfig

        return EngineConfig(
            max_streams=self.max_streams,
            max_batch=self.max_batch,
            default_latency_ms=self.default_latency_ms,
            max_buffered_seconds=self.max_buffered_seconds,
            push_timeout_seconds=self.push_timeout_seconds,
            vad=VADConfig() if self.vad else None,
            usage_interval_seconds=self.usage_interval_seconds,
            **model_dependent,
        )

    def engine_config(self, model):
        """The EngineConfig this server runs its engine with."""
        latency = self.default_latency_ms or model.default_latency_ms
        return self._engine_config(warmup_latencies=(latency,) if model.device.type == "cuda" else ())
