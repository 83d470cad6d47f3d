"""A real Pipecat pipeline around the service under test: frames go in at the worker, and loggers at both
ends record what comes out downstream (transcripts, metrics) and upstream (errors)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai (the 'pipecat' extra) is not installed")

from pipecat.frames.frames import (  # noqa: E402
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

import monosemantic  # noqa: E402


class FrameLog(FrameProcessor):
    """Records every frame passing in one direction, with its arrival time, and passes it on."""

    def __init__(self, direction: FrameDirection):
        super().__init__()
        self._direction = direction
        self.frames: list[tuple[float, object]] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == self._direction:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, *types):
        return [f for _, f in self.frames if isinstance(f, types)]


class Harness:
    """Runs `Pipeline([upstream log, *processors, downstream log])` in a PipelineWorker (what PipelineTask
    is called since pipecat 1.3) under a WorkerRunner, as an application does."""

    def __init__(self, *processors, sample_rate: int = 16000):
        self.sample_rate = sample_rate
        self.up = FrameLog(FrameDirection.UPSTREAM)
        self.down = FrameLog(FrameDirection.DOWNSTREAM)
        self.worker = PipelineWorker(
            Pipeline([self.up, *processors, self.down]),
            params=PipelineParams(audio_in_sample_rate=sample_rate, enable_metrics=True, enable_usage_metrics=True),
            cancel_on_idle_timeout=False,
            idle_timeout_secs=None,
        )
        self._started = asyncio.Event()
        self._task: asyncio.Task | None = None

        @self.worker.event_handler("on_pipeline_started")
        async def _started(worker, frame):
            self._started.set()

    async def __aenter__(self) -> "Harness":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        """A test that failed midway must not leave the pipeline running (asyncio.run would wait on it)."""
        if self._task is not None and not self._task.done():
            await self.worker.cancel()
            try:
                await asyncio.wait_for(self._task, 10)
            except asyncio.TimeoutError:
                self._task.cancel()

    async def start(self, timeout: float = 60.0) -> "Harness":
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.worker)
        self._task = asyncio.create_task(runner.run())
        await asyncio.wait_for(self._started.wait(), timeout)  # includes loading the model
        return self

    async def speech_starts(self) -> None:
        await self.worker.queue_frame(VADUserStartedSpeakingFrame(start_secs=0.2))

    async def speech_stops(self) -> None:
        await self.worker.queue_frame(VADUserStoppedSpeakingFrame(stop_secs=0.2))

    async def audio(self, pcm: np.ndarray, frame_ms: int = 20, pace: float = 0.0, rate: int | None = None) -> None:
        """Queue int16 audio in `frame_ms` frames; `pace` > 0 sleeps that fraction of real time per frame.
        `pcm` is mono (n,) or interleaved (n, channels); `rate` is the frames' rate (the pipeline's if None)."""
        rate = rate or self.sample_rate
        channels = 1 if pcm.ndim == 1 else pcm.shape[1]
        step = rate * frame_ms // 1000
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            frame = InputAudioRawFrame(audio=chunk.tobytes(), sample_rate=rate, num_channels=channels)
            await self.worker.queue_frame(frame)
            if pace:
                await asyncio.sleep(pace * len(chunk) / rate)

    async def say(self, pcm: np.ndarray, frame_ms: int = 20, pace: float = 0.0, rate: int | None = None) -> None:
        """Queue one utterance: VAD start, the audio, VAD stop."""
        await self.speech_starts()
        await self.audio(pcm, frame_ms, pace, rate)
        await self.speech_stops()

    async def wait_for(self, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s; downstream: {self.summary()}")
            await asyncio.sleep(0.01)

    def finals(self) -> list[TranscriptionFrame]:
        """Every final transcript. Most are marked finalized; one that comes while the user speaks again
        (a late final, or audio fed faster than real time) is not: it does not end what is being said."""
        return self.down.of(TranscriptionFrame)

    def errors(self) -> list[ErrorFrame]:
        return self.up.of(ErrorFrame)

    def transcripts(self) -> list:
        """Interim and final transcription frames in arrival order."""
        return self.down.of(InterimTranscriptionFrame, TranscriptionFrame)

    def summary(self) -> str:
        return ", ".join(f"{type(f).__name__}({getattr(f, 'text', '')!r})" for f in self.transcripts())

    async def end(self, timeout: float = 60.0) -> None:
        await self.worker.stop_when_done()
        await asyncio.wait_for(self._task, timeout)

    async def cancel(self, timeout: float = 30.0) -> None:
        await self.worker.cancel()
        await asyncio.wait_for(self._task, timeout)


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


@pytest.fixture
def fresh_engines():
    """No engine survives from one test to the next."""
    monosemantic.close_shared_engines()
    yield
    monosemantic.close_shared_engines()


@pytest.fixture
def harness():
    """The Harness class (a fixture because test modules cannot import this conftest by name)."""
    return Harness


SPEECH = (
    "sense_and_sensibility_01_austen_64kb-0880.wav",
    "61-70968-0000.flac",
    "sense_and_sensibility_01_austen_64kb-0930.wav",
)


@pytest.fixture
def speech(audio_clips) -> list[np.ndarray]:
    """Three utterances of real speech as int16 PCM at 16 kHz (what a transport delivers)."""
    return [to_int16(audio_clips[name]) for name in SPEECH]
