"""Turns without the engine's VAD (`EngineConfig(vad=None)`, `serve --no-vad`): the text opens a turn.
Its START_OF_SPEECH must be dated where the text begins, not at the previous flush. The tiny random test
models emit text at once after every flush, silence or not, so this runs the plugin's real stream over a
scripted engine stream that behaves as the engine does in that mode: one step per chunk, a Partial only
from a step that finds text (none in silence), a Final per flush."""

from __future__ import annotations

import asyncio
import types

import numpy as np
import pytest
from livekit.agents.stt import SpeechEventType as T

import monosemantic
from livekit.plugins import monosemantic as lk_monosemantic
from livekit.plugins.monosemantic import turns

pytestmark = pytest.mark.timeout(120)


class ScriptedStream:
    """Text ("a" per step) wherever the audio is not silent, found one chunk at a time."""

    vad = False

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.audio = np.zeros(0, np.int16)
        self.utt_start = self.stepped = 0
        self.text, self.first = "", None
        self.events: asyncio.Queue = asyncio.Queue()

    async def push(self, pcm) -> None:
        self.audio = np.concatenate([self.audio, np.asarray(pcm, np.int16)])
        while self.stepped + self.chunk <= len(self.audio):
            self._step(self.stepped + self.chunk)

    def _step(self, end: int) -> None:
        voiced = np.flatnonzero(self.audio[self.stepped : end])
        if voiced.size:
            self.first = self.stepped + int(voiced[0]) if self.first is None else self.first
            self.text = (self.text + " a").strip()
            self.events.put_nowait(monosemantic.Partial(self.text, self.text, self.utt_start, end))
        self.stepped = end

    async def flush(self, at: int | None = None) -> None:  # (no VAD: the plugin never passes `at`)
        end = len(self.audio)
        if self.stepped < end:
            self._step(end)
        words = [monosemantic.Word(self.text, self.first, end)] if self.text else []
        self.events.put_nowait(monosemantic.Final(self.text, words=words, start=self.utt_start, end=end))
        self.utt_start = self.stepped = end
        self.text, self.first = "", None

    async def close(self) -> None:
        self.events.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        event = await self.events.get()
        if event is None:
            raise StopAsyncIteration
        return event


class ScriptedEngine:
    async def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> ScriptedStream:
        return ScriptedStream(latency_ms * 16000 // 1000)


def test_a_turn_after_a_pause_starts_where_its_speech_does(lk, monkeypatch):
    # Audio is pushed faster than real time: keep the wall-clock times from being capped at "now".
    monkeypatch.setattr(turns, "time", types.SimpleNamespace(time=lambda: float("inf")))
    stt = lk_monosemantic.STT(latency_ms=160)
    engine = ScriptedEngine()

    async def acquire():
        return engine

    stt._engine = acquire  # the backend seam
    speech, silence = np.full(16000, 0.1, np.float32), np.zeros(16000, np.float32)

    async def main():
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, np.concatenate([speech] * 3))
        stream.flush()  # the session commits the first turn; then 5 s of silence, and speech again at 8 s
        await lk.feed(stream, np.concatenate([silence] * 5 + [speech]))
        stream.end_input()
        await asyncio.wait_for(reader, 30)
        return events, stream.start_time

    events, start_time = asyncio.run(main())
    lk.check_invariants(events, 9.0)
    onsets = [e.speech_start_time - start_time for e in events if e.type == T.START_OF_SPEECH]
    assert len(onsets) == 2
    # within the chunk (160 ms) in which the engine found the text; the second was dated 3.0 s (the flush)
    assert onsets[0] == pytest.approx(0.0, abs=0.16)
    assert 8.0 - 0.16 <= onsets[1] <= 8.0 + 0.16
