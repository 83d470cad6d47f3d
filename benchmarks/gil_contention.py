"""Engine step time while another thread of the process runs Python (and so holds the GIL) for a share
of every 10 ms: what an in-process engine on CPU loses to busy neighbours (docs/engine.md, "Sharing the
process"). Steps run in steady state as in engine_step.py; the busy thread computes in pure Python.

    python benchmarks/gil_contention.py --model /tmp/reduced.nemo --batch 1 8 --switch-interval 0.005 0.0005
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time

from engine_step import steady_state

from monosemantic import load_model
from monosemantic.engine.config import EngineConfig

PERIOD = 0.010  # seconds: the busy thread computes for `share` of each period, then sleeps


def busy(share: float, stop: threading.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < share * PERIOD:
            sum(i * i for i in range(200))  # Python bytecode: holds the GIL between switches
        if share < 1:
            time.sleep((1 - share) * PERIOD)


@contextlib.contextmanager
def busy_neighbour(share: float):
    """A thread running `busy(share)` for the duration of the block (none for a share of 0)."""
    stop = threading.Event()
    neighbour = threading.Thread(target=busy, args=(share, stop), daemon=True) if share > 0 else None
    if neighbour is not None:
        neighbour.start()
    try:
        yield
    finally:
        stop.set()
        if neighbour is not None:
            neighbour.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--latency-ms", type=int, default=160)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--switch-interval", type=float, nargs="+", default=[sys.getswitchinterval()],
                   help="Python switch intervals (seconds) to compare, in turns")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    model = load_model(args.model, device="cpu")
    slots = max(args.batch)
    core, step_of = steady_state(model, EngineConfig(max_streams=slots, max_batch=slots), args.latency_ms)
    runner = core.runner

    def step_ms(batch: int) -> float:
        step = step_of(batch)
        for _ in range(2):
            runner.step(step)
        start = time.perf_counter()
        for _ in range(args.iters):
            runner.step(step)
        return (time.perf_counter() - start) / args.iters * 1000

    print(f"# {model}, {args.latency_ms} ms, ms per step; busy thread: Python for a share of every 10 ms")
    for _ in range(args.rounds):
        for interval in args.switch_interval:
            sys.setswitchinterval(interval)
            for share in args.shares:
                with busy_neighbour(share):
                    times = [step_ms(batch) for batch in args.batch]
                cells = "  ".join(f"batch {b} {t:8.1f}" for b, t in zip(args.batch, times))
                print(f"switch {interval * 1000:5.2f} ms  busy {share:4.0%}  {cells}", flush=True)


if __name__ == "__main__":
    main()
