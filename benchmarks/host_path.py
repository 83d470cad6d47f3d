"""The engine's host side at many streams, with the device's work taken out: what pushes, planning and
routing results cost the interpreter per second of every stream's audio, which at a thousand streams
must fit in one GIL beside the device work of the loop (on a GPU the steps themselves take little of it).

The runner's model calls are replaced by instant results (a label on every other step, VAD
probabilities alternating between 1.3 s of speech and 1.3 s of silence, so that SpeechStarted and
SpeechEnded happen); everything else is the engine's own code: the asyncio front door, the core's
lock and ring writes, the scheduler's plans, the result routing, events and their delivery to one
reader task per stream. One thread does it all, in rounds: every stream pushes one 20 ms frame of int16
bytes (as the server and Pipecat do), then ticks run until none plans a step, then the event loop
delivers the events; each utterance is flushed after --utterance-seconds.

    python benchmarks/host_path.py --model /tmp/tiny.nemo --streams 1000 --vad both

Figures: microseconds per push; milliseconds per plan (one scheduler pass over every stream); and for
pushes, ticks (plans included) and delivery, the share of one core that 1,000 streams would take
(milliseconds per stream-second of audio, times 1,000 streams). The rings are touched before the run,
as in a server that has been up a while (a first write into a fresh page costs a page fault).
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import numpy as np

from monosemantic import Engine, EngineConfig, load_model
from monosemantic.engine.runner import RowResult, row_span

FRAME_MS = 20


def instant_device(core) -> None:
    """Replace the runner's model calls by instant results of the same form."""
    runner = core.runner
    steps = [0]

    def step(batch):
        shape = runner.plans[batch.latency_ms].shape
        results = []
        for row in batch.rows:
            steps[0] += 1
            labels = [5 + steps[0] % 50] if steps[0] % 2 == 0 else []
            moved, reached = row_span(row, shape, runner.geometry)
            results.append(RowResult(labels, [0] * len(labels), [0] * len(labels), moved, reached))
        return results

    def vad(rows):
        # 40 windows (1.28 s) of speech, then 40 of silence, on each stream's own window grid.
        return [[0.9 if (r.start // 512 + i) // 40 % 2 == 0 else 0.05 for i in range(r.windows)] for r in rows]

    runner.step, runner.vad = step, vad
    runner.reset_utterance = runner.reset_vad = runner.restart_encoder = lambda rows: None


async def run(model, streams: int, frames: int, vad: bool, latency_ms: int, utterance_frames: int) -> dict:
    config = EngineConfig(max_streams=streams, max_batch=max(64, streams // 2), freeze_gc=False,
                          keep_freed_memory=False, **({} if vad else {"vad": None}))
    engine = Engine(model, config)
    core = engine.core
    core._thread = threading.current_thread()  # counts as started: the ticks run here, between rounds
    instant_device(core)
    core.runner.ring.fill(0.0)
    opened = [await engine.open_stream(latency_ms=latency_ms) for _ in range(streams)]
    events = [0]

    async def read(stream):
        async for _ in stream:
            events[0] += 1

    readers = [asyncio.create_task(read(s)) for s in opened]
    frame = (np.random.default_rng(0).standard_normal(model.sample_rate * FRAME_MS // 1000) * 3000).astype(np.int16).tobytes()
    spent = dict(push=0.0, ticks=0.0, delivery=0.0, plans=0.0)
    plans = 0
    for f in range(frames):
        started = time.perf_counter()
        for stream in opened:
            await stream.push(frame)
        if (f + 1) % utterance_frames == 0:
            for stream in opened:
                await stream.flush()
        pushed = time.perf_counter()
        while True:
            before = time.perf_counter()
            resets, plan = core._plan_tick()
            spent["plans"] += time.perf_counter() - before
            plans += 1
            if not plan.empty:
                core._run(plan)
            if not plan.steps:
                break
        ticked = time.perf_counter()
        await asyncio.sleep(0)  # the mailboxes' deliveries, then the readers
        await asyncio.sleep(0)
        spent["push"] += pushed - started
        spent["ticks"] += ticked - pushed
        spent["delivery"] += time.perf_counter() - ticked
    for stream in opened:
        await stream.close()
    await asyncio.gather(*readers)
    core._thread = None  # no loop thread to join
    await engine.aclose()
    audio = streams * frames * FRAME_MS / 1000
    return dict(
        push_us=spent["push"] / (streams * frames) * 1e6,
        plan_ms=spent["plans"] / plans * 1e3,
        events=events[0],
        **{f"{k}_core": spent[k] / audio * 1000 for k in ("push", "ticks", "delivery")},  # share of a core per 1,000 streams
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, nargs="+", default=[1000])
    p.add_argument("--seconds", type=float, default=5.0, help="audio per stream")
    p.add_argument("--utterance-seconds", type=float, default=5.0, help="a flush after this much audio")
    p.add_argument("--latency-ms", type=int, default=160)
    p.add_argument("--vad", choices=["on", "off", "both"], default="both")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the settings, alternated")
    args = p.parse_args()
    model = load_model(args.model, device="cpu")
    frames = int(args.seconds * 1000 / FRAME_MS)
    utterance = max(1, int(args.utterance_seconds * 1000 / FRAME_MS))
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.vad]
    for _ in range(args.repeat):
        for streams in args.streams:
            for vad in settings:
                r = asyncio.run(run(model, streams, frames, vad, args.latency_ms, utterance))
                print(f"{streams:5d} streams, VAD {'on ' if vad else 'off'}: push {r['push_us']:5.1f} us, plan "
                      f"{r['plan_ms']:5.2f} ms; share of a core per 1,000 streams: pushes {r['push_core']:4.0%}, "
                      f"ticks {r['ticks_core']:4.0%}, delivery {r['delivery_core']:4.0%} ({r['events']} events)", flush=True)


if __name__ == "__main__":
    main()
