"""The scheduler under random open/write/flush/close/tick sequences (a fake runner, no torch), and the
engine under mixed modes, small batches and random flushes: every flush gets its one Final, in order, and
no stream waits without bound."""

from __future__ import annotations

import random

import pytest

from monosemantic import EngineConfig, VADConfig
from monosemantic.engine.scheduler import AudioGeometry, Scheduler
from monosemantic.streaming.shape import ModeShape

from _support.cuts import check_cut_finals, drive_with_cuts

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
        # handle -> the end of the audio the current utterance's steps (planned, done or skipped) read: a
        # flush(at=...) must never cut before it, and every step must read only its utterance's audio.
        self.read_end: dict[int, int] = {}
        self.rows: dict[int, list] = {}  # handle -> (utt_start, read end) of every step row since its last Final

    def admit(self):
        ms = self.rng.choice(list(MODES))
        r = self.s.admit(ms, MODES[ms])
        self.open[r.handle] = r
        self.expected[r.handle] = []
        self.finals[r.handle] = []
        self.windows[r.handle] = []
        self.waited[r.handle] = 0
        self.last_flush[r.handle] = 0
        self.read_end[r.handle] = 0
        self.rows[r.handle] = []
        return r

    def flush(self, r, at=None):
        h, last = r.handle, self.last_flush[r.handle]
        # Where a cut may go: after the last flush point still pending, else after what the current
        # utterance's steps have read (planned, done, or skipped as silence).
        floor = last if r.flushes else max(last, self.read_end[h])
        point = self.s.flush(h, at)
        if at is None or at >= r.written:
            assert point == r.written, (at, point, r.written)
        else:
            assert point == max(at, floor), (at, point, floor, r.written)
        assert last <= point <= r.written
        self.expected[h].append((last, point))
        self.last_flush[h] = point
        return point

    def pick_at(self, r):
        """A flush point of every kind: none, 0, the last flush point, behind the encoder, anywhere in the
        audio written, at its end, past it."""
        h, rng = r.handle, self.rng
        kind = rng.randrange(8)
        if kind == 0:
            return None
        if kind == 1:
            return 0
        if kind == 2:
            return self.last_flush[h]
        if kind == 3:
            return rng.randint(0, max(0, self.read_end[h]))
        if kind == 4:
            return r.written
        if kind == 5:
            return r.written + rng.randint(1, 5000)
        return rng.randint(min(self.last_flush[h], r.written), r.written)

    def _read(self, r, row_utt, window) -> int:
        """The end of the audio a full window's step reads (the last frame's analysis span)."""
        return row_utt + GEOMETRY.hop * (window + r.shape.step_mel - 1) + GEOMETRY.reach

    def _finalised(self, h, start, end):
        for utt, read in self.rows[h]:
            assert utt == start, f"stream {h}: a step of the utterance from {utt} in the one from {start}"
            assert read <= end, f"stream {h}: a step read up to {read}, past its utterance's end {end}"
        self.rows[h] = []
        self.read_end[h] = end

    def ready(self, r) -> bool:
        s = self.s
        return s._full_window_ready(r) and not s._awaits_vad(r)

    def tick(self, close_mid_plan=False, during=None):
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
                r = self.open[row.handle]
                read = row.end if row.final else self._read(r, row.utt_start, row.window)
                assert row.final or read <= row.end, f"a full window planned before its audio ({read} > {row.end})"
                self.rows[row.handle].append((row.utt_start, read))
                self.read_end[row.handle] = max(self.read_end[row.handle], read)
        for h in plan.skipped:
            r = self.open[h]
            self.read_end[h] = max(self.read_end[h], self._read(r, r.utt_start, r.window_start() - r.shape.step_mel))
        for f in plan.finals:
            assert f.handle in self.open
            assert f.handle not in planned
            planned.add(f.handle)
            self.finals[f.handle].append((f.utt_start, f.end))
            self.windows[f.handle] = []
            self._finalised(f.handle, f.utt_start, f.end)
        if during is not None:
            during()  # pushes and flushes while the planned steps run
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
                    self._finalised(row.handle, row.utt_start, row.end)
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

    def write_or_flush_at(self):
        """A random write, or a flush at a random point, on a random open stream."""
        if not self.open:
            return
        r = self.open[self.rng.choice(list(self.open))]
        if self.rng.random() < 0.5:
            self.s.wrote(r, self.rng.choice([1, 160, 512, 1000, 4000, 16000]))
        else:
            self.flush(r, self.pick_at(r))

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


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("vad, skip", [(False, None), (True, None), (True, 1600)])
def test_random_sequences_with_flushes_at_a_sample_cover_the_audio_once_in_order(seed, vad, skip):
    """flush(at=...) mixed in: at 0, at an earlier flush point, behind the encoder, inside a step being
    planned or run (a flush and a write while the tick's steps run), at and past the end of the audio.
    Each flush's point is the earliest allowed (`at`, moved up past what the utterance's steps read and
    past an earlier flush point); the Finals cover [previous point, point) in order; no step reads audio
    past its utterance's end or belongs to another utterance."""
    rng = random.Random(1000 + seed)
    max_streams = rng.choice([2, 4])
    f = Fuzz(rng, max_streams, rng.choice([1, 2]), vad, skip, rng.choice([0.0, 0.05]))
    for _ in range(max_streams):
        f.admit()
    for _ in range(1200):
        a = rng.random()
        r = f.open[rng.choice(list(f.open))] if f.open else None
        if a < 0.4 and r is not None:
            f.s.wrote(r, rng.choice([1, 160, 320, 512, 1000, 4000, 16000]))
        elif a < 0.55 and r is not None:
            f.flush(r, f.pick_at(r))
        elif a < 0.57 and r is not None:
            f.close(r.handle)
        elif a < 0.6 and len(f.open) < max_streams:
            f.admit()
        else:
            f.now[0] += 0.01
            f.tick(during=f.write_or_flush_at if rng.random() < 0.3 else None)
        f.check(bound=3 * max_streams + round(f.s.batch_wait(80) / 0.01) + 1)
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




