"""Time to final through the Pipecat service, beside the raw engine, in one run.

    python benchmarks/pipecat_ttf.py --model /path/to/model.nemo --streams 4 --utterances 5

Each of `--streams` concurrent speakers says `--utterances` utterances (the clips in tests/data), in real
time in 20 ms frames, each followed by 200 ms of silence (pipecat's default VAD stop_secs) and an end of
turn. Two ways, alternating round by round on the same shared engine:

- service: a Pipecat pipeline per speaker (PipelineWorker, WorkerRunner) with MonosemanticSTTService;
  timed from queueing VADUserStoppedSpeakingFrame to the finalized TranscriptionFrame reaching the end of
  the pipeline.
- engine: an EngineStream per speaker; timed from `flush()` to the `Final` event.

The difference is the adapter's overhead. Pipecat's `ttfs_p99_latency` counts from the end of speech, i.e.
stop_secs earlier than the VAD stop frame: the suggested value printed is stop_secs + the service's p99.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np

FRAME_MS = 20
STOP_SECS = 0.2  # pipecat's VAD_STOP_SECS, the setting its published TTFS figures assume
DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def load_clips() -> list[np.ndarray]:
    import soundfile as sf

    clips = []
    for path in sorted(DATA.glob("*.wav")) + sorted(DATA.glob("*.flac")):
        audio, rate = sf.read(str(path), dtype="int16", always_2d=True)
        assert rate == 16000, path
        clips.append(audio[:, 0].copy())
    return clips


def frames(pcm: np.ndarray, rate: int = 16000):
    step = rate * FRAME_MS // 1000
    for i in range(0, len(pcm), step):
        yield pcm[i : i + step]


async def paced(pcm: np.ndarray, send, clock: list[float]) -> None:
    """Send 20 ms frames on a real-time schedule; `clock[0]` is the stream's next due time."""
    for chunk in frames(pcm):
        delay = clock[0] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send(chunk)
        clock[0] += len(chunk) / 16000


def utterance(clips, speaker: int, n: int) -> np.ndarray:
    clip = clips[(speaker + n) % len(clips)]
    return np.concatenate([clip, np.zeros(int(STOP_SECS * 16000), dtype=np.int16)])


async def engine_phase(engine, args, clips) -> list[float]:
    from monosemantic import Final

    async def speaker(i: int) -> list[float]:
        stream = await engine.open_stream(latency_ms=args.latency_ms, sample_rate=16000)
        finals: asyncio.Queue = asyncio.Queue()

        async def read():
            async for event in stream:
                if isinstance(event, Final):
                    finals.put_nowait(time.monotonic())

        reader = asyncio.create_task(read())
        clock = [time.monotonic() + random.uniform(0, 1.0)]
        times = []
        for n in range(args.utterances):
            await paced(utterance(clips, i, n), stream.push, clock)
            start = time.monotonic()
            await stream.flush()
            times.append(await asyncio.wait_for(finals.get(), 30) - start)
        await stream.close()
        await reader
        return times

    return [t for ts in await asyncio.gather(*(speaker(i) for i in range(args.streams))) for t in ts]


async def service_phase(args, clips, engine_config) -> list[float]:
    from pipecat.frames.frames import (
        InputAudioRawFrame,
        TranscriptionFrame,
        VADUserStartedSpeakingFrame,
        VADUserStoppedSpeakingFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from pipecat_monosemantic import MonosemanticSTTService

    class FinalTimes(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.finals: asyncio.Queue = asyncio.Queue()

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TranscriptionFrame) and frame.finalized:
                self.finals.put_nowait(time.monotonic())
            await self.push_frame(frame, direction)

    async def speaker(i: int) -> list[float]:
        stt = MonosemanticSTTService(
            model=args.model, device=args.device, engine_config=engine_config,
            settings=MonosemanticSTTService.Settings(latency_ms=args.latency_ms),
        )
        sink = FinalTimes()
        worker = PipelineWorker(
            Pipeline([stt, sink]), params=PipelineParams(audio_in_sample_rate=16000),
            cancel_on_idle_timeout=False, idle_timeout_secs=None,
        )
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            started.set()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        run = asyncio.create_task(runner.run())
        await asyncio.wait_for(started.wait(), 120)

        async def send(chunk):
            await worker.queue_frame(InputAudioRawFrame(audio=chunk.tobytes(), sample_rate=16000, num_channels=1))

        clock = [time.monotonic() + random.uniform(0, 1.0)]
        times = []
        for n in range(args.utterances):
            await worker.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))
            await paced(utterance(clips, i, n), send, clock)
            start = time.monotonic()
            await worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=STOP_SECS))
            times.append(await asyncio.wait_for(sink.finals.get(), 30) - start)
        await worker.stop_when_done()
        await asyncio.wait_for(run, 30)
        return times

    return [t for ts in await asyncio.gather(*(speaker(i) for i in range(args.streams))) for t in ts]


def summary(name: str, times: list[float]) -> str:
    ms = np.array(times) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return f"| {name} | {len(ms)} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {ms.mean():.1f} |"


async def main_async(args) -> None:
    import monosemantic
    from monosemantic import EngineConfig

    # Pipecat's VAD drives the turns, so the engine's own VAD is off (as docs/pipecat.md recommends).
    config = EngineConfig(vad=None)
    engine = await monosemantic.aget_engine(args.model, device=args.device, config=config)
    clips = load_clips()
    print(f"model={args.model} device={args.device} streams={args.streams} utterances={args.utterances} "
          f"latency_ms={args.latency_ms} rounds={args.rounds}", file=sys.stderr)
    # warm both paths (first steps allocate; the first pipeline imports pipecat's processors)
    warm = argparse.Namespace(**{**vars(args), "streams": 1, "utterances": 1})
    await engine_phase(engine, warm, clips)
    await service_phase(warm, clips, config)
    service, raw = [], []
    for _ in range(args.rounds):
        service += await service_phase(args, clips, config)
        raw += await engine_phase(engine, args, clips)
    monosemantic.close_shared_engines()
    print("| path | finals | p50 ms | p95 ms | p99 ms | mean ms |")
    print("|---|---:|---:|---:|---:|---:|")
    print(summary("service: VADUserStoppedSpeakingFrame -> finalized TranscriptionFrame", service))
    print(summary("engine: flush() -> Final", raw))
    overhead = (np.median(service) - np.median(raw)) * 1000
    print(f"\nadapter overhead (median difference): {overhead:.1f} ms")
    print(f"suggested ttfs_p99_latency (stop_secs {STOP_SECS} + service p99): "
          f"{STOP_SECS + np.percentile(service, 99):.3f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help=".nemo path or Hugging Face repo id")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--streams", type=int, default=4, help="concurrent speakers")
    parser.add_argument("--utterances", type=int, default=5, help="utterances per speaker per round")
    parser.add_argument("--rounds", type=int, default=2, help="service and engine alternate this many times")
    parser.add_argument("--latency-ms", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    from loguru import logger

    logger.remove()  # pipecat logs every frame at DEBUG; the table is the output
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
