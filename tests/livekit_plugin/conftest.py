"""Fixtures for the LiveKit plugin tests: the tiny checkpoint, audio as LiveKit frames, a stream driver
that records every SpeechEvent, and the invariants every event sequence must hold.

Helpers are handed out as fixtures (tests import nothing from here: pytest runs in importlib mode)."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest

import monosemantic

from _support.audio import speech_with_silences


@pytest.fixture(autouse=True)
def fresh_engines():
    """Every test starts and ends with no shared engine, so engines (and their slots) never leak."""
    monosemantic.close_shared_engines()
    yield
    monosemantic.close_shared_engines()


@pytest.fixture(scope="session")
def checkpoint(nemo_checkpoint) -> str:
    return str(nemo_checkpoint("nemotron_rnnt"))


def to_int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def frames(audio: np.ndarray, rate: int = 16000, ms: int = 20):
    """float32 16 kHz audio -> 20 ms rtc.AudioFrames at `rate` (resampled as a WebRTC track would be)."""
    from livekit import rtc

    from monosemantic.audio import resample

    pcm = to_int16(resample(audio, 16000, rate) if rate != 16000 else audio)
    step = rate * ms // 1000
    for i in range(0, len(pcm), step):
        piece = pcm[i : i + step]
        yield rtc.AudioFrame(piece.tobytes(), rate, 1, len(piece))


def start_reader(stream, events: list) -> asyncio.Task:
    """Collect every SpeechEvent of `stream` into `events` until the stream ends (one reader per stream)."""

    async def read():
        async for event in stream:
            events.append(event)

    return asyncio.create_task(read())


async def feed(stream, audio, *, rate=16000, realtime_factor=20.0):
    """Push `audio` as 20 ms frames, `realtime_factor` times faster than real time (so the engine's VAD
    and encoder run alongside, as with live input)."""
    for i, frame in enumerate(frames(audio, rate)):
        stream.push_frame(frame)
        if i % 5 == 4:
            await asyncio.sleep(0.1 / realtime_factor)


async def drive(stream, audio, *, rate=16000, realtime_factor=20.0):
    """Feed `audio`, end the input (the base class flushes first) and return every SpeechEvent the
    stream sent until it ended."""
    events: list = []
    reader = start_reader(stream, events)
    await feed(stream, audio, rate=rate, realtime_factor=realtime_factor)
    stream.end_input()
    await asyncio.wait_for(reader, 60)
    return events


async def wait_for(predicate, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def check_invariants(events, audio_seconds: float, offset: float = 0.0) -> list[list]:
    """The event-order contract of the plugin; returns the turns (events between START and END)."""
    from livekit.agents.stt import SpeechEventType as T

    turns, current, last_time = [], None, offset - 1e-6
    for event in events:
        if event.type == T.START_OF_SPEECH:
            assert current is None, "START inside an open turn"
            current = [event]
        elif event.type == T.END_OF_SPEECH:
            assert current is not None, "END without a START"
            current.append(event)
            turns.append(current)
            current = None
        elif event.type in (T.INTERIM_TRANSCRIPT, T.PREFLIGHT_TRANSCRIPT):
            assert current is not None and event.alternatives[0].text, f"{event.type} outside a turn"
            current.append(event)
        elif event.type == T.FINAL_TRANSCRIPT:
            data = event.alternatives[0]
            if data.text:
                assert current is not None, "a FINAL with text outside a turn"
                current.append(event)
            # times are seconds of the stream, monotonic from one FINAL to the next
            assert offset - 1e-6 <= data.start_time <= data.end_time <= offset + audio_seconds + 0.05
            assert data.start_time >= last_time - 1e-6
            last_time = data.end_time
            for w in data.words or []:
                assert data.start_time - 1e-6 <= w.start_time <= w.end_time <= data.end_time + 1e-6, (w, data)
            starts = [w.start_time for w in data.words or []]
            assert starts == sorted(starts)
        elif event.type == T.RECOGNITION_USAGE:
            assert event.recognition_usage.audio_duration > 0
    assert current is None, "a turn was never ended"
    return turns


@pytest.fixture(scope="session")
def lk():
    """The helpers above, as one namespace."""
    return types.SimpleNamespace(
        speech_with_silences=speech_with_silences, frames=frames, drive=drive, feed=feed, start_reader=start_reader,
        wait_for=wait_for, check_invariants=check_invariants, to_int16=to_int16,
    )
