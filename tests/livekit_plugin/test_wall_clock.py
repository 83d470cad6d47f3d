"""Wall-clock times of turns (START_OF_SPEECH.speech_start_time, END_OF_SPEECH.speech_end_time, which
the session uses for endpointing with turn_detection="stt") when live audio arrives before the engine is
ready: a model still loading, or frames backed up while a failed run is retried. The run then starts on
a backlog, and its times must still be those of the audio, not of the moment the backlog reached the
engine (they used to be late by the whole wait, for the whole stream)."""

from __future__ import annotations

import asyncio
import time
import types

import numpy as np
import pytest
from livekit.agents import APIConnectOptions
from livekit.agents.stt import SpeechEventType as T

import monosemantic
from livekit.plugins import monosemantic as lk_monosemantic
from livekit.plugins.monosemantic.turns import TurnTracker

from _support.streams import PassThroughStream

pytestmark = pytest.mark.timeout(300)

# Reported vs true wall time. Pushes are paced by asyncio.sleep on a loaded machine, so a frame can
# arrive a few tens of milliseconds late; the defect was the engine's whole wait (here 2 s; the times
# were late by that, up to the moment each event was sent).
TOLERANCE = 0.15
WAIT = 2.0  # seconds the engine keeps the stream waiting while audio arrives


@pytest.fixture
def vad_samples(monkeypatch):
    """The engine's VAD transitions as the stream's trackers see them: (kind, sample of the run's audio,
    run's TurnTracker)."""
    seen = []
    handle = TurnTracker.handle

    def recording(self, event):
        if isinstance(event, (monosemantic.SpeechStarted, monosemantic.SpeechEnded)):
            seen.append((type(event), self.clock.base + event.sample, self))
        return handle(self, event)

    monkeypatch.setattr(TurnTracker, "handle", recording)
    return seen


async def feed_live(stream, audio, lk) -> float:
    """Push `audio` as 20 ms frames in real time, as a room's track does; returns the wall time of its
    first sample (each frame is pushed when its audio has ended)."""
    t0 = time.time()
    pushed = 0
    for frame in lk.frames(audio):
        pushed += frame.samples_per_channel
        await asyncio.sleep(max(0.0, t0 + pushed / 16000 - time.time()))
        stream.push_frame(frame)
    return t0


def check_turn_times(events, vad, first_sample_of, t0):
    """Each START/END at the wall time of its VAD sample: t0 + (run's first sample + sample) / 16000."""
    starts = [e.speech_start_time for e in events if e.type == T.START_OF_SPEECH]
    ends = [e.speech_end_time for e in events if e.type == T.END_OF_SPEECH]
    onsets = [t0 + (first_sample_of(r) + s) / 16000 for k, s, r in vad if k is monosemantic.SpeechStarted]
    offsets = [t0 + (first_sample_of(r) + s) / 16000 for k, s, r in vad if k is monosemantic.SpeechEnded]
    # (the end of input may add a turn of text the VAD called silence, opened at its Final's first word)
    assert onsets and len(starts) >= len(onsets) and len(ends) >= len(offsets)
    assert [s - t0 for s in starts[: len(onsets)]] == pytest.approx([o - t0 for o in onsets], abs=TOLERANCE)
    # (an END for a turn the VAD had not closed yet is the end of the stream's audio)
    assert [e - t0 for e in ends[: len(offsets)]] == pytest.approx([o - t0 for o in offsets], abs=TOLERANCE)


def test_turn_times_follow_the_audio_when_the_model_loads_while_the_user_speaks(
    checkpoint, audio_clips, lk, vad_samples
):
    """Audio arrives in real time while the engine is still being acquired (a cold model load)."""
    silence = np.zeros(16000, np.float32)
    audio = np.concatenate([silence, audio_clips["jfk.wav"][: 16000 * 3], silence])

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        acquire = stt._engine

        async def slow_acquire():
            await asyncio.sleep(WAIT)
            return await acquire()

        stt._engine = slow_acquire
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        t0 = await feed_live(stream, audio, lk)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, t0

    events, t0 = asyncio.run(main())
    assert vad_samples, "the VAD heard no speech"
    check_turn_times(events, vad_samples, lambda run: 0, t0)
    # the stream-relative times are those of the audio too (offset ~0: no session set one)
    lk.check_invariants(events, len(audio) / 16000, offset=0.0)


