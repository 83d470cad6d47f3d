"""The few-row forms of linear layers and depthwise convolutions (monosemantic.models.skinny) against the
library calls they replace on CPU, both in one process with their rounds alternated: first the products
and convolutions of a step by themselves, then one engine step (steady state, caches full, no VAD) with
the few-row forms on and off.

    python benchmarks/skinny.py --model /tmp/reduced.nemo --batch 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from monosemantic import load_model
from monosemantic.engine.config import EngineConfig
from monosemantic.models import skinny

from engine_step import steady_state  # this folder's steady-state steps (the scripts run from here)


def alternated(calls: dict, rounds: int, iters: int) -> dict[str, float]:
    """Median over rounds of the mean time per call (ms), the calls taking turns within each round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(iters):
                call()
            times[name].append((time.perf_counter() - start) / iters * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def kernels(d_model: int, d_ff: int, kernel: int, rows: list[int], rounds: int) -> None:
    print(f"# kernels alone, us per call: d_model {d_model}, d_ff {d_ff}, depthwise kernel {kernel}")
    shapes = {"ff1": (d_ff, d_model), "ff2": (d_model, d_ff), "attn": (d_model, d_model)}
    # As many weights as a step holds, so they stream from memory rather than sit in cache.
    bank = {name: [torch.randn(n, k) for _ in range(16)] for name, (n, k) in shapes.items()}
    conv = torch.randn(d_model, 1, kernel)
    for m in rows:
        cells = []
        for name, ws in bank.items():
            x = torch.randn(m, ws[0].shape[1])
            t = alternated(
                {
                    "library": lambda: [nn.functional.linear(x, w) for w in ws],
                    "skinny": lambda: [skinny.linear(x, w) for w in ws],
                },
                rounds,
                5,
            )
            cells.append(f"{name} {t['library'] / 16 * 1000:6.1f} -> {t['skinny'] / 16 * 1000:6.1f}")
        streams = max(1, m // 2)
        x = torch.randn(streams, d_model, 2 + kernel - 1)  # 2 frames a stream, as at 160 ms
        t = alternated(
            {
                "library": lambda: nn.functional.conv1d(x, conv, groups=d_model),
                "skinny": lambda: skinny.depthwise_conv1d(x, conv),
            },
            rounds,
            20,
        )
        cells.append(f"depthwise {t['library'] * 1000:6.1f} -> {t['skinny'] * 1000:6.1f}")
        print(f"rows {m:4d}  " + "  ".join(cells), flush=True)


def steps(model_path: str, batches: list[int], latency_ms: int, rounds: int, iters: int) -> None:
    model = load_model(model_path, device="cpu")
    slots = max(batches)
    core, step_of = steady_state(model, EngineConfig(max_streams=slots, max_batch=slots, vad=None), latency_ms)
    thresholds = (skinny.LINEAR_ROWS, skinny.DEPTHWISE_ROWS)

    def using(linear_rows: int, depthwise_rows: int, step):
        def call():
            skinny.LINEAR_ROWS, skinny.DEPTHWISE_ROWS = linear_rows, depthwise_rows
            core.runner.step(step)

        return call

    print(f"# one engine step, ms: {model}, {latency_ms} ms, library calls -> few-row forms")
    for batch in batches:
        step = step_of(batch)
        t = alternated({"library": using(0, 0, step), "skinny": using(*thresholds, step)}, rounds, iters)
        print(
            f"batch {batch:4d}  {t['library']:6.1f} -> {t['skinny']:6.1f}  ({t['library'] / t['skinny']:.2f}x)",
            flush=True,
        )
    skinny.LINEAR_ROWS, skinny.DEPTHWISE_ROWS = thresholds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help=".nemo file for the step timings (none: kernels only)")
    p.add_argument("--latency-ms", type=int, default=160)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=6)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    kernels(256, 1024, 9, args.rows, args.rounds)
    if args.model:
        steps(args.model, args.batch, args.latency_ms, args.rounds, args.iters)


if __name__ == "__main__":
    main()
