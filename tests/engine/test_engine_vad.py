"""Batched VAD inside the engine: SpeechStarted/SpeechEnded bracket the speech as Silero's own offline
run does; and optional skipping of silence saves encoder steps without losing the speech."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from monosemantic import Engine, EngineConfig, Final, SpeechEnded, SpeechStarted, VADConfig

from _support.audio import speech_with_silences

pytestmark = pytest.mark.timeout(600)


async def run_stream(engine, audio, frame=320):
    stream = await engine.open_stream(latency_ms=160)
    events = []

    async def receive():
        async for event in stream:
            events.append(event)

    task = asyncio.create_task(receive())
    for i in range(0, len(audio), frame):
        await stream.push(audio[i : i + frame])
        if i % (frame * 25) == 0:
            await asyncio.sleep(0.001)  # let the engine run ahead, as with real-time input
    await stream.flush()
    while not any(isinstance(e, Final) for e in events):
        await asyncio.sleep(0.01)
    await stream.close()
    await task
    return events


def test_speech_events_match_silero_reference(ms_model, audio_clips):
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = ms_model("nemotron_rnnt")
    audio = speech_with_silences(audio_clips)
    vad = VADConfig()
    reference = get_speech_timestamps(
        torch.from_numpy(audio), load_silero_vad(), threshold=vad.threshold, min_speech_duration_ms=vad.min_speech_ms,
        min_silence_duration_ms=vad.min_silence_ms, speech_pad_ms=vad.speech_pad_ms, return_seconds=False,
    )

    async def main():
        async with Engine(model, EngineConfig(vad=vad)) as engine:
            # several streams at once: the VAD runs batched, each stream with its own state
            return await asyncio.gather(*(run_stream(engine, audio[: len(audio) - i * 160]) for i in range(3)))

    for events in asyncio.run(main()):
        starts = [e.sample for e in events if isinstance(e, SpeechStarted)]
        ends = [e.sample for e in events if isinstance(e, SpeechEnded)]
        assert len(starts) == len(ends) == len(reference) >= 3
        for seg, start, end in zip(reference, starts, ends):
            assert abs(start - seg["start"]) <= 1600 and abs(end - seg["end"]) <= 1600
        kinds = [type(e) for e in events if isinstance(e, (SpeechStarted, SpeechEnded))]
        assert kinds == [SpeechStarted, SpeechEnded] * len(reference)  # strictly alternating


def test_close_mid_speech_still_ends_the_speech(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]

    async def main():
        async with Engine(model, EngineConfig()) as engine:
            stream = await engine.open_stream(latency_ms=160)
            for i in range(0, 16000 * 4, 320):
                await stream.push(audio[i : i + 320])
            while engine.core.scheduler.streams[stream.handle].vad_pos < 16000 * 4 - 512:
                await asyncio.sleep(0.01)
            await stream.close()
            return [e async for e in stream]

    events = asyncio.run(main())
    kinds = [type(e) for e in events if isinstance(e, (SpeechStarted, SpeechEnded))]
    assert kinds and kinds[0] is SpeechStarted and kinds[-1] is SpeechEnded and len(kinds) % 2 == 0


def test_skip_silence_saves_encoder_steps_and_keeps_speech_timing(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = speech_with_silences(audio_clips, gaps=(4.0, 4.0, 4.0), tail=3.0)

    def run(config):
        rows = [0]

        async def main():
            async with Engine(model, config) as engine:
                engine.core.add_tick_hook(lambda plan, _: rows.__setitem__(0, rows[0] + sum(len(b.rows) for b in plan.steps)))
                return await run_stream(engine, audio)

        events = asyncio.run(main())
        return rows[0], next(e for e in events if isinstance(e, Final)), events

    exact_rows, exact, _ = run(EngineConfig())
    skip_rows, skipped, events = run(EngineConfig(skip_silence_ms=1000))
    assert skip_rows <= exact_rows - 30  # at least 4.8 s of the ~9 s of long silence skipped
    # speech after each skipped silence is still transcribed, at the right place in the stream
    starts = [e.sample for e in events if isinstance(e, SpeechStarted)]
    ends = [e.sample for e in events if isinstance(e, SpeechEnded)]
    resumed = [s for s, e in zip(starts[1:], ends) if s - e > 2 * 16000]  # speech after a skipped gap
    assert len(resumed) == 2 and skipped.words  # the second and third clips follow 4 s gaps
    for start in resumed:
        after = [w for w in skipped.words if w.start >= start - 1600]
        assert after and after[0].start < start + 3 * 16000
    assert all(w.end <= len(audio) for w in skipped.words)
    assert exact.text and skipped.text


def test_windows_skipped_as_silence_wake_a_writer_waiting_for_room(ms_model):
    """Skipping a silent window frees buffer room inside the plan, with no step result: the plan itself
    must wake a writer that found the buffer full (it used to wait out its whole push timeout)."""
    from monosemantic.engine.core import EngineCore

    model = ms_model("nemotron_rnnt")
    config = EngineConfig(skip_silence_ms=300, max_buffered_seconds=1.0, freeze_gc=False, keep_freed_memory=False)
    core = EngineCore(model, config)  # driven tick by tick here, without its loop thread
    woken = []
    record = core.open(None, lambda event: None, lambda: woken.append(True))
    silence = np.zeros(16000 * 6, dtype=np.float32)
    written = core.write(record.handle, silence)
    assert written < len(silence)  # the buffer is full
    skipped_ticks = 0
    for _ in range(200):
        state = core.streams[record.handle]
        state.waiting_for_space = True  # as a write that found no room leaves it
        woken.clear()
        resets, plan = core._plan_tick()
        if plan.skipped:
            skipped_ticks += 1
            assert woken, "a tick skipped silence but did not wake the waiting writer"
        if resets:
            core.runner.reset_utterance([slot for slot, _ in resets])
            core.runner.reset_vad([slot for slot, vad in resets if vad])
        if not plan.empty:
            core._run(plan)
        written += core.write(record.handle, silence[written:])
        if written == len(silence) and not plan.skipped and plan.empty:
            break
    assert skipped_ticks > 0 and written == len(silence)


def test_silence_skipped_while_catching_up_does_not_pause_the_loop(ms_model):
    """A stream that is behind (a burst of audio, a client sending faster than real time) has its silent
    windows skipped one per tick. A tick that only skipped windows ran nothing, and the loop then slept
    as if idle (50 ms) before the next window, although it was ready: 8 s of silence pushed at once
    and flushed took 4.7 s to its Final with skip_silence_ms, against 0.5 s without."""
    import threading

    from monosemantic.engine.core import EngineCore

    model = ms_model("nemotron_rnnt")
    config = EngineConfig(skip_silence_ms=300, freeze_gc=False, keep_freed_memory=False)
    core = EngineCore(model, config)  # driven pass by pass here, without its loop thread
    waits = []

    class Wake(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(timeout)

    core.wake = Wake()
    events = []
    record = core.open(80, events.append, lambda: None)
    silence = np.zeros(32 * 512 * 6, dtype=np.float32)  # whole VAD batches: no lone window waits for more
    assert core.write(record.handle, silence) == len(silence)
    core.flush(record.handle)
    passes = 0
    while not any(isinstance(e, Final) for e in events):
        core._pass(float("inf"))
        passes += 1
        assert passes < 1000
    assert core.scheduler.streams[record.handle].utt_start == len(silence)
    slept = [t for t in waits if t]
    assert not slept, f"the loop slept {len(slept)} times ({sum(slept):.2f} s) with the stream's windows ready"


def test_skip_silence_skips_nothing_inside_a_speech_segment_the_vad_reports(ms_model, monkeypatch):
    """Inside a speech segment the VAD's policy calls a window silent only below its exit threshold
    (hysteresis, as Silero's get_speech_timestamps): windows between the two thresholds keep the segment
    open. skip_silence counted only windows above the entry threshold as voice, so a soft stretch of
    speech (probabilities between the thresholds) longer than skip_silence_ms was skipped, unencoded,
    while the engine's own SpeechStarted/SpeechEnded said it was speech."""
    from monosemantic.engine.core import EngineCore
    from monosemantic.engine.scheduler import Scheduler

    model = ms_model("nemotron_rnnt")
    config = EngineConfig(skip_silence_ms=300, freeze_gc=False, keep_freed_memory=False)
    core = EngineCore(model, config)  # driven tick by tick here, without its loop thread
    # Each VAD window's probability is read from its audio: 1 s loud, 2 s soft (0.4: between the exit
    # threshold, 0.35, and the entry threshold, 0.5), 1 s loud, then 3 s of silence.
    levels = [0.9] * 31 + [0.4] * 63 + [0.9] * 31 + [0.0] * 94
    audio = np.repeat(np.array(levels, dtype=np.float32), 512)
    monkeypatch.setattr(core.runner, "vad", lambda rows: [
        [float(core.runner.ring[r.slot, (r.start + 512 * i) % core.runner.ring_samples]) for i in range(r.windows)]
        for r in rows
    ])
    skipped = []  # [first, last) samples of each encoder window skipped as silence
    skippable = Scheduler._skippable

    def recording(scheduler, record):
        if skippable(scheduler, record):
            skipped.append(scheduler._window_samples(record))
            return True
        return False

    monkeypatch.setattr(Scheduler, "_skippable", recording)
    events = []
    record = core.open(160, events.append, lambda: None)

    def drain():
        while True:
            resets, plan = core._plan_tick()
            if resets:
                core.runner.reset_utterance([slot for slot, _ in resets])
                core.runner.reset_vad([slot for slot, vad in resets if vad])
            if plan.empty and not plan.skipped:
                return
            if not plan.empty:
                core._run(plan)

    for i in range(0, len(audio), 320):  # 20 ms pushes, each processed before the next comes
        core.write(record.handle, audio[i : i + 320])
        drain()
    core.close(record.handle)
    speech = [e.sample for e in events if isinstance(e, (SpeechStarted, SpeechEnded))]
    assert len(speech) == 2 and speech[0] < 512 and speech[1] > 125 * 512  # one segment, loud to loud
    inside = [(a, b) for a, b in skipped if a < speech[1] and b > speech[0]]
    assert not inside, f"windows inside the speech segment {speech} were skipped: {inside}"
    assert skipped and all(a >= 125 * 512 for a, _ in skipped)  # the silence after it still is