class _FailingStream(PassThroughStream):
    """An engine stream that breaks (a lost connection) once `limit` samples have been pushed."""

    def __init__(self, es, limit: int):
        super().__init__(es)
        self._limit, self.pushed = limit, 0

    async def push(self, pcm) -> None:
        self.pushed += len(pcm)
        if self.pushed > self._limit:
            raise monosemantic.StreamError("connection lost")
        await self._es.push(pcm)


def test_turn_times_follow_the_audio_after_a_retry_on_a_backlog(checkpoint, audio_clips, lk, vad_samples):
    """The first run fails after 0.5 s of audio; the retry waits for its engine while audio backs up,
    then starts on that backlog, at the audio position where the failed run stopped. Wall-clock turn
    times and stream-relative transcript times both follow the audio (the base class moves
    start_time_offset on by the wall time between attempts, here a second more than the audio)."""
    silence = np.zeros(16000, np.float32)
    audio = np.concatenate([silence, audio_clips["jfk.wav"][: 16000 * 3], silence])
    failing: list[_FailingStream] = []

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        acquire = stt._engine
        await acquire()  # loaded: the wait below is the retry's only

        class BreakingEngine:
            def __init__(self, engine):
                self._engine = engine

            async def open_stream(self, **kw):
                failing.append(_FailingStream(await self._engine.open_stream(**kw), limit=8000))
                return failing[-1]

        async def flaky_acquire():
            if not failing:
                return BreakingEngine(await acquire())
            await asyncio.sleep(WAIT)  # reconnecting while the user goes on speaking
            return await acquire()

        stt._engine = flaky_acquire
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=1.0))
        events = []
        reader = lk.start_reader(stream, events)
        t0 = await feed_live(stream, audio, lk)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, errors, t0

    events, errors, t0 = asyncio.run(main())
    assert len(errors) == 1 and errors[0].recoverable
    [broken] = failing
    runs = []  # trackers in run order: the retry's audio starts where the failed run's pushes stopped
    for _, _, run in vad_samples:
        if run not in runs:
            runs.append(run)
    assert vad_samples and len(runs) == 1, "the speech lies in the retried run"
    check_turn_times(events, vad_samples, lambda run: broken.pushed, t0)
    # Seconds of the stream (no session set an offset): the retried run's audio starts at the failed
    # run's last sample, and its last Final ends with the input.
    lk.check_invariants(events, len(audio) / 16000, offset=0.0)
    finals = [e.alternatives[0] for e in events if e.type == T.FINAL_TRANSCRIPT]
    assert finals[-1].end_time == pytest.approx(len(audio) / 16000, abs=0.01)
    assert min(f.start_time for f in finals) >= broken.pushed / 16000 - 1e-6


def test_turn_times_follow_the_audio_after_a_pause_in_the_input(checkpoint, audio_clips, lk, vad_samples):
    """The input stops mid-stream and resumes later (the session's audio input disabled for a while, as
    push-to-talk does, or a participant's track republished): the turns after the pause are at the wall
    time of the audio that came after it. They used to be dated the whole pause earlier (the run's one
    anchor counted every later sample as if the audio had been continuous): with turn_detection="stt"
    an END_OF_SPEECH that early let the session skip its endpointing delay."""
    silence = np.zeros(16000, np.float32)
    part = np.concatenate([silence, audio_clips["jfk.wav"][: 16000 * 2], silence])
    pause = 2.0

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        await stt._engine()  # loaded: the pause is the only wait
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        t0 = await feed_live(stream, part, lk)
        await asyncio.sleep(pause)  # no frames at all meanwhile
        t1 = await feed_live(stream, part, lk)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, t0, t1

    events, t0, t1 = asyncio.run(main())

    def wall(sample):  # the true wall time of input sample `sample`
        return t0 + sample / 16000 if sample < len(part) else t1 + (sample - len(part)) / 16000

    onsets = [wall(s) - t0 for k, s, _ in vad_samples if k is monosemantic.SpeechStarted]
    offsets = [wall(s) - t0 for k, s, _ in vad_samples if k is monosemantic.SpeechEnded]
    after = [s for k, s, _ in vad_samples if k is monosemantic.SpeechStarted and s >= len(part)]
    assert onsets and offsets and after, "the VAD heard speech on both sides of the pause"
    starts = [e.speech_start_time - t0 for e in events if e.type == T.START_OF_SPEECH]
    ends = [e.speech_end_time - t0 for e in events if e.type == T.END_OF_SPEECH]
    assert starts[: len(onsets)] == pytest.approx(onsets, abs=TOLERANCE)
    assert ends[: len(offsets)] == pytest.approx(offsets, abs=TOLERANCE)


