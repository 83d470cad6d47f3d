"""Engine configuration. Torch-free, so the scheduler can read it."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from ..validate import finite_real
from ..vad.policy import VADConfig


# Durations in seconds above this are refused: samples counts derived from them must stay integers a
# buffer can be sized by, and a day is past any real use of these fields.
MAX_SECONDS = 86400.0


@dataclass(frozen=True)
class EngineConfig:
    """How one engine serves many streams of one model."""

    max_streams: int = 256
    """Streams open at once; one more `open_stream` raises CapacityError. Each holds a slot of
    preallocated state (encoder caches, decoder state, VAD state, audio buffer); an engine whose slots
    would not fit in the memory available raises CapacityError at creation, with the sizes."""

    max_batch: int = 64
    """Most streams of one latency mode stepped together; more ready streams wait for the next step."""

    batch_wait_ms: float | None = 0.0
    """How long a stream's ready chunk may wait for other streams of its latency mode to become ready
    too, so that they share one step. It never waits when all of the mode's streams are ready or an
    utterance is ending. 0 (default): never wait; under load batches still form by themselves, from the
    chunks that arrive while a step runs (measured: lower latency at every load than waiting). None: a
    quarter of the mode's chunk duration."""

    default_latency_ms: int | None = None
    """Latency mode of streams opened without one (None: the checkpoint's default mode)."""

    max_buffered_seconds: float = 10.0
    """Audio a stream may have pushed but not yet processed (at least 1 s; the engine raises it to one
    encoder step of its longest latency mode if that is more: 1.2 s for 1120 ms chunks). `push` waits
    (asyncio) or blocks (sync) while the buffer is full, so a producer faster than real time is
    throttled, never given unbounded memory."""

    push_timeout_seconds: float = 30.0
    """How long a push may wait for buffer space before it fails with StreamError."""

    vad: VADConfig | None = field(default_factory=VADConfig)
    """Voice activity detection (Silero, batched across streams) producing SpeechStarted/SpeechEnded;
    None disables it."""

    skip_silence_ms: int | None = None
    """When set (and VAD is on), encoder steps are skipped once a stream has been silent this long; at the
    next speech the encoder restarts with fresh caches (the decoder keeps its context). Saves compute on
    mostly silent calls; transcripts then differ from offline transcription. None (default): exact."""

    coalesce_pushes: bool = True
    """Without VAD: hold a stream's pushes until they reach the next point at which the engine can use
    them (an encoder window's end: `stream.timing`), and write them in one go there (engine/coalesce.py).
    Every event comes as soon as without it; a 20 ms frame that reaches no point costs its conversion
    only, not a write into the engine (the core's lock and bookkeeping, on the GIL the engine's loop
    thread needs): 1.6x less per push at 160 ms (BENCHMARKS.md). A push after a pause of a second or more
    writes at once. With VAD the end of every 32 ms VAD window is a point too, most pushes reach one, and
    holding the others costs about what it saves, so streams with VAD write every push. False: every
    push is written as it comes."""

    usage_interval_seconds: float = 5.0
    """A Usage event is sent after each this many seconds of a stream's processed audio, and at close.
    Below one sample period of the model (1/16000 s): a Usage after every step that processed audio (never
    an empty one)."""

    cuda_graphs: bool = True
    """On CUDA, replay steady-state encoder steps from CUDA graphs (one per mode and batch bucket),
    captured the first time a mode runs a batch of that size (a one-off pause of about a second)."""

    warmup_latencies: tuple[int, ...] = ()
    """Latency modes whose CUDA graphs are captured for every batch bucket when the engine starts, so no
    capture pause hits live traffic."""

    freeze_gc: bool = True
    """At start, move every object alive (the model, torch's and the frameworks' modules: about 300,000
    objects with a small model on CPU) out of reach of Python's garbage collector (`gc.freeze()`, as
    vLLM does after startup). A full collection otherwise walks them all, pausing every thread, the
    engine's included (measured while loading: 20-180 ms each). Objects created later are collected as
    usual; what was alive at start and later becomes cyclic garbage is not freed."""

    keep_freed_memory: bool = True
    """On CPU under glibc, at start, raise the allocator's thresholds so freed memory stays mapped in the
    process (runtime/engine/malloc.py): each step then reuses warm pages for its large temporaries
    instead of page-faulting them in again (measured: about 9,000 faults a step at batch 32 on the
    reduced model, none after). Process-wide and for good; the process keeps its peak memory."""

    def __post_init__(self):
        # Checked here, with the field's name, rather than surfacing later as a hang (an infinite batch
        # bound), a TypeError deep in the engine, or a silently truncated float.
        _integer("max_streams", self.max_streams, low=1)
        _integer("max_batch", self.max_batch, low=1)
        _finite("max_buffered_seconds", self.max_buffered_seconds, high=MAX_SECONDS)
        if self.max_buffered_seconds < 1.0:
            raise ValueError(f"max_buffered_seconds must be at least 1 second, got {self.max_buffered_seconds}")
        if self.batch_wait_ms is not None:
            _finite("batch_wait_ms", self.batch_wait_ms, high=MAX_SECONDS * 1000)
            if self.batch_wait_ms < 0:
                raise ValueError(f"batch_wait_ms must be 0 or more (or None), got {self.batch_wait_ms}")
        if self.default_latency_ms is not None:
            _integer("default_latency_ms", self.default_latency_ms, low=1)
        for name in ("push_timeout_seconds", "usage_interval_seconds"):
            _finite(name, getattr(self, name), high=MAX_SECONDS)
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vad is not None and not isinstance(self.vad, VADConfig):
            raise ValueError(f"vad must be a monosemantic.VADConfig or None, got {self.vad!r}")
        if self.skip_silence_ms is not None:
            _integer("skip_silence_ms", self.skip_silence_ms, low=1)
            if self.vad is None:
                raise ValueError("skip_silence_ms needs VAD enabled (vad=VADConfig(...))")
        for name in ("cuda_graphs", "freeze_gc", "keep_freed_memory", "coalesce_pushes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        latencies = self.warmup_latencies
        if not isinstance(latencies, (tuple, list)):
            raise ValueError(f"warmup_latencies must be a tuple of latency modes in ms, e.g. (160,), got {latencies!r}")
        for latency in latencies:
            _integer("warmup_latencies", latency, low=1)
        object.__setattr__(self, "warmup_latencies", tuple(int(x) for x in latencies))


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _finite(name: str, value, high: float | None = None) -> None:
    if not finite_real(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high:g} (one day), got {value!r}")
