"""`monosemantic loadtest`: N real-time clients against a running `monosemantic serve`.

Each client loops real speech (tests/data, or --audio), sends 20 ms frames at real-time pace and flushes
at the end of every clip, as a voice agent flushes at each end of turn. Measured per minute of the run
(so drift shows):

- time-to-final: from sending `flush` to receiving its final. It contains any backlog the server has
  built up for the stream, so a server falling behind real time shows here first (this is the latency
  measure; docs/server.md explains why it is used rather than per-partial timing);
- partials received, and their lag: from when the audio up to a partial's `end` had been sent (spoken)
  to the partial's arrival; the same for speech_started/speech_ended (whose lag includes the VAD's
  hysteresis);
- errors;
- coverage: every final must start where the previous one ended and end exactly at the number of
  samples sent before its flush: no audio lost.

    monosemantic loadtest --url ws://127.0.0.1:8080 --streams 16 --duration 600
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_STREAMS = 1024
MAX_DURATION_S = 3600.0
RATE = 16000
# The run's hard deadline is its streams' time, their finals' waits and this margin.
DEADLINE_MARGIN_S = 30.0


@dataclass(frozen=True)
class LoadtestConfig:
    url: str
    streams: int = 4
    """Concurrent client streams (1..1024)."""
    duration_s: float = 60.0
    """Audio each stream sends, in real time (1..3600 s)."""
    api_key: str | None = None
    latency_ms: int | None = None
    """Latency mode asked of the server (None: the server's default)."""
    frame_ms: int = 20
    """Audio per WebSocket frame (20 ms, as WebRTC delivers it)."""
    ramp_s: float = 1.0
    """Stream starts are spread over this long, so frames do not arrive in lockstep."""
    final_timeout_s: float = 30.0
    """How long the end of the run waits for the last finals."""
    coalesce: bool = True
    """Gather frames up to the server's step points (RemoteEngine(coalesce=)); False: one message per frame."""

    def __post_init__(self):
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"--streams must be in 1..{MAX_STREAMS}")
        if not 1.0 <= self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"--duration must be in 1..{MAX_DURATION_S:.0f} seconds")
        if not 1 <= self.frame_ms <= 1000:
            raise ValueError("--frame-ms must be in 1..1000")
        if self.latency_ms is not None and self.latency_ms < 1:
            raise ValueError("--latency-ms must be a positive number of milliseconds")


@dataclass
class StreamReport:
    index: int
    opened: bool = False
    open_error: str | None = None
    samples_sent: int = 0
    flushes: int = 0
    finals: int = 0
    covered: int = 0  # finals whose start/end match exactly what was sent
    partials: int = 0
    errors: list[str] = field(default_factory=list)
    max_send_lag_s: float = 0.0  # how far the client itself fell behind its real-time schedule

    @property
    def complete(self) -> bool:
        return self.opened and self.finals == self.flushes and self.covered == self.finals


class Histogram:
    """Durations in seconds, counted in bins 0.1% wide (geometric, from 0.1 ms to 10^4 s; one bin below,
    one above): a fixed 150 KB whatever the run's length. Keeping every value took about 1.5 GB at the
    largest run (1024 streams of partials for an hour). A percentile is computed as numpy's default
    (linear between the two nearest ranks), from bin midpoints clamped to the exact minimum and maximum,
    so it is within 0.05% of the exact figure (0.1 ms below 0.1 ms)."""

    LOW = 1e-4
    GROWTH = 1.001
    _SCALE = 1.0 / math.log(GROWTH)
    BINS = math.ceil(math.log(1e4 / LOW) * _SCALE) + 2
    RESOLUTION = "within 0.05% of exact (bins 0.1% wide)"

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS, np.int64)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, seconds: float) -> None:
        index = 0 if seconds < self.LOW else min(int(math.log(seconds / self.LOW) * self._SCALE) + 1, self.BINS - 1)
        self.counts[index] += 1
        self.count += 1
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def merge(self, other: "Histogram") -> None:
        self.counts += other.counts
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _value(self, cumulative: np.ndarray, rank: int) -> float:
        """The value of the `rank`-th smallest (from 0): its bin's geometric midpoint, within the exact range
        (the smallest and the largest are the exact ones)."""
        if rank <= 0:
            return self.min
        if rank >= self.count - 1:
            return self.max
        index = int(np.searchsorted(cumulative, rank, side="right"))
        middle = self.LOW * 0.5 if index == 0 else self.LOW * self.GROWTH ** (index - 0.5)
        return min(max(middle, self.min), self.max)

    def percentiles(self, qs=(50, 95, 99), scale: float = 1000.0) -> dict[str, float]:
        """{"p50": ...} in seconds times `scale` (milliseconds by default); NaN when empty."""
        if not self.count:
            return {f"p{q}": float("nan") for q in qs}
        cumulative = np.cumsum(self.counts)
        result = {}
        for q in qs:
            position = (self.count - 1) * q / 100.0
            below = math.floor(position)
            value = self._value(cumulative, below)
            if position > below:
                value += (position - below) * (self._value(cumulative, below + 1) - value)
            result[f"p{q}"] = value * scale
        return result


