"""The scheduler under random open/write/flush/close/tick sequences (a fake runner, no torch), and the
engine under mixed modes, small batches and random flushes: every flush gets its one Final, in order, and
no stream waits without bound."""

from __future__ import annotations

import random

import pytest

from monosemantic import EngineConfig, VADConfig
from monosemantic.engine.scheduler import AudioGeometry, Scheduler
from monosemantic.streaming.shape import ModeShape

GEOMETRY = AudioGeometry(hop=160, n_fft=512, reach=200)


def shape(right: int) -> ModeShape:
    return ModeShape(context=(70, right), factor=8, chunk_frames=right + 1, cache_frames=70, step_mel=8 * (right + 1), first_start=-7)


MODES = {80: shape(0), 160: shape(1), 560: shape(6)}


class Fuzz:
    """Drives a scheduler like the engine does and records what each stream was told."""

    def __init__(self, rng, max_streams, max_batch, vad, skip_silence, wait=0.0):
        self.now = [0.0]
        self.s = Scheduler(max_streams, max_batch, GEOMETRY, vad, skip_silence=skip_silence,
                           batch_wait=lambda ms: wait, clock=lambda: self.now[0])
        self.rng = rng
        self.open: dict[int, object] = {}
        self.expected: dict[int, list] = {}  # handle -> [(utt_start, end)] of flushes not yet finalised
        self.finals: dict[int, list] = {}
        self.windows: dict[int, list] = {}  # handle -> windows stepped in the current utterance
        self.waited: dict[int, int] = {}  # handle -> ticks its ready window has waited
        self.last_flush: dict[int, int] = {}

    def admit(self):
        ms = self.rng.choice(list(MODES))
        r = self.s.admit(ms, MODES[ms])
        self.open[r.handle] = r
        self.expected[r.handle] = []
        self.finals[r.handle] = []
        self.windows[r.handle] = []
        self.waited[r.handle] = 0
        self.last_flush[r.handle] = 0
        return r

    def flush(self, r):
        self.s.flush(r.handle)
        self.expected[r.handle].append((self.last_flush[r.handle], r.written))
        self.last_flush[r.handle] = r.written

    def ready(self, r) -> bool:
        s = self.s
        return s._full_window_ready(r) and not s._awaits_vad(r)

    def tick(self, close_mid_plan=False):
        s = self.s
        before_ready = {h for h, r in self.open.items() if self.ready(r) or (r.flushes and not s._full_window_ready(r))}
        plan = s.plan()
        planned = set(plan.skipped)  # a window skipped as silence was served too
        for batch in plan.steps:
            assert len(batch.rows) <= s.max_batch
            for row in batch.rows:
                assert row.handle in self.open, "work planned for a closed stream"
                assert row.handle not in planned or row.handle in plan.skipped, "two windows of one stream in one tick"
                planned.add(row.handle)
                assert batch.latency_ms == self.open[row.handle].latency_ms
        for f in plan.finals:
            assert f.handle in self.open
            assert f.handle not in planned
            planned.add(f.handle)
            self.finals[f.handle].append((f.utt_start, f.end))
            self.windows[f.handle] = []
        if close_mid_plan and self.open:
            h = self.rng.choice(list(self.open))
            self.close(h)
        for batch in plan.steps:
            for row in batch.rows:
                r = s.step_done(row)
                if row.handle not in self.open:
                    assert r is None
                    continue
                assert r is not None
                shp = self.open[row.handle].shape
                prev = self.windows[row.handle]
                assert (row.window - shp.first_start) % shp.step_mel == 0
                if s.skip_silence is None:
                    assert row.window == (prev[-1] + shp.step_mel if prev else shp.first_start), (prev, row)
                else:
                    assert not prev or row.window > prev[-1]
                prev.append(row.window)
                if row.final:
                    self.finals[row.handle].append((row.utt_start, row.end))
                    self.windows[row.handle] = []
        for row in plan.vad:
            if row.handle in self.open:
                assert row.start == self.open[row.handle].vad_pos and 0 < row.windows <= 32
            r = s.vad_done(row)
            if r is not None and self.rng.random() < 0.3:
                s.heard_voice(r, row.start + row.windows * GEOMETRY.vad_window)
        for h in self.open:
            if h in before_ready and h not in planned:
                self.waited[h] += 1
            else:
                self.waited[h] = 0
        return plan

    def close(self, h):
        self.s.release(h)
        del self.open[h]

    def check(self, bound):
        for h in self.open:
            done = self.finals[h]
            assert done == self.expected[h][: len(done)], (h, done, self.expected[h])
            assert self.waited[h] <= bound, f"stream {h} waited {self.waited[h]} ticks (bound {bound})"

    def drain(self, ticks=4000):
        for _ in range(ticks):
            self.now[0] += 1.0
            self.tick()
            if all(len(self.finals[h]) == len(self.expected[h]) for h in self.open):
                break
        for h in self.open:
            assert self.finals[h] == self.expected[h], (h, self.finals[h], self.expected[h])


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("vad, skip", [(False, None), (True, None), (True, 1600)])
@pytest.mark.parametrize("wait", [0.0, 0.05])
def test_random_sequences_keep_every_flush_final_in_order_and_serve_everyone(seed, vad, skip, wait):
    rng = random.Random(seed)
    max_streams = rng.choice([3, 6, 10])
    max_batch = rng.choice([1, 2, 3])
    f = Fuzz(rng, max_streams, max_batch, vad, skip, wait)
    for _ in range(rng.randint(1, max_streams)):
        f.admit()
    for _ in range(1500):
        a = rng.random()
        if a < 0.45 and f.open:
            r = f.open[rng.choice(list(f.open))]
            f.s.wrote(r, rng.choice([1, 160, 320, 512, 1000, 4000, 16000]))
        elif a < 0.52 and f.open:
            f.flush(f.open[rng.choice(list(f.open))])
        elif a < 0.55 and f.open:
            f.close(rng.choice(list(f.open)))
        elif a < 0.6 and len(f.open) < max_streams:
            f.admit()
        else:
            f.now[0] += 0.01
            f.tick(close_mid_plan=rng.random() < 0.05)
        # With batch_wait 0 a ready window waits a bounded number of ticks (churn: see the test below).
        f.check(bound=3 * max_streams + round(wait / 0.01) + 1)
    f.drain()


