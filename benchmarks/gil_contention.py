"""Engine step time while another thread of the process runs Python (and so holds the GIL) for a share
of every 10 ms: what an in-process engine on CPU loses to busy neighbours (docs/engine.md, "Sharing the
process"). Steps run in steady state as in engine_step.py; the busy thread computes in pure Python.

    python benchmarks/gil_contention.py --model /tmp/reduced.nemo --batch 1 8 --switch-interval 0.005 0.0005

`--device-loop` times, instead of a CPU step, a stand-in for a GPU engine's tick with no model: SYNCS
rounds of Python holding the GIL (kernel launches) and a wait that lets it go (a device read while the
GPU works). Coming back from each wait, the loop thread may have to wait for a busy neighbour (the
event loop's pushes) to give the GIL back, up to the switch interval:

    python benchmarks/gil_contention.py --device-loop 10 300 300 --switch-interval 0.005 0.001 0.0005 --shares 0 0.25 0.5
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


def python_for(us: float) -> None:
    """Run Python bytecode (holding the GIL between switches) for `us` microseconds."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def busy(share: float, stop: threading.Event, period: float = PERIOD) -> None:
    while not stop.is_set():
        python_for(share * period * 1e6)
        if share < 1:
            time.sleep((1 - share) * period)


@contextlib.contextmanager
def busy_neighbour(share: float, period: float = PERIOD):
    """A thread running `busy(share)` for the duration of the block (none for a share of 0): Python for
    `share` of every `period` seconds, in one burst."""
    stop = threading.Event()
    neighbour = threading.Thread(target=busy, args=(share, stop, period), daemon=True) if share > 0 else None
    if neighbour is not None:
        neighbour.start()
    try:
        yield
    finally:
        stop.set()
        if neighbour is not None:
            neighbour.join()


def device_tick(syncs: int, python_us: float, wait_us: float) -> None:
    for _ in range(syncs):
        python_for(python_us)
        time.sleep(wait_us * 1e-6)  # lets go of the GIL, as a CUDA synchronisation does


def device_loop(args) -> None:
    syncs, python_us, wait_us = args.device_loop
    syncs = int(syncs)
    print(f"# ms per tick of {syncs} x ({python_us:g} us of Python + a {wait_us:g} us wait without the GIL); "
          f"busy thread: Python for a share of every {args.period_ms:g} ms")
    for _ in range(args.rounds):
        for interval in args.switch_interval:
            sys.setswitchinterval(interval)
            for share in args.shares:
                with busy_neighbour(share, args.period_ms / 1000):
                    device_tick(syncs, python_us, wait_us)
                    start = time.perf_counter()
                    for _ in range(args.iters * 4):
                        device_tick(syncs, python_us, wait_us)
                    ms = (time.perf_counter() - start) / (args.iters * 4) * 1000
                print(f"switch {interval * 1000:5.2f} ms  busy {share:4.0%}  tick {ms:6.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="the checkpoint whose CPU steps are timed (not needed with --device-loop)")
    p.add_argument("--device-loop", type=float, nargs=3, metavar=("SYNCS", "PYTHON_US", "WAIT_US"),
                   help="time a stand-in for a GPU tick instead of CPU steps (see above)")
    p.add_argument("--latency-ms", type=int, default=160)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    p.add_argument("--switch-interval", type=float, nargs="+", default=[sys.getswitchinterval()],
                   help="Python switch intervals (seconds) to compare, in turns")
    p.add_argument("--period-ms", type=float, default=PERIOD * 1000,
                   help="with --device-loop: the busy thread's period (its bursts last share x period)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.device_loop:
        device_loop(args)
        return
    if not args.model:
        p.error("--model is needed (or --device-loop)")

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
