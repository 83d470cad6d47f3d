"""Prometheus metrics of one server app, in its own registry (two apps in one process, as in tests,
never share or collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Engine ticks run from ~1 ms (tiny models, one stream) to seconds (overloaded CPU).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LAG = (0.02, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.open_streams = Gauge(
            "monosemantic_open_streams", "Engine slots in use now (what /readyz and the capacity check count)", registry=r
        )
        self.streams_opened = Counter("monosemantic_streams_opened", "Streams accepted since start", registry=r)
        self.streams_closed = Counter(
            "monosemantic_streams_closed", "Streams ended, by how they ended", ["reason"], registry=r
        )
        self.rejected = Counter(
            "monosemantic_rejected_connections",
            "Stream connections refused before the WebSocket upgrade, by reason",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("monosemantic_stream_errors", "Error messages sent to clients, by code", ["code"], registry=r)
        self.tick_seconds = Histogram(
            "monosemantic_engine_tick_seconds",
            "Wall time of one engine tick (batched VAD plus every encoder/decoder step planned for it)",
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "monosemantic_engine_batch_size", "Streams stepped together in one encoder step", buckets=_BATCH, registry=r
        )
        self.audio_received = Counter(
            "monosemantic_audio_received_seconds", "Seconds of audio received from clients", registry=r
        )
        self.audio_processed = Counter(
            "monosemantic_audio_processed_seconds", "Seconds of audio the engine has processed", registry=r
        )
        self.buffered = Histogram(
            "monosemantic_stream_buffered_seconds",
            "Audio a stream has sent that the engine has not processed yet (lag), sampled every second per stream",
            buckets=_LAG,
            registry=r,
        )
        self.buffered_max = Gauge(
            "monosemantic_stream_buffered_seconds_max", "The largest lag among open streams at the last sample", registry=r
        )
        self.final_seconds = Histogram(
            "monosemantic_final_latency_seconds",
            "From a flush message's arrival to its final being queued for the client",
            buckets=_SECONDS,
            registry=r,
        )

    def on_tick(self, plan, elapsed: float) -> None:
        """EngineCore tick hook (engine thread; prometheus_client is thread-safe)."""
        self.tick_seconds.observe(elapsed)
        for batch in plan.steps:
            self.batch_size.observe(len(batch.rows))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