@dataclass
class LoadtestRun:
    """What a run measured: each stream's report, and the timings of all streams together, per minute of
    the run where the report gives them per minute (minutes from the run's start)."""

    reports: list[StreamReport]
    ttf_by_minute: dict[int, Histogram] = field(default_factory=dict)  # by the minute of the flush
    partials_by_minute: dict[int, int] = field(default_factory=dict)  # by the minute of arrival
    partial_lag: Histogram = field(default_factory=Histogram)  # from when a partial's `end` was spoken to its arrival
    vad_lag: Histogram = field(default_factory=Histogram)  # the same for speech_started / speech_ended times

    def final(self, at: float, seconds: float) -> None:
        """A final `seconds` after its flush, sent `at` seconds into the run."""
        minute = math.floor(at / 60.0)
        if minute not in self.ttf_by_minute:
            self.ttf_by_minute[minute] = Histogram()
        self.ttf_by_minute[minute].add(seconds)

    def partial(self, at: float, lag: float) -> None:
        minute = math.floor(at / 60.0)
        self.partials_by_minute[minute] = self.partials_by_minute.get(minute, 0) + 1
        self.partial_lag.add(lag)


async def _one_stream(
    engine, cfg: LoadtestConfig, clips: list[np.ndarray], report: StreamReport, run: LoadtestRun, run_start: float
) -> StreamReport:
    from ..events import Error, Final, Partial, SpeechEnded, SpeechStarted

    index = report.index
    start = run_start + cfg.ramp_s * index / cfg.streams
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    try:
        stream = await engine.open_stream(latency_ms=cfg.latency_ms, sample_rate=RATE)
    except Exception as exc:  # the report says why; the other streams go on
        report.open_error = f"{type(exc).__name__}: {exc}"
        return report
    report.opened = True
    pending: list[tuple[float, int]] = []  # (flush time, samples sent at the flush)
    previous_end = [0]
    model_rate = stream.model_sample_rate

    def spoken(sample: int) -> float:
        """When the stream's audio up to model-rate `sample` had been spoken (sent on schedule)."""
        return start + sample / model_rate

    async def receive() -> None:
        try:
            async for event in stream:
                now = time.perf_counter()
                if isinstance(event, Partial):
                    report.partials += 1
                    run.partial(now - run_start, now - spoken(event.end))
                elif isinstance(event, (SpeechStarted, SpeechEnded)):
                    run.vad_lag.add(now - spoken(event.sample))
                elif isinstance(event, Final):
                    report.finals += 1
                    if not pending:
                        report.errors.append("a final arrived without a flush")
                        continue
                    flushed_at, expected_end = pending.pop(0)
                    run.final(flushed_at - run_start, now - flushed_at)
                    if event.start == previous_end[0] and event.end == expected_end:
                        report.covered += 1
                    else:
                        report.errors.append(f"final covers [{event.start}, {event.end}), expected [{previous_end[0]}, {expected_end})")
                    previous_end[0] = event.end
                elif isinstance(event, Error):
                    report.errors.append(f"{event.code}: {event.message}")
        except Exception as exc:
            report.errors.append(f"{type(exc).__name__}: {exc}")

    receiver = asyncio.create_task(receive())
    frame = RATE * cfg.frame_ms // 1000
    end_samples = int(cfg.duration_s * RATE)
    clip_index = index % len(clips)
    try:
        while report.samples_sent < end_samples:
            clip = clips[clip_index][: end_samples - report.samples_sent]
            clip_index = (clip_index + 1) % len(clips)
            for i in range(0, len(clip), frame):
                piece = clip[i : i + frame]
                # A frame goes out once its audio "has been spoken", its last sample included (the lags
                # above count from there).
                due = start + (report.samples_sent + len(piece)) / RATE
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    report.max_send_lag_s = max(report.max_send_lag_s, -delay)
                await stream.push(piece)
                report.samples_sent += len(piece)
            pending.append((time.perf_counter(), report.samples_sent))
            report.flushes += 1
            await stream.flush()
        deadline = time.perf_counter() + cfg.final_timeout_s
        while pending and not receiver.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if pending:
            report.errors.append(f"{len(pending)} finals missing after {cfg.final_timeout_s:g} s")
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
    except asyncio.CancelledError:  # the run's deadline: no more waiting for this stream's events
        receiver.cancel()
        raise
    finally:
        await stream.close()
        try:
            await asyncio.wait_for(receiver, cfg.final_timeout_s)
        except asyncio.TimeoutError:
            receiver.cancel()
    return report