def test_a_ready_stream_is_not_starved_when_another_stream_opens_and_closes():
    """max_batch smaller than the ready streams: every stream must be served within a bounded number of
    ticks. Here two streams are always ready (behind real time) and max_batch is 1, while a third stream
    (ready as soon as it opens: its client sent a second at once) opens and closes on alternate ticks.
    The scan used to start at an index into the list of open streams, which shifts as streams come and
    go: it alternated between 1 and 2, and the oldest stream, at index 0, was never first in the scan."""
    s = Scheduler(4, 1, GEOMETRY, vad=False)
    v = s.admit(160, MODES[160])
    b = s.admit(160, MODES[160])
    served = {v.handle: 0, b.handle: 0}

    def tick():
        for batch in s.plan().steps:
            for row in batch.rows:
                served[row.handle] = served.get(row.handle, 0) + 1
                s.step_done(row)

    for r in (v, b):
        s.wrote(r, 600 * 16000)  # far behind: a full window every tick
    tick()
    for _ in range(100):
        c = s.admit(160, MODES[160])
        s.wrote(c, 16000)
        tick()
        s.release(c.handle)
        tick()
    assert served[b.handle] > 0
    assert served[v.handle] > 0, f"stream {v.handle} never served in 201 ticks while ready ({served[b.handle]} for the other)"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed, vad", [(0, True), (1, False)])
