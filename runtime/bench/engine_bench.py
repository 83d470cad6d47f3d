"""The workload through monosemantic's engine, measured as result.py defines."""

from __future__ import annotations

import asyncio
import bisect
import gc
import time


from ..errors import StreamError
from ..events import Error, Final
from .result import BenchResult
from .workload import FRAME_MS, StreamPlan


def utterance_starts(plan: StreamPlan) -> list[int]:
    """The stream sample at which each of the plan's utterances starts."""
    starts, at = [], 0
    for utt in plan.utterances:
        starts.append(at)
        at += len(utt.audio)
    return starts


def _arrival(plan: StreamPlan, t0: float, sample: int, rate: int, frame_ms: int, starts: list[int] | None = None) -> float:
    """Wall time at which the frame holding stream sample `sample - 1` is scheduled to be sent. Frames
    start afresh at each utterance (StreamPlan.frames), so the grid is the utterance's, not the stream's:
    clips are not whole frames long. `starts`: utterance_starts(plan), when the caller keeps it."""
    frame = rate * frame_ms // 1000
    starts = utterance_starts(plan) if starts is None else starts
    k = max(0, bisect.bisect_right(starts, sample - 1) - 1)  # the utterance holding sample - 1
    utt = plan.utterances[k]
    end = min(-(-(sample - starts[k]) // frame) * frame, len(utt.audio))  # its frame's last sample, within the utterance
    return t0 + plan.offset_s + utt.start_s + end / rate


async def run_trial(engine, plans: list[StreamPlan], latency_ms: int, frame_ms: int = FRAME_MS) -> BenchResult:
    """The workload through an already started engine (its CUDA graphs and caches stay warm between
    trials)."""
    model, config = engine.model, engine.config
    rate = model.sample_rate
    chunk_latency: list[float] = []
    chunk_at: list[float] = []
    final_latency: list[float] = []
    compute = [0.0]
    steps = [0, 0]  # encoder steps run, rows in them (mean batch = rows / steps)
    errors: list[str] = []  # one per Error event
    handles: dict[int, StreamPlan] = {}
    send_lag: list[float] = []
    engine_latency: list[float] = []
    # Per stream, the samples pushed so far after each push and when that push was made, so a chunk's
    # latency can also be taken from when its audio actually reached the engine.
    pushed: dict[int, tuple[list[int], list[float]]] = {}
    starts: dict[int, list[int]] = {}  # per stream, utterance_starts of its plan
    t0 = time.perf_counter() + 0.5  # every stream's schedule counts from here

    def on_tick(tick, elapsed: float) -> None:  # loop thread
        done = time.perf_counter()
        compute[0] += elapsed
        g = engine.core.scheduler.geometry
        for batch in tick.steps:
            steps[0] += 1
            steps[1] += len(batch.rows)
            for row in batch.rows:
                plan = handles.get(row.handle)
                if plan is None or row.final:
                    continue  # a final's latency is measured from the flush, below
                # The chunk is the audio of its mel frames [window, window + step): it is complete when
                # the sample at its end was sent (the frontend's look-ahead past it is our cost).
                shape = engine.core.shapes[batch.latency_ms]
                chunk_end = row.utt_start + g.hop * (row.window + shape.step_mel)
                arrival = _arrival(plan, t0, chunk_end, rate, frame_ms, starts[row.handle])
                chunk_latency.append((done - arrival) * 1000.0)
                chunk_at.append(done - t0)
                ends, times = pushed[row.handle]
                at = bisect.bisect_left(ends, chunk_end)  # the push that completed the chunk
                if at < len(times):  # always, for a window stepped on audio pushed (not past a flush)
                    engine_latency.append((done - times[at]) * 1000.0)

    async def receive(stream, flushed: list[float]) -> None:
        async for event in stream:
            if isinstance(event, Final):
                final_latency.append((time.perf_counter() - flushed.pop(0)) * 1000.0)
            elif isinstance(event, Error):
                errors.append(f"{event.code}: {event.message}")
                flushed.clear()  # the engine closed the stream: no final is coming

    async def feed(streams) -> float:
        """One coroutine sends every stream's frames in time order (one sleep per send time, not one per
        frame per stream), so the client side costs little next to the engine, as a server's would."""
        frames = sorted(
            (send_at, i, samples, last)
            for i, plan in enumerate(plans)
            for send_at, samples, last in plan.frames(rate, frame_ms)
        )
        if engine.config.freeze_gc:
            gc.freeze()  # the schedule's hundred thousand frames are not garbage: keep collections short
        sent = 0
        dead: set[int] = set()  # streams the engine closed (their Error is counted by `receive`)
        for send_at, i, samples, last in frames:
            if i in dead:
                continue
            delay = t0 + send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stream, flushed = streams[i]
            ends, times = pushed[stream.handle]
            # Noted before the push, so the engine cannot have stepped the audio before it is noted; after
            # the sleep, so a late wake-up (a busy loop, the GIL) counts as the client's lag.
            now = time.perf_counter()
            send_lag.append(max(0.0, now - (t0 + send_at)) * 1000.0)
            times.append(now)
            ends.append((ends[-1] if ends else 0) + len(samples))
            try:
                await stream.push(samples)
                sent += len(samples)
                if last:
                    flushed.append(t0 + send_at)  # from the scheduled time, so a late client is counted too
                    await stream.flush()
            except StreamError:
                dead.add(i)
                flushed.clear()
        return sent / rate

    engine.core.add_tick_hook(on_tick)
    try:
        streams = []
        for plan in plans:
            stream = await engine.open_stream(latency_ms=latency_ms)
            handles[stream.handle] = plan
            starts[stream.handle] = utterance_starts(plan)
            pushed[stream.handle] = ([], [])
            streams.append((stream, []))
        receivers = [asyncio.create_task(receive(stream, flushed)) for stream, flushed in streams]
        started = time.perf_counter()
        audio = await feed(streams)
        while any(flushed for _, flushed in streams):  # the last finals
            await asyncio.sleep(0.01)
        wall = time.perf_counter() - started
        for stream, _ in streams:
            await stream.close()
        await asyncio.gather(*receivers)
    finally:
        engine.core.remove_tick_hook(on_tick)
    per_stream = engine.core.runner.slot_bytes.total() / 2**20  # device + host state of one slot
    return BenchResult(
        system="monosemantic engine",
        streams=len(plans),
        latency_ms=latency_ms,
        audio_seconds=audio,
        wall_seconds=wall,
        compute_seconds=compute[0],
        chunk_latency_ms=chunk_latency,
        final_latency_ms=final_latency,
        chunk_at_s=chunk_at,
        send_lag_ms=send_lag,
        engine_latency_ms=engine_latency,
        errors=len(errors),
        memory_per_stream_mb=per_stream,
        notes=(
            f"device={model.device}, max_batch={config.max_batch}, vad={'on' if config.vad else 'off'}, "
            f"frames={frame_ms} ms, steps={steps[0]}, mean batch={steps[1] / max(1, steps[0]):.1f}, "
            f"loop busy {compute[0] / wall:.0%}"
            + (f", first error: {errors[0]}" if errors else "")
        ),
    )


class EngineTrials:
    """One engine (and event loop) serving successive trials, e.g. a search for the most streams."""

    def __init__(self, model, config):
        from ..engine import Engine

        self.loop = asyncio.new_event_loop()
        self.engine = Engine(model, config)
        self.engine.core.start()

    def run(self, plans: list[StreamPlan], latency_ms: int, frame_ms: int = FRAME_MS) -> BenchResult:
        return self.loop.run_until_complete(run_trial(self.engine, plans, latency_ms, frame_ms))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose())
        self.loop.close()