async def run_loadtest(cfg: LoadtestConfig, clips: list[np.ndarray]) -> LoadtestRun:
    """Run every stream; int16-exact float clips at 16 kHz (as read from 16-bit files)."""
    from .remote import RemoteEngine

    clips = [np.clip(np.round(c * 32768.0), -32768, 32767).astype(np.int16) for c in clips]
    reports = [StreamReport(i) for i in range(cfg.streams)]
    run = LoadtestRun(reports)
    async with RemoteEngine(cfg.url, cfg.api_key, coalesce=cfg.coalesce) as engine:
        run_start = time.perf_counter() + 0.2
        overall = cfg.ramp_s + cfg.duration_s + 2 * cfg.final_timeout_s + DEADLINE_MARGIN_S  # bounded whatever happens
        tasks = [asyncio.ensure_future(_one_stream(engine, cfg, clips, r, run, run_start)) for r in reports]
        try:
            _, late = await asyncio.wait(tasks, timeout=overall)
        except asyncio.CancelledError:
            # Ctrl-C: the streams end with the run, and their outcomes are read (an unread one was asyncio's
            # "exception was never retrieved" with a traceback after the interrupt).
            late = set(tasks)
            raise
        finally:
            # Streams still running are cut, and their reports say so: the run's report is what was
            # measured (a server that fell behind is the case that matters), not a TimeoutError in its place.
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    for task, report in zip(tasks, reports):
        if task in late:
            report.errors.append(
                f"cut at the run's deadline ({overall:g} s): the stream had not finished (opened late, its "
                f"sending held back by the server, or finals still owed)"
            )
        elif task.cancelled() or task.exception() is not None:  # a failure outside the stream's own handling
            report.errors.append("cancelled" if task.cancelled() else f"{type(task.exception()).__name__}: {task.exception()}")
    return run


def summarize(cfg: LoadtestConfig, run: LoadtestRun) -> dict:
    reports = run.reports
    minutes = int(np.ceil((cfg.ramp_s + cfg.duration_s) / 60.0))
    per_minute = []
    for m in range(minutes):
        ttf = run.ttf_by_minute.get(m, Histogram())
        per_minute.append({"minute": m, "finals": ttf.count, "partials": run.partials_by_minute.get(m, 0), **ttf.percentiles()})
    all_ttf = Histogram()
    for ttf in run.ttf_by_minute.values():
        all_ttf.merge(ttf)
    # Drift: the first and the last minute the whole run covers (a trailing partial minute holds only the
    # run's last flushes, and is left out).
    full = [m for m in per_minute if (m["minute"] + 1) * 60 <= cfg.duration_s and m["finals"]]
    drift = None
    if len(full) >= 2:
        first, last = full[0], full[-1]
        drift = {
            "first_minute": first["minute"], "last_minute": last["minute"],
            **{f"{q}_change": (last[q] / first[q] - 1.0) if first[q] else None for q in ("p50", "p95")},
        }
    return {
        "url": cfg.url,
        "streams": cfg.streams,
        "duration_s": cfg.duration_s,
        "latency_ms": cfg.latency_ms,
        "frame_ms": cfg.frame_ms,
        "opened": sum(r.opened for r in reports),
        "audio_sent_s": sum(r.samples_sent for r in reports) / RATE,
        "flushes": sum(r.flushes for r in reports),
        "finals": sum(r.finals for r in reports),
        "covered": sum(r.covered for r in reports),
        "all_audio_covered": all(r.complete for r in reports),
        "errors": sum(len(r.errors) + (r.open_error is not None) for r in reports),  # a refused open counts
        "error_samples": [e for r in reports for e in (r.errors + ([r.open_error] if r.open_error else []))][:10],
        "client_max_send_lag_ms": 1000.0 * max((r.max_send_lag_s for r in reports), default=0.0),
        "time_to_final_ms": all_ttf.percentiles(),
        "coalesce": cfg.coalesce,
        "partial_lag_ms": run.partial_lag.percentiles(),
        "vad_lag_ms": run.vad_lag.percentiles(),
        "percentile_resolution": Histogram.RESOLUTION,
        "per_minute": per_minute,
        "drift": drift,
    }


