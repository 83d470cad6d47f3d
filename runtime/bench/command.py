"""`monosemantic bench`: N simulated real-time streams through the engine, optionally beside NeMo.

    monosemantic bench --model M --streams 8 16 32 --latency-ms 160 --seconds 30
    monosemantic bench --model M --find-max --baseline nemo
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable, Generator

import numpy as np

from .output import check_writable, write_json
from .result import BenchResult, percentiles
from .workload import make_workload

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")  # in a directory; libsndfile 1.1+ reads them all
MAX_SECONDS = 3600.0  # audio per stream: the workload is built in memory before the run
MAX_BATCH_WAIT_MS = 86_400_000.0  # one day, as EngineConfig bounds its durations
DEFAULT_STREAMS = 8
DEFAULT_SEARCH_WITHIN = 5.0  # percent


def load_clips(paths: list[str] | None, sample_rate: int) -> list[np.ndarray]:
    """Speech clips from files and directories; None: the repository's tests/data (from the working
    directory, or beside the package in a source checkout)."""
    from ..audio import load_audio_file

    if not paths:
        here = Path("tests") / "data"
        source = Path(__file__).resolve().parents[2] / "tests" / "data"
        found = next((d for d in (here, source) if d.is_dir()), None)
        if found is None:
            raise ValueError("no speech to send: pass --audio with audio files (wav, flac, ogg, opus, mp3) or directories (the default, tests/data, exists only in a checkout of the repository)")
        paths = [str(found)]
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
        else:
            files.append(path)
    if not files:
        raise ValueError(f"no audio files found in {', '.join(paths)}; pass --audio with audio files (wav, flac, ogg, opus, mp3)")
    return [load_audio_file(f, sample_rate) for f in files]


def search_max(start: int, limit: int, within: float = 0.05) -> Generator[int, bool, int]:
    """The search for the most streams sustained in real time, as a generator: it yields a count to try,
    is sent whether that count was sustained, and returns the maximum (0: not even one). Doubling from
    `start`, or halving when `start` already fails, then bisection until the first count that failed is
    at most `within` (a fraction) above the maximum, or one stream above it."""
    lo, hi = (start, None) if (yield start) else (0, start)
    while hi is None:
        n = min(lo * 2, limit)
        if n == lo:
            return lo
        if (yield n):
            lo = n
        else:
            hi = n
    while hi - lo > max(1, int(lo * within)):
        mid = (lo + hi) // 2
        if (yield mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_max_streams(
    trial: Callable[[int], BenchResult], start: int, limit: int, log, within: float = 0.05
) -> tuple[int, list[BenchResult]]:
    """search_max run on one system: (its maximum, every trial's result)."""
    found, results = find_max_interleaved({"system": trial}, start, limit, log, within)
    return found["system"], results["system"]


def find_max_interleaved(
    systems: dict[str, Callable[[int], BenchResult]], start: int, limit: int, log, within: float = 0.05
) -> tuple[dict[str, int], dict[str, list[BenchResult]]]:
    """search_max for several systems at once, their trials taken in turns (one of each system, then the
    next of each): a shared machine whose speed drifts over minutes then slows all of them alike, where
    searching one system after the other would credit one with a fast quarter hour and the other with a
    slow one."""
    searches = {name: search_max(start, limit, within) for name in systems}
    pending = {name: next(search) for name, search in searches.items()}  # the count each tries next
    found: dict[str, int] = {}
    results: dict[str, list[BenchResult]] = {name: [] for name in systems}
    while pending:
        for name in list(pending):
            res = systems[name](pending[name])
            results[name].append(res)
            log(res)
            try:
                pending[name] = searches[name].send(res.sustained)
            except StopIteration as done:
                found[name] = done.value
                del pending[name]
    return found, results


def _line(res: BenchResult) -> str:
    c = percentiles(res.chunk_latency_ms)
    f = percentiles(res.final_latency_ms, (50, 95))
    mem = f"{res.memory_per_stream_mb:.2f} MB" if res.memory_per_stream_mb is not None else "n/a"
    split = ""
    if res.send_lag_ms:
        lag, own = percentiles(res.send_lag_ms), percentiles(res.engine_latency_ms)
        split = f"  client lag p95 {lag['p95']:.1f} ms, engine-side chunk p50/p95 {own['p50']:.1f}/{own['p95']:.1f} ms"
    return (
        f"{res.system:<32} streams={res.streams:<4} chunk p50/p95/p99 = {c['p50']:7.1f}/{c['p95']:7.1f}/{c['p99']:7.1f} ms  "
        f"final p50/p95 = {f['p50']:7.1f}/{f['p95']:7.1f} ms  rtf={res.rtf:.3f}  errors={res.errors}  "
        f"mem/stream={mem}  {'SUSTAINED' if res.sustained else 'not sustained'}{split}"
        + (f"  [{res.notes}]" if res.notes else "")
    )


def machine_facts() -> dict:
    """What a figure needs beside it to be compared with another run: the CPU, its cores, torch and its
    threads, and the GPU if any."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
             "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3)}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def check_args(args) -> None:
    """ValueError (one line) for numbers no run can use. Checked before the model loads: an infinite or
    NaN --seconds would otherwise build its workload forever, and zero or negative counts run nothing
    and report NaN as a result."""
    if args.max_streams < 1:
        raise ValueError(f"--max-streams must be at least 1, got {args.max_streams}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.streams is None:  # the default start, within a smaller --max-streams
        args.streams = [min(DEFAULT_STREAMS, args.max_streams)]
    if not args.find_max and (args.load_curve or args.search_within is not None):
        raise ValueError("--load-curve and --search-within belong to --find-max's search: add --find-max")
    if args.search_within is None:
        args.search_within = DEFAULT_SEARCH_WITHIN
    for n in args.streams:
        if not 1 <= n <= args.max_streams:
            raise ValueError(f"--streams must be in 1..{args.max_streams} (--max-streams), got {n}")
    if not (math.isfinite(args.seconds) and 0 < args.seconds <= MAX_SECONDS):
        raise ValueError(f"--seconds must be more than 0 and at most {MAX_SECONDS:.0f} seconds, got {args.seconds:g}")
    if not 1 <= args.frame_ms <= 1000:
        raise ValueError(f"--frame-ms must be in 1..1000, got {args.frame_ms}")
    if args.latency_ms is not None and args.latency_ms < 1:
        raise ValueError(f"--latency-ms must be a positive number of milliseconds, got {args.latency_ms}")
    if not (math.isfinite(args.batch_wait_ms) and 0 <= args.batch_wait_ms <= MAX_BATCH_WAIT_MS):
        raise ValueError(f"--batch-wait-ms must be 0 or more and at most {MAX_BATCH_WAIT_MS:.0f} (one day), got {args.batch_wait_ms:g}")
    if not (math.isfinite(args.search_within) and 0 <= args.search_within <= 100):
        raise ValueError(f"--search-within must be a percentage in 0..100, got {args.search_within:g}")
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    if args.switch_interval_ms is not None and not (math.isfinite(args.switch_interval_ms) and 0 < args.switch_interval_ms <= 1000):
        raise ValueError(f"--switch-interval-ms must be more than 0 and at most 1000, got {args.switch_interval_ms:g}")
    if args.json:
        check_writable(args.json)


def check_clips(clips, latency_ms: int, sample_rate: int) -> None:
    """ValueError (one line) when no clip is longer than two chunks: every chunk would then be an
    utterance's last, whose latency is the time to final, and no chunk latency could be measured (the
    runs reported NaN, "not sustained")."""
    chunk = latency_ms * sample_rate // 1000
    longest = max(len(clip) for clip in clips)
    if longest <= 2 * chunk:
        raise ValueError(
            f"the longest --audio clip is {longest / sample_rate * 1000:.0f} ms: chunk latency needs a clip longer than "
            f"two {latency_ms} ms chunks ({2 * latency_ms} ms); use longer speech"
        )


def run(args) -> int:
    from ..asr import load_model
    from ..engine.config import EngineConfig
    from ..vad.policy import VADConfig
    from .engine_bench import EngineTrials

    check_args(args)
    # Resolved before anything runs: an unusable source is refused before the engine's first trial.
    nemo_file = _nemo_path(args.model) if args.baseline == "nemo" else None
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)  # process-wide: both systems run under it
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    latency = args.latency_ms if args.latency_ms is not None else model.default_latency_ms
    model.context_for(latency)
    clips = load_clips(args.audio, model.sample_rate)
    check_clips(clips, latency, model.sample_rate)
    limit = args.max_streams
    config = EngineConfig(
        max_streams=limit,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        vad=VADConfig() if args.vad else None,
        warmup_latencies=(latency,) if model.device.type == "cuda" else (),
        keep_freed_memory=args.keep_freed_memory,
    )
    allocator = "glibc defaults"
    if args.keep_freed_memory and model.device.type == "cpu":
        from ..engine.malloc import keep_freed_memory

        # Process-wide: set before either system runs, so the engine and the baseline share the allocator.
        if keep_freed_memory():
            allocator = "freed memory kept (both systems)"
    machine = machine_facts()
    print(
        f"# monosemantic bench: {model}, latency {latency} ms, {len(clips)} clips, {args.seconds:.0f} s per stream, "
        f"allocator: {allocator}",
        flush=True,
    )
    print("# " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    report: dict = {
        "model": str(args.model), "latency_ms": latency, "seconds": args.seconds, "machine": machine, "runs": [],
    }

    def log(res: BenchResult) -> None:
        print(_line(res), flush=True)
        report["runs"].append(res.summary())

    trials = EngineTrials(model, config)  # one engine for every run: CUDA graphs are captured once

    def ours(n: int) -> BenchResult:
        return trials.run(make_workload(clips, n, args.seconds, seed=args.seed), latency, args.frame_ms)

    def nemo(n: int) -> BenchResult:
        from .nemo_baseline import run_nemo

        return run_nemo(nemo_file, make_workload(clips, n, args.seconds, seed=args.seed), latency, device=str(model.device),
                        frame_ms=args.frame_ms)

    try:
        systems = [("monosemantic", ours)] + ([("nemo", nemo)] if args.baseline == "nemo" else [])
        if args.find_max:
            found, _ = find_max_interleaved(dict(systems), args.streams[0], limit, log, args.search_within / 100)
            for name in found:
                print(f"max streams sustained in real time ({name}): {found[name]}", flush=True)
            report["max_streams"] = found
            if "nemo" in found and found["nemo"]:
                print(f"ratio monosemantic / nemo: {found['monosemantic'] / found['nemo']:.2f}x", flush=True)
            if args.load_curve and found["monosemantic"]:
                # Latency across the load range, and within each run (drift): 10%, 50% and 90% of the maximum.
                report["load_curve"] = []
                for share in (0.1, 0.5, 0.9):
                    res = ours(max(1, round(share * found["monosemantic"])))
                    log(res)
                    report["load_curve"].append({"share": share, **res.summary()})
                    print(f"  load {share:.0%}: drift {res.drift()}", flush=True)
        else:
            for n in args.streams:
                for _, trial in systems:
                    log(trial(n))
    finally:
        trials.close()  # streams, loop thread and CUDA state released even when a run fails
    if args.json:
        write_json(args.json, report)
    return 0


def _nemo_path(source: str) -> str:
    """The .nemo file behind a model source (NeMo's pipeline loads the file itself)."""
    from ..models.checkpoint import download_from_hub

    path = Path(os.path.expanduser(source))
    if path.is_file():
        return str(path)
    if path.is_dir():
        raise ValueError("--baseline nemo needs a .nemo file or a Hugging Face repo id, not an extracted directory")
    return str(download_from_hub(source, None))


def add_parser(sub) -> None:
    from ..asr import DEFAULT_MODEL

    p = sub.add_parser("bench", help="simulated real-time streams through the engine (and NeMo with --baseline nemo)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--latency-ms", type=int, default=None, help="streaming latency mode (default: the checkpoint's)")
    p.add_argument("--streams", type=int, nargs="+", default=None,
                   help=f"stream counts to run (with --find-max: the first to try; default {DEFAULT_STREAMS}, or --max-streams if less)")
    p.add_argument("--seconds", type=float, default=20.0, help=f"audio per stream (real time; at most {MAX_SECONDS:.0f})")
    p.add_argument("--find-max", action="store_true", help="search the most streams sustained in real time (p95 chunk latency < chunk)")
    p.add_argument(
        "--search-within", type=float, default=None,
        help=f"with --find-max: bisect until the first count that failed is at most this many percent (or one "
        f"stream) above the maximum (default {DEFAULT_SEARCH_WITHIN:g}; before 2026-11-24 the search stopped at 12.5)",
    )
    p.add_argument("--load-curve", action="store_true", help="with --find-max: then run at 10/50/90%% of the maximum and report drift")
    p.add_argument("--max-streams", type=int, default=1024, help="upper bound of the search and engine slots")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="EngineConfig.batch_wait_ms (default 0: never wait)")
    p.add_argument("--baseline", choices=["nemo"], default=None, help="also run NeMo's cache-aware pipeline on the same workload")
    p.add_argument("--audio", nargs="+", help="speech files or directories to loop (default: tests/data)")
    p.add_argument("--vad", action=__import__("argparse").BooleanOptionalAction, default=True, help="run batched VAD too (default on)")
    p.add_argument(
        "--keep-freed-memory", action=__import__("argparse").BooleanOptionalAction, default=True,
        help="on CPU, keep freed memory mapped (EngineConfig.keep_freed_memory), for the baseline too (default on)",
    )
    p.add_argument("--frame-ms", type=int, default=20, help="client frame size (20 ms as WebRTC; more for very many streams)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--switch-interval-ms", type=float, default=None,
        help="Python's thread switch interval for the run (sys.setswitchinterval; default: Python's 5 ms). How "
        "long the engine's loop thread may wait for the GIL when it comes back from the device while the "
        "client's pushes run (benchmarks/gil_contention.py --device-loop)",
    )
    p.add_argument("--json", help="write all runs to this file")
