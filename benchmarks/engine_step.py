"""Time of one engine step by phase, outside any load: the runner's step for B streams in steady state
(full windows, full caches), split into the encoder (CUDA graph or eager), greedy decoding and features,
with the device synchronised around each phase; and one batched VAD call of 5 windows per stream.

    python benchmarks/engine_step.py --model /tmp/full.nemo --device cuda --batch 64 256 512
    python benchmarks/engine_step.py --model /tmp/reduced.nemo --device cpu --batch 1 8 32

Set beside a loaded run (`monosemantic bench`), it tells what a step costs by itself and so how much the
live engine loses to everything around it (the client, events, scheduling).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from monosemantic import load_model
from monosemantic.bench.command import load_clips
from monosemantic.decoding.greedy import DecoderState
from monosemantic.engine import runner as runner_module
from monosemantic.engine.config import EngineConfig
from monosemantic.engine.core import EngineCore
from monosemantic.engine.scheduler import StepBatch, StepRow, VADRow
from monosemantic.models.frontend import LogMelFrontend
from monosemantic.streaming.cuda_graph import SlotGraphedEncoderStep


def steady_state(model, config: EngineConfig, latency_ms: int, audio: str = "speech", seconds: int = 4):
    """An engine core whose slots (all `config.max_streams` of them) each hold `seconds` of audio, and
    a function giving the step of slots 0..B-1 at a window well inside that audio (caches full)."""
    core = EngineCore(model, config)
    runner, shape = core.runner, core.shapes[latency_ms]
    rng = np.random.default_rng(0)
    samples = model.sample_rate * seconds
    speech = np.concatenate(load_clips(None, model.sample_rate)) if audio == "speech" else None
    for slot in range(config.max_streams):
        if speech is None:
            clip = 0.1 * rng.standard_normal(samples)
        else:  # each stream at its own place in the speech, so rows emit as real streams do
            start = int(rng.integers(0, len(speech) - samples))
            clip = speech[start : start + samples]
        runner.write(slot, 0, clip.astype(np.float32))
    window = shape.first_start + 20 * shape.step_mel

    def step_of(batch: int) -> StepBatch:
        rows = tuple(
            StepRow(slot, slot, 1, window, 0, samples, 0, shape.step_mel + 1, False) for slot in range(batch)
        )
        return StepBatch(latency_ms, rows)

    return core, step_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--latency-ms", type=int, default=160)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--audio", choices=["speech", "noise"], default="speech", help="what the streams hold")
    args = p.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    slots = max(args.batch)
    core, step_of = steady_state(model, EngineConfig(max_streams=slots, max_batch=slots), args.latency_ms, args.audio)
    runner = core.runner
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    spent: dict[str, float] = {}

    def timed(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def call(*a, **k):
            sync()
            start = time.perf_counter()
            out = inner(*a, **k)
            sync()
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - start
            return out

        setattr(owner, name, call)

    def per_call_ms(call) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            call()
        sync()
        return (time.perf_counter() - start) / args.iters * 1000

    timed(runner_module, "greedy_decode", "decode")
    timed(runner_module, "slot_encoder_step", "encoder")
    timed(SlotGraphedEncoderStep, "__call__", "encoder")
    timed(LogMelFrontend, "frames", "features")
    timed(DecoderState, "write_rows", "decoder state")
    print(f"# {model}, {args.latency_ms} ms, {args.audio}, steady state (caches full), ms per call")
    for batch in args.batch:
        step = step_of(batch)
        for _ in range(3):
            runner.step(step)  # captures the CUDA graph of the bucket, warms allocators
        spent.clear()
        total = per_call_ms(lambda: runner.step(step))
        vad_rows = tuple(VADRow(slot, slot, 1, 0, 5) for slot in range(batch))
        vad = float("nan")
        if runner.vad_model is not None:
            runner.vad(vad_rows)
            vad = per_call_ms(lambda: runner.vad(vad_rows))
        phases = "  ".join(f"{k} {v / args.iters * 1000:.1f}" for k, v in sorted(spent.items()))
        print(f"batch {batch:5d}  step {total:7.1f}  ({phases})  vad 5 windows {vad:.1f}", flush=True)


if __name__ == "__main__":
    main()