def format_summary(s: dict) -> str:
    lines = [
        f"# monosemantic loadtest: {s['streams']} streams x {s['duration_s']:g} s real-time audio -> {s['url']} "
        f"(latency {s['latency_ms'] or 'server default'} ms, {s['frame_ms']} ms frames"
        f"{'' if s.get('coalesce', True) else ', not coalesced'})",
        f"{'minute':>6} {'finals':>7} {'partials':>9}   time-to-final p50 / p95 / p99 (ms)",
    ]
    for m in s["per_minute"]:
        lines.append(f"{m['minute']:>6} {m['finals']:>7} {m['partials']:>9}   {m['p50']:8.1f} / {m['p95']:8.1f} / {m['p99']:8.1f}")
    t = s["time_to_final_ms"]
    lines += [
        f"all    {s['finals']:>7}            {t['p50']:8.1f} / {t['p95']:8.1f} / {t['p99']:8.1f}",
        f"streams opened {s['opened']}/{s['streams']}, audio sent {s['audio_sent_s']:.1f} s, finals {s['finals']}/{s['flushes']} flushes, "
        f"exact coverage {s['covered']}/{s['finals']} ({'all audio covered' if s['all_audio_covered'] else 'AUDIO NOT COVERED'}), "
        f"errors {s['errors']}, client max send lag {s['client_max_send_lag_ms']:.1f} ms",
    ]
    for key, name in (("partial_lag_ms", "partial"), ("vad_lag_ms", "speech_started/ended")):
        lag = s.get(key)
        if lag and lag["p50"] == lag["p50"]:  # not NaN: some arrived
            lines.append(f"{name} lag (arrival - when its time was spoken) p50 / p95 / p99: "
                         f"{lag['p50']:.1f} / {lag['p95']:.1f} / {lag['p99']:.1f} ms")
    if s.get("drift"):
        d = s["drift"]
        change = lambda v: "n/a" if v is None else f"{100.0 * v:+.0f}%"  # noqa: E731
        lines.append(
            f"drift, minute {d['first_minute']} -> minute {d['last_minute']}: time-to-final p50 {change(d['p50_change'])}, "
            f"p95 {change(d['p95_change'])}"
        )
    if s.get("percentile_resolution"):
        lines.append(f"percentiles are {s['percentile_resolution']}")
    lines += [f"  error: {e}" for e in s["error_samples"]]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("loadtest", help="real-time client streams against a running `monosemantic serve`")
    p.add_argument("--url", default="ws://127.0.0.1:8080", help="server base URL (ws://HOST:PORT)")
    p.add_argument("--streams", type=int, default=4, help=f"concurrent streams (1..{MAX_STREAMS})")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of real-time audio per stream")
    p.add_argument("--api-key", default=None, help="the server's key (default: $MONOSEMANTIC_API_KEY)")
    p.add_argument("--latency-ms", type=int, default=None, help="latency mode to ask for (default: the server's)")
    p.add_argument("--audio", nargs="+", help="speech files or directories to loop (default: tests/data)")
    p.add_argument("--frame-ms", type=int, default=20)
    p.add_argument("--no-coalesce", dest="coalesce", action="store_false",
                   help="send every frame as its own message (default: gather frames up to the server's step points)")
    p.add_argument("--json", help="also write the summary to this file")


def run(args) -> int:
    from ..bench.command import load_clips
    from ..bench.output import check_writable, write_json
    from ..errors import missing_dependency

    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise missing_dependency("aiohttp", "server", "monosemantic loadtest") from None
    cfg = LoadtestConfig(url=args.url, streams=args.streams, duration_s=args.duration, api_key=args.api_key,
                         latency_ms=args.latency_ms, frame_ms=args.frame_ms, coalesce=args.coalesce)
    if args.json:
        check_writable(args.json)  # before the run: a bad path must not cost its results
    clips = load_clips(args.audio, RATE)
    measured = asyncio.run(run_loadtest(cfg, clips))
    summary = summarize(cfg, measured)
    print(format_summary(summary), flush=True)
    if args.json:
        write_json(args.json, {**summary, "streams_detail": [asdict(r) for r in measured.reports]})
    return 0 if summary["all_audio_covered"] and summary["errors"] == 0 else 1