@pytest.mark.timeout(180)
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("vad, skip, coalesce", [(True, None, True), (False, None, True), (False, None, False), (True, 480, True)])
def test_engine_random_flushes_at_a_sample_equal_offline(ms_model, audio_clips, vad, skip, coalesce, sync):
    """Mixed latency modes, max_batch 1, input at 16 kHz and resampled (8 / 44.1 / 48 kHz), flush(at=...)
    at random points (0, an earlier flush point, behind the engine, inside the audio, past its end)
    among plain flushes: every flush's point is its Final's end, the Finals cover the model-rate audio
    once and in order, each equal to its span transcribed alone (without skip_silence); the speech
    events are those of a twin stream given the same audio with no cut."""
    import asyncio
    import random

    import monosemantic
    from monosemantic import Engine, Final, SpeechEnded, SpeechStarted, Usage

    model = ms_model("nemotron_rnnt")
    clips = list(audio_clips.values())
    modes = [80, 160, 560]
    rates = [16000, 8000, 44100, 48000]
    config = EngineConfig(max_streams=8, max_batch=1, batch_wait_ms=2.0, vad=VADConfig() if vad else None,
                          skip_silence_ms=skip, coalesce_pushes=coalesce, freeze_gc=False, keep_freed_memory=False)

    async def one(engine, i):
        rng = random.Random(7 * i + 13 * vad + 3 * coalesce + sync)
        rate = rates[i % len(rates)]
        opened = []
        for _ in range(2 if vad else 1):
            if sync:
                opened.append(engine.open_stream(latency_ms=modes[i % 3], sample_rate=rate))
            else:
                opened.append(await engine.open_stream(latency_ms=modes[i % 3], sample_rate=rate))
        call = (lambda f, *a, **k: asyncio.to_thread(f, *a, **k)) if sync else None  # noqa: E731
        stream, twin = opened[0], (opened[1] if vad else None)
        timing = stream.timing if stream._coalescer is not None else None
        audio, flushes = await drive_with_cuts(stream, rng, clips, rate, timing, call, twin)
        plain = sum(not cut for _, cut, _, _ in flushes)

        async def until_last_final(s, flushes):
            """The events up to its last Final, then those after close() (a closing SpeechEnded)."""
            events = []
            while sum(isinstance(e, Final) for e in events) < flushes:
                events.append(await (asyncio.to_thread(s.get, 60) if sync else s.__anext__()))
            await (asyncio.to_thread(s.close) if sync else s.close())
            closing = [e async for e in s] if not sync else list(await asyncio.to_thread(lambda: list(s.events(60))))
            return events, closing

        return audio, flushes, *[await until_last_final(s, n) for s, n in zip(opened, (len(flushes), plain))]

    async def main(engine):
        return await asyncio.wait_for(asyncio.gather(*(one(engine, i) for i in range(4))), 150)

    if sync:
        with monosemantic.SyncEngine(model, config) as engine:
            results = asyncio.run(main(engine))
    else:
        async def run():
            async with Engine(model, config) as engine:
                return await main(engine)
        results = asyncio.run(run())

    for i, (audio, flushes, (events, closing), *twin) in enumerate(results):
        finals = [e for e in events if isinstance(e, Final)]
        check_cut_finals(model, modes[i % 3], audio, flushes, finals, tokens=skip is None)
        usage = sum(e.audio_seconds for e in events + closing if isinstance(e, Usage))
        assert abs(usage * 16000 - len(audio)) < 1, (i, usage * 16000, len(audio))
        speech = [e for e in events + closing if isinstance(e, (SpeechStarted, SpeechEnded))]
        assert [type(e) for e in speech] == [SpeechStarted, SpeechEnded] * (len(speech) // 2), i
        assert [e.sample for e in speech] == sorted(e.sample for e in speech), i
        if twin:  # the VAD hears the stream's audio whatever the cuts (up to where each was closed)
            ours, alone = ([(type(e), e.sample) for e in x if isinstance(e, (SpeechStarted, SpeechEnded))]
                           for x in (events, twin[0][0]))
            n = min(len(ours), len(alone))
            assert ours[:n] == alone[:n], (i, ours, alone)