def test_a_late_frame_followed_by_its_backlog_is_no_pause(monkeypatch):
    """A frame delayed by a busy event loop arrives late and its backlog right behind it: no pause
    (times would run ahead of the audio for the rest of the stream), unlike input that stops."""
    from livekit import rtc

    from livekit.plugins.monosemantic import stream as stream_module

    now = [1000.0]
    monkeypatch.setattr(stream_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    frame = rtc.AudioFrame(bytes(640), 16000, 1, 320)  # 20 ms

    def live(stream, n):
        for _ in range(n):
            now[0] += 0.02
            stream.push_frame(frame)

    async def main():
        stt = lk_monosemantic.STT(model="unused", device="cpu")

        async def never_ready():
            await asyncio.Event().wait()

        stt._engine = never_ready  # no engine: only the frames' arrival is looked at
        stream = stt.stream()
        live(stream, 50)  # 0-1 s
        now[0] += 0.02 + 0.3
        stream.push_frame(frame)  # 300 ms late
        for _ in range(15):  # and the 300 ms behind it at once
            stream.push_frame(frame)
        live(stream, 50)  # to 2.32 s
        late = stream._paused(0, 16000 * 2)
        now[0] += 2.0  # the input stops for 2 s
        live(stream, 50)
        paused = stream._paused(0, 16000 * 3), stream._paused(16000 * 3, 16000 * 3 + 100)
        stream._task.cancel()
        await stream.aclose()
        return late, paused

    late, paused = asyncio.run(main())
    assert late == pytest.approx(0.0, abs=1e-6)
    assert paused == pytest.approx((2.0, 0.0), abs=1e-6)


def test_turn_times_stay_true_after_more_pauses_than_the_stream_remembers(monkeypatch):
    """Every pause in the input (push-to-talk: each release of the button) starts a stretch with its own
    origin, and the stream remembers the last 256. Once it had forgotten the first, the run's first
    sample was looked up in the oldest stretch kept: every later time ran early by the pauses forgotten
    (the first one here, 60 s, the user waiting before speaking), and an END_OF_SPEECH came before its
    own START_OF_SPEECH."""
    from livekit import rtc

    from livekit.plugins.monosemantic import stream as stream_module
    from livekit.plugins.monosemantic.turns import Clock

    now = [1000.0]
    monkeypatch.setattr(stream_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    frame = rtc.AudioFrame(bytes(640), 16000, 1, 320)  # 20 ms

    async def main():
        stt = lk_monosemantic.STT(model="unused", device="cpu")

        async def never_ready():
            await asyncio.Event().wait()

        stt._engine = never_ready  # no engine: the run's clock is built here, as _run builds it
        stream = stt.stream()
        pushed = 0

        def live(n):
            nonlocal pushed
            for _ in range(n):
                now[0] += 0.02
                stream.push_frame(frame)
                pushed += 320

        live(5)
        stream.start_time = stream._anchor(0)  # the run's first push
        clock = Clock(offset=lambda: 0.0, anchor=lambda: stream.start_time, first=lambda: 0, paused=stream._paused)
        tracker = TurnTracker(clock, language="en", interim_results=False)
        now[0] += 60.0
        live(5)
        for _ in range(254):  # 256 stretches of input so far: none forgotten
            now[0] += 0.5
            live(5)
        onset, true_onset = pushed - 320, now[0] - 0.02
        [start], _ = tracker.handle(monosemantic.SpeechStarted(onset))
        now[0] += 0.5
        live(5)  # the 257th stretch: the first is forgotten
        offset, true_offset = pushed, now[0]
        tracker.handle(monosemantic.SpeechEnded(offset))
        tracker.flushed("vad")
        out, _ = tracker.handle(monosemantic.Final(text="", end=offset))
        stream._task.cancel()
        await stream.aclose()
        return start.speech_start_time, true_onset, out[-1].speech_end_time, true_offset

    start, true_start, end, true_end = asyncio.run(main())
    assert start == pytest.approx(true_start, abs=1e-3)
    assert end == pytest.approx(true_end, abs=1e-3)
