"""Gathering small pushes up to the points where the engine can use them (engine/coalesce.py): the
points themselves (a push is due exactly when it reaches one), and a local stream holding its pushes
there: the same events as writing every push, fewer writes into the engine, nothing held lost or
changed by a caller reusing its array."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from monosemantic import Engine, EngineConfig, Final, SyncEngine
from monosemantic.engine.coalesce import MAX_HOLD_SECONDS, Coalescer
from monosemantic.engine.scheduler import StepTiming

from _support.events import by_kind, final_of, utterances_in_frames

QUIET = dict(freeze_gc=False, keep_freed_memory=False)
TIMING = StepTiming(first=1240, every=2560, vad_window=None)


def points_between(timing: StepTiming, utterance_start: int, low: int, high: int) -> list[int]:
    """Every point p with low < p <= high: step points of the utterance, and the VAD grid."""
    found = [p for k in range(high // timing.every + 2)
             if low < (p := utterance_start + timing.first + k * timing.every) <= high]
    if timing.vad_window:
        found += [p for p in range(timing.vad_window, high + 1, timing.vad_window) if p > low]
    return sorted(set(found))


@pytest.mark.parametrize("vad_window", [None, 512])
def test_sends_exactly_at_the_pushes_that_reach_a_point(vad_window):
    """Random push sizes and flushes at 16 kHz: a push is due exactly when the audio it completes
    reaches a point the held audio had not; between points nothing goes (checked against an
    independent enumeration of the points)."""
    rng = np.random.default_rng(0)
    timing = StepTiming(TIMING.first, TIMING.every, vad_window)
    c = Coalescer(timing, 16000, 16000)
    written = sent = utterance_start = 0
    sends = 0
    for i in range(3000):
        if i % 400 == 399:
            c.flushed()
            sent = utterance_start = written
            assert (c.sent, c.utterance_start) == (sent, utterance_start)
            continue
        n = int(rng.choice([1, 160, 320, 480, 1000, 3000]))
        written += n
        due = c.add(n, i * 0.01)
        assert c.written == written
        assert due == bool(points_between(timing, utterance_start, sent, written)), (i, sent, written)
        if due:
            c.mark_sent()
            sent = written
            sends += 1
    assert 0 < sends < 3000 - 7


def test_a_push_after_a_pause_or_a_long_hold_is_due():
    c = Coalescer(TIMING, 16000, 16000)
    assert c.add(160, 0.0)  # the first push: nothing came before it
    c.mark_sent()
    assert not c.add(160, 0.01)
    assert c.add(160, 0.01 + MAX_HOLD_SECONDS)  # after a pause
    c.mark_sent()
    start = 0.02 + MAX_HOLD_SECONDS
    times = start + np.arange(200) * 0.9 * MAX_HOLD_SECONDS / 200
    assert not any(c.add(1, t) for t in times)  # 1-sample pushes, no point reached, none after a pause
    assert c.add(1, start + MAX_HOLD_SECONDS)  # the first of them has waited MAX_HOLD_SECONDS


def count_writes(engine, monkeypatch) -> list[int]:
    sizes: list[int] = []
    write = engine.core.write

    def counted(handle, samples):
        written = write(handle, samples)
        sizes.append(written)
        return written

    monkeypatch.setattr(engine.core, "write", counted)
    return sizes


@pytest.mark.parametrize("vad", [True, False], ids=["vad", "no_vad"])
def test_a_local_stream_gives_the_same_events_in_fewer_writes(model, audio_clips, monkeypatch, vad):
    """Speech in 20 ms int16 frames, two utterances: each kind of event is the same with and without
    holding pushes. Without VAD the engine is written to once per step point (an eighth as often); with
    VAD, whose 32 ms windows are points too, a local stream writes every push (holding saved nothing)."""
    clip = audio_clips["61-70968-0000.flac"]
    audio = np.concatenate([np.zeros(4000, np.float32), clip, np.zeros(8000, np.float32)])
    pcm = np.round(audio * 32768).astype(np.int16)

    async def run(coalesce: bool):
        config = EngineConfig(max_streams=1, coalesce_pushes=coalesce, **QUIET, **({} if vad else {"vad": None}))
        async with Engine(model, config) as engine:
            stream = await engine.open_stream(latency_ms=160)
            writes = count_writes(engine, monkeypatch)
            return await utterances_in_frames(stream, pcm, 320, breathe_every=6400), writes

    plain, plain_writes = asyncio.run(run(False))
    held, held_writes = asyncio.run(run(True))
    assert by_kind(held) == by_kind(plain)
    assert sum(held_writes) == sum(plain_writes) == len(pcm)
    assert any(isinstance(e, Final) and e.text for e in held)
    ratio = len(held_writes) / len(plain_writes)
    assert ratio == 1.0 if vad else ratio < 0.2, ratio


def test_held_audio_waits_for_its_point_and_goes_at_it(model):
    """The engine holds nothing of a stream until a push reaches the first step point; that push writes
    everything, at once, so the step runs as soon as without holding."""

    async def main():
        async with Engine(model, EngineConfig(max_streams=1, vad=None, **QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            record = engine.core.scheduler.streams[stream.handle]
            first = stream.timing.first
            await stream.push(np.zeros(100, np.int16))  # the first push goes at once
            pushed = 100
            while pushed + 100 < first:
                await stream.push(np.zeros(100, np.int16))
                pushed += 100
                assert record.written == 100
            await stream.push(np.zeros(first - pushed, np.int16))
            assert record.written == first
            await stream.close()

    asyncio.run(main())


def test_held_float_audio_is_a_copy_of_the_callers_array(model, audio_clips):
    """A float32 push at the model's rate is taken without conversion: held, it must not be the caller's
    array, which the caller may reuse for its next frame."""
    audio = audio_clips["jfk.wav"]

    async def main():
        async with Engine(model, EngineConfig(max_streams=1, vad=None, **QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            frame = np.empty(320, np.float32)  # one buffer, refilled for every frame
            for i in range(0, len(audio), 320):
                piece = audio[i : i + 320]
                frame[: len(piece)] = piece
                await stream.push(frame[: len(piece)])
            frame[:] = 0.0
            await stream.flush()
            return await final_of(stream)

    final = asyncio.run(main())
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


def test_a_sync_stream_holds_and_flushes_the_same_way(model, audio_clips):
    audio = audio_clips["jfk.wav"]
    pcm = np.round(audio * 32768).astype(np.int16)
    with SyncEngine(model, EngineConfig(max_streams=1, vad=None, **QUIET)) as engine:
        stream = engine.open_stream(latency_ms=160)
        for i in range(0, len(pcm), 320):
            stream.push(pcm[i : i + 320].tobytes())
        stream.flush()
        final = next(e for e in stream.events(timeout=60) if isinstance(e, Final))
        stream.close()
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


def test_a_resampled_local_stream_counts_its_points_across_flushes(model):
    """At 48 kHz the stream counts model-rate samples after its resampler, the tail of each flush
    included: after a flush everything is written, and the count is the engine's own."""
    rng = np.random.default_rng(1)

    async def main():
        async with Engine(model, EngineConfig(max_streams=1, vad=None, **QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
            record = engine.core.scheduler.streams[stream.handle]
            for _ in range(3):
                for _ in range(40):
                    await stream.push(rng.integers(-3000, 3000, 960).astype(np.int16))
                await stream.flush()
                assert stream._coalescer.written == stream._coalescer.utterance_start == record.written
            await stream.close()

    asyncio.run(main())


def test_a_cut_inside_the_audio_sent_starts_the_next_utterances_points_there():
    """flush(at=...) inside the audio sent ends the utterance there, without a resampler tail: the
    points that follow are those of an utterance starting at the cut."""
    c = Coalescer(TIMING, 16000, 16000)
    assert c.add(10000, 0.0)
    c.mark_sent()
    c.cut(7000)
    assert c.utterance_start == 7000 and c.sent == c.written == 10000
    assert c.next_point == min(p for p in points_between(TIMING, 7000, 10000, 30000))