def test_engine_mixed_modes_small_batches_random_flushes_equal_offline(ms_model, audio_clips, seed, vad):
    """Real engine, VAD on, three latency modes in one engine, max_batch below the ready streams and a
    batch wait: flush right after open, double flushes, flushes in speech and in silence. Every flush
    gets exactly one Final, in order, equal to that utterance transcribed alone; speech events alternate
    with non-decreasing samples."""
    import asyncio

    import numpy as np

    from monosemantic import Engine, Final, SpeechEnded, SpeechStarted

    model = ms_model("nemotron_rnnt")
    clips = list(audio_clips.values())
    modes = [80, 160, 560]

    async def one(engine, i):
        rng = np.random.default_rng(100 * seed + i)
        stream = await engine.open_stream(latency_ms=modes[i % 3])
        events: list = []

        async def receive():
            async for event in stream:
                events.append(event)

        task = asyncio.create_task(receive())
        utterances, current = [], []
        if i % 2 == 0:
            await stream.flush()  # right after open
            utterances.append(np.zeros(0, np.float32))
        for _ in range(4):
            kind = rng.random()
            if kind < 0.5:
                clip = clips[int(rng.integers(len(clips)))]
                piece = clip[: int(rng.integers(1, min(len(clip), 3 * 16000)))]
            else:
                piece = np.zeros(int(rng.integers(1, 2 * 16000)), np.float32)
            j = 0
            while j < len(piece):
                n = int(rng.integers(1, 4000))
                await stream.push(piece[j : j + n])
                j += n
                if rng.random() < 0.2:
                    await asyncio.sleep(0.001)
            current.append(piece)
            if rng.random() < 0.6:
                await stream.flush()
                utterances.append(np.concatenate(current))
                current = []
                if rng.random() < 0.3:
                    await stream.flush()  # a second flush at the same point: an empty utterance
                    utterances.append(np.zeros(0, np.float32))
        await stream.flush()
        utterances.append(np.concatenate(current) if current else np.zeros(0, np.float32))
        while sum(isinstance(e, Final) for e in events) < len(utterances):
            await asyncio.sleep(0.01)
        await stream.close()
        await task
        return utterances, events

    async def main():
        config = EngineConfig(max_streams=6, max_batch=1, batch_wait_ms=5.0, vad=VADConfig() if vad else None,
                              freeze_gc=False, keep_freed_memory=False)
        async with Engine(model, config) as engine:
            return await asyncio.wait_for(asyncio.gather(*(one(engine, i) for i in range(6))), 100)

    for i, (utterances, events) in enumerate(asyncio.run(main())):
        finals = [e for e in events if isinstance(e, Final)]
        assert len(finals) == len(utterances), i
        pos = 0
        for k, (utt, final) in enumerate(zip(utterances, finals)):
            assert (final.start, final.end) == (pos, pos + len(utt)), (i, k)
            if len(utt):
                expected = model.transcribe(utt, latency_ms=modes[i % 3])
                assert [t.id for t in final.tokens] == expected.token_ids, (i, k)
            else:
                assert final.tokens == [] and final.text == "", (i, k)
            pos += len(utt)
        speech = [e for e in events if isinstance(e, (SpeechStarted, SpeechEnded))]
        assert [type(e) for e in speech] == [SpeechStarted, SpeechEnded] * (len(speech) // 2), i
        assert [e.sample for e in speech] == sorted(e.sample for e in speech), i


def test_a_flushed_utterances_remaining_full_window_does_not_wait_for_a_batch():
    """batch_wait "waits only while ... no flush is pending in the mode" (Scheduler docstring; engine.md:
    "it never waits once ... an utterance is ending"). A flushed stream whose flush point lies past a
    full window still has that window to step before its last, partial one, and it is not held (the mode
    used to count as urgent only when the flushed stream's window was *not* full)."""
    now = [0.0]
    s = Scheduler(4, 8, GEOMETRY, False, batch_wait=lambda latency_ms: 0.05, clock=lambda: now[0])
    a = s.admit(160, MODES[160])
    s.admit(160, MODES[160])  # another stream of the mode, idle
    s.wrote(a, GEOMETRY.window_ready_at(MODES[160], 0) + 1000)  # one full window and a bit
    s.flush(a.handle)  # the utterance ends here
    now[0] = 0.001
    plan = s.plan()
    assert [row.handle for b in plan.steps for row in b.rows] == [a.handle], (
        f"the ending utterance's window was held (wake_in={plan.wake_in})"
    )
