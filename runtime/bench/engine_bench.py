"""The workload through monosemantic's engine, measured as result.py defines."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..events import Final
from .result import BenchResult
from .workload import FRAME_MS, StreamPlan


def _arrival(plan: StreamPlan, t0: float, sample: int, rate: int) -> float:
    """Wall time at which the frame holding stream sample `sample - 1` was sent."""
    frame = rate * FRAME_MS // 1000
    return t0 + plan.offset_s + int(np.ceil(sample / frame)) * frame / rate


def slot_bytes(core) -> int:
    """Device + host memory preallocated per stream slot."""
    runner = core.runner
    tensors = runner.cache.keys + runner.cache.values + runner.cache.conv + runner.cache.sub
    tensors += [runner.decoder.h, runner.decoder.c, runner.decoder.pred_out]
    if runner.vad_state is not None:
        tensors += [t for t in vars(runner.vad_state).values() if hasattr(t, "element_size")]
    total = sum(t.numel() * t.element_size() for t in tensors) + runner.ring.nbytes
    return total // core.config.max_streams


async def _run(model, plans: list[StreamPlan], latency_ms: int, config) -> BenchResult:
    from ..engine import Engine

    rate = model.sample_rate
    chunk_latency: list[float] = []
    final_latency: list[float] = []
    compute = [0.0]
    errors = [0]
    handles: dict[int, StreamPlan] = {}
    t0 = time.perf_counter() + 0.5  # every stream's schedule counts from here

    def on_tick(tick, elapsed: float) -> None:  # loop thread
        done = time.perf_counter()
        compute[0] += elapsed
        g = engine.core.scheduler.geometry
        for batch in tick.steps:
            for row in batch.rows:
                plan = handles.get(row.handle)
                if plan is None or row.final:
                    continue  # a final's latency is measured from the flush, below
                # The chunk is the audio of its mel frames [window, window + step): it is complete when
                # the sample at its end was sent (the frontend's look-ahead past it is our cost).
                shape = engine.core.shapes[batch.latency_ms]
                chunk_end = row.utt_start + g.hop * (row.window + shape.step_mel)
                chunk_latency.append((done - _arrival(plan, t0, chunk_end, rate)) * 1000.0)

    async def one(plan: StreamPlan) -> float:
        stream = await engine.open_stream(latency_ms=latency_ms)
        handles[stream.handle] = plan
        flushed: list[float] = []
        sent = 0.0

        async def receive():
            async for event in stream:
                if isinstance(event, Final):
                    final_latency.append((time.perf_counter() - flushed.pop(0)) * 1000.0)
                elif event.__class__.__name__ == "Error":
                    errors[0] += 1

        receiver = asyncio.create_task(receive())
        for send_at, samples, last in plan.frames(rate):
            delay = t0 + send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await stream.push(samples)
            sent += len(samples) / rate
            if last:
                flushed.append(t0 + send_at)  # from the scheduled time, so a late client is counted too
                await stream.flush()
        while flushed:  # wait for the last finals
            await asyncio.sleep(0.01)
        await stream.close()
        await receiver
        return sent

    async with Engine(model, config) as engine:
        engine.core.on_tick = on_tick
        started = time.perf_counter()
        audio = sum(await asyncio.gather(*(one(p) for p in plans)))
        wall = time.perf_counter() - started
        per_stream = slot_bytes(engine.core) / 2**20
    return BenchResult(
        system="monosemantic engine",
        streams=len(plans),
        latency_ms=latency_ms,
        audio_seconds=audio,
        wall_seconds=wall,
        compute_seconds=compute[0],
        chunk_latency_ms=chunk_latency,
        final_latency_ms=final_latency,
        errors=errors[0],
        memory_per_stream_mb=per_stream,
        notes=f"device={model.device}, max_batch={config.max_batch}, vad={'on' if config.vad else 'off'}",
    )


def run_engine(model, plans: list[StreamPlan], latency_ms: int, config) -> BenchResult:
    """Run the workload through a fresh engine (asyncio loop of its own)."""
    return asyncio.run(_run(model, plans, latency_ms, config))
