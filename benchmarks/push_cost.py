"""What one `await stream.push(frame)` costs the caller's thread (and so the process's GIL): the
front door's conversion, validation and write into the engine's ring, without the steps. With 20 ms
frames every stream pushes 50 times a second, so at a thousand streams each microsecond here is 5% of
a core on the thread the engine shares its GIL with.

The engine's loop thread is not started (the streams only fill their buffers) and its wake-up is a
no-op, as in a loaded engine where a write rarely completes a window.

    python benchmarks/push_cost.py --model /tmp/reduced.nemo --streams 64 --frames 100
    python benchmarks/push_cost.py --model /tmp/reduced.nemo --coalesce both --repeat 3 [--vad]

`--busy SHARE` runs a thread that computes in pure Python for that share of every 10 ms, as an engine loop
thread does between its torch calls (on a GPU, most of the time): a push's numpy calls over more than 500
elements let go of the GIL, and taking it back can wait for that thread's whole switch interval.

`--coalesce both` alternates streams that write every push into the engine with streams that hold
pushes up to the engine's next step (or VAD window) point (EngineConfig.coalesce_pushes), in this one
process; `--vad` gives the streams VAD, whose 32 ms windows are points too.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import numpy as np
from gil_contention import busy_neighbour

from monosemantic import Engine, EngineConfig, load_model

KINDS = ("bytes", "int16", "float32")  # int16 bytes (Pipecat, the server), int16 array (LiveKit), float32


def frame_of(kind: str, samples: int) -> object:
    pcm = (np.random.default_rng(0).standard_normal(samples) * 3000).astype(np.int16)
    return pcm.tobytes() if kind == "bytes" else pcm if kind == "int16" else pcm.astype(np.float32) / 32768


async def push_cost(model, kind: str, streams: int, frames: int, frame_ms: int, rounds: int,
                    coalesce: bool = True, vad: bool = False, busy_share: float = 0.0) -> tuple[float, float]:
    """Microseconds per push: the best and the mean of `rounds`."""
    config = EngineConfig(max_streams=streams, max_buffered_seconds=(rounds * frames + 1) * frame_ms / 1000 + 1,
                          freeze_gc=False, keep_freed_memory=False, coalesce_pushes=coalesce,
                          **({} if vad else {"vad": None}))
    engine = Engine(model, config)
    engine.core._thread = threading.current_thread()  # counts as started: no loop thread runs
    engine.core.wake.set = lambda: None
    opened = [await engine.open_stream() for _ in range(streams)]
    data = frame_of(kind, model.sample_rate * frame_ms // 1000)
    times = []
    with busy_neighbour(busy_share):
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(frames):
                for stream in opened:
                    await stream.push(data)
            times.append((time.perf_counter() - start) / (streams * frames) * 1e6)
    return min(times), sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--frames", type=int, default=100, help="pushes per stream per round")
    p.add_argument("--frame-ms", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--coalesce", choices=["on", "off", "both"], default="on",
                   help="hold pushes up to the engine's points (the default), write each, or alternate both")
    p.add_argument("--vad", action="store_true", help="streams with VAD (its windows are points too)")
    p.add_argument("--repeat", type=int, default=1, help="alternations of the settings")
    p.add_argument("--busy", type=float, default=0.0, help="share of every 10 ms another thread runs Python (0-1)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = p.parse_args()
    model = load_model(args.model, device="cpu")
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.coalesce]
    for _ in range(args.repeat):
        for kind in args.kinds:
            for coalesce in settings:
                best, mean = asyncio.run(push_cost(model, kind, args.streams, args.frames, args.frame_ms, args.rounds,
                                                   coalesce, args.vad, args.busy))
                print(f"{kind:8s} {'held' if coalesce else 'each':5s} {best:7.2f} us per push (mean of rounds {mean:7.2f})", flush=True)


if __name__ == "__main__":
    main()
