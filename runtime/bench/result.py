"""What a bench run measures, the same for the engine and for the NeMo baseline."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def percentiles(values: list[float], qs=(50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class BenchResult:
    """One run: N streams of the workload through one system.

    chunk latency: from the moment a chunk's last sample was sent to the moment the system had processed
      that chunk (its partial, if any, is available);
    time to final: from a flush (end of utterance) to its final transcript;
    rtf: seconds the system spent computing / seconds of audio it processed (below 1: faster than real time).
    """

    system: str  # "monosemantic" or "nemo ..." (which NeMo path)
    streams: int
    latency_ms: int  # chunk duration of the mode
    audio_seconds: float
    wall_seconds: float
    compute_seconds: float
    chunk_latency_ms: list[float] = field(default_factory=list, repr=False)
    final_latency_ms: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    memory_per_stream_mb: float | None = None
    notes: str = ""
    chunk_at_s: list[float] = field(default_factory=list, repr=False)  # when each chunk latency was measured
    # The chunk latency split in two (the engine bench only): how late the client sent each frame against
    # its real-time schedule, and each chunk's latency from when its last sample was actually pushed.
    # When the client cannot keep up (one interpreter pushing for hundreds of streams), the first grows
    # and the second says what the engine alone added.
    send_lag_ms: list[float] = field(default_factory=list, repr=False)
    engine_latency_ms: list[float] = field(default_factory=list, repr=False)

    def drift(self) -> dict[str, float] | None:
        """p95 chunk latency in the first and the last third of the run (latency must not creep up)."""
        if len(self.chunk_at_s) != len(self.chunk_latency_ms) or len(self.chunk_at_s) < 30:
            return None
        at = np.asarray(self.chunk_at_s)
        lat = np.asarray(self.chunk_latency_ms)
        lo, hi = np.percentile(at, [33.3, 66.7])
        first, last = lat[at <= lo], lat[at >= hi]
        return {"first_p95": float(np.percentile(first, 95)), "last_p95": float(np.percentile(last, 95))}

    @property
    def rtf(self) -> float:
        return self.compute_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    @property
    def sustained(self) -> bool:
        """Real time: p95 chunk latency below the chunk duration, and no errors."""
        return self.errors == 0 and percentiles(self.chunk_latency_ms)["p95"] < self.latency_ms

    def summary(self) -> dict:
        lists = ("chunk_latency_ms", "final_latency_ms", "chunk_at_s", "send_lag_ms", "engine_latency_ms")
        out = {k: v for k, v in asdict(self).items() if k not in lists}
        out["drift"] = self.drift()
        out["chunk_latency_ms"] = percentiles(self.chunk_latency_ms)
        out["final_latency_ms"] = percentiles(self.final_latency_ms, (50, 95))
        if self.send_lag_ms:
            out["send_lag_ms"] = percentiles(self.send_lag_ms)
            out["engine_latency_ms"] = percentiles(self.engine_latency_ms)
        out["rtf"] = self.rtf
        out["sustained"] = self.sustained
        return out
