"""The scheduler on its own, without torch or a model: what it plans each tick, and when."""

from __future__ import annotations

import subprocess
import sys

import pytest

from monosemantic.errors import CapacityError
from monosemantic.engine.scheduler import AudioGeometry, Scheduler
from monosemantic.streaming.shape import ModeShape

GEOMETRY = AudioGeometry(hop=160, n_fft=512, reach=200)


def shape(right: int) -> ModeShape:
    return ModeShape(context=(70, right), factor=8, chunk_frames=right + 1, cache_frames=70, step_mel=8 * (right + 1), first_start=-7)


def make(max_streams=4, max_batch=8, vad=False) -> Scheduler:
    return Scheduler(max_streams, max_batch, GEOMETRY, vad)


def run(scheduler: Scheduler):
    """One tick: plan, then apply every row as a runner would. Returns the plan."""
    plan = scheduler.plan()
    for batch in plan.steps:
        for row in batch.rows:
            scheduler.step_done(row)
    for row in plan.vad:
        scheduler.vad_done(row)
    return plan


def samples_for_windows(k: int, step_mel: int) -> int:
    """Samples needed before the k-th window (0-based) of an utterance starting at 0 is full."""
    last_frame = -7 + k * step_mel + step_mel - 1
    return 160 * last_frame + 200


def test_no_torch_import():
    code = "import sys; sys.modules['torch'] = None; import monosemantic.engine.scheduler, monosemantic.engine.config; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_plans_a_window_exactly_when_its_audio_is_complete():
    s = make()
    r = s.admit(160, shape(1))
    need = samples_for_windows(0, 16)
    r.written = need - 1
    assert run(s).empty
    r.written = need
    plan = run(s)
    (row,) = plan.steps[0].rows
    assert (row.window, row.lo, row.hi, row.final) == (-7, 8, 17, False)
    assert run(s).empty  # the next window needs more audio
    r.written = samples_for_windows(1, 16)
    (row,) = run(s).steps[0].rows
    assert (row.window, row.lo) == (9, 0)


def test_one_window_per_stream_per_tick_while_catching_up():
    s = make()
    r = s.admit(80, shape(0))
    r.written = samples_for_windows(9, 8)  # ten windows available at once
    windows = [run(s).steps[0].rows[0].window for _ in range(10)]
    assert windows == [-7 + 8 * k for k in range(10)]
    assert run(s).empty


def test_modes_are_grouped_and_batches_capped():
    s = make(max_streams=8, max_batch=3)
    records = [s.admit(160 if i % 2 else 80, shape(1 if i % 2 else 0)) for i in range(8)]
    for r in records:
        r.written = 10 * 16000
    plan = s.plan()
    assert sorted(b.latency_ms for b in plan.steps) == [80, 160]
    assert all(len(b.rows) == 3 for b in plan.steps)
    served = {row.handle for b in plan.steps for row in b.rows}
    for b in plan.steps:
        for row in b.rows:
            s.step_done(row)
    # the next tick starts its scan elsewhere: the streams left out are served first
    nxt = {row.handle for b in s.plan().steps for row in b.rows}
    assert nxt - served


def test_flush_gives_full_windows_then_a_partial_then_the_final():
    s = make()
    r = s.admit(160, shape(1))
    r.written = 12345  # 77 valid frames: windows at -7, 9, 25, 41, 57, 73
    s.flush(r.handle)
    r.written = 20000  # audio after the flush belongs to the next utterance
    rows = []
    while True:
        plan = run(s)
        rows += [row for b in plan.steps for row in b.rows]
        if plan.finals or (rows and rows[-1].final):
            break
    assert [row.window for row in rows] == [-7, 9, 25, 41, 57, 73]
    assert all(row.end == 12345 for row in rows)
    assert [row.final for row in rows] == [False] * 5 + [True]
    assert rows[-1].hi == 1 + (77 - 73)
    assert r.utt_start == 12345 and r.next_window == 0 and not r.flushes


def test_flush_without_audio_is_an_immediate_final():
    s = make()
    r = s.admit(160, shape(1))
    s.flush(r.handle)
    plan = run(s)
    assert not plan.steps and len(plan.finals) == 1
    assert (plan.finals[0].utt_start, plan.finals[0].end) == (0, 0)


def test_flush_after_a_full_window_with_no_new_frame_needs_no_step():
    s = make()
    r = s.admit(80, shape(0))
    r.written = samples_for_windows(0, 8)  # 200 samples: window [-7, 1) is full; 1 valid frame
    assert len(run(s).steps) == 1
    s.flush(r.handle)
    plan = run(s)
    assert not plan.steps and [(f.utt_start, f.end) for f in plan.finals] == [(0, 200)]


def test_flush_at_an_earlier_sample_ends_the_utterance_there():
    """Input faster than real time: the engine has read none of the audio yet, so a flush at a sample
    before the end of what was written ends the utterance exactly there, and the audio after it is the
    next utterance's."""
    s = make()
    r = s.admit(160, shape(1))
    r.written = 30000
    assert s.flush(r.handle, at=12345) == 12345
    rows = []
    while not (rows and rows[-1].final):
        rows += [row for b in run(s).steps for row in b.rows]
    assert [row.window for row in rows] == [-7, 9, 25, 41, 57, 73] and all(row.end == 12345 for row in rows)
    assert r.utt_start == 12345 and r.next_window == 0 and not r.flushes
    assert s.flush(r.handle, at=40000) == 30000  # past what was written: a plain flush


def test_flush_at_a_sample_already_read_moves_up_to_the_audio_the_steps_read():
    """A cut inside audio a step has read would put that audio into two utterances: the point moves up
    to the end of what the utterance's steps read (a planned step's included), never before an earlier
    flush point."""
    s = make()
    r = s.admit(160, shape(1))
    r.written = samples_for_windows(1, 16) + 500
    run(s)  # window 0
    assert s.cut_bound(r) == samples_for_windows(0, 16)
    plan = s.plan()  # window 1 planned, not done: its audio is being read
    assert len(plan.steps) == 1 and r.stepping
    point = s.flush(r.handle, at=100)
    assert point == samples_for_windows(1, 16) < r.written
    for row in plan.steps[0].rows:
        s.step_done(row)
    final_plan = run(s)
    assert not final_plan.steps and [(f.utt_start, f.end) for f in final_plan.finals] == [(0, point)]
    assert r.utt_start == point
    # flushes already queued: a later one never cuts before them
    r.written += 8000
    first = s.flush(r.handle)
    assert s.flush(r.handle, at=point + 10) == first == r.written


def test_a_final_or_a_skip_needing_no_step_does_not_wait_for_room_in_a_full_batch():
    """A full step (max_batch rows) used to stop the scan of its mode: a stream whose next action runs no
    model work (its Final after a flush with nothing left to encode, or a window skipped as silence)
    waited a tick behind it."""
    s = Scheduler(4, 1, GEOMETRY, vad=True, skip_silence=1600)
    busy, ending, silent = (s.admit(160, shape(1)) for _ in range(3))
    busy.written = samples_for_windows(0, 16)
    busy.vad_pos = busy.written
    s.heard_voice(busy, busy.written)  # speech: its window is stepped
    s.flush(ending.handle)  # nothing to encode: an immediate Final
    silent.written = silent.vad_pos = 16000  # judged silent, more than 100 ms after the last speech
    silent.next_window = 4
    s._place(silent)
    plan = s.plan()
    assert [row.handle for b in plan.steps for row in b.rows] == [busy.handle]
    assert [f.handle for f in plan.finals] == [ending.handle]
    assert plan.skipped == (silent.handle,)


def test_capacity_and_slot_reuse_bump_the_generation():
    s = make(max_streams=2)
    a = s.admit(80, shape(0))
    s.admit(80, shape(0))
    with pytest.raises(CapacityError, match="maximum of 2 streams"):
        s.admit(80, shape(0))
    a.written = 10 * 16000
    plan = s.plan()
    row = plan.steps[0].rows[0]
    s.release(a.handle)
    c = s.admit(80, shape(0))
    assert c.slot == a.slot and c.generation == a.generation + 1
    assert row.handle == a.handle and s.step_done(row) is None  # a closed stream's result is dropped


def test_backpressure_accounting():
    s = make(vad=True)
    r = s.admit(160, shape(1))
    r.written = 8000
    # nothing read yet: all written audio (plus the analysis lead-in) is buffered
    assert s.buffered(r) >= 8000
    run(s)  # VAD consumes windows; ASR has no full window yet
    before = s.buffered(r)
    r.written = 16000
    for _ in range(40):
        run(s)
    assert s.buffered(r) < before + 8000


def test_skip_silence_skips_vad_checked_silence_and_restarts_at_speech():
    s = Scheduler(4, 8, GEOMETRY, vad=True, skip_silence=16000)  # 1 s
    r = s.admit(160, shape(1))
    r.written = 5 * 16000
    planned = []
    for _ in range(400):  # the VAD reads the whole 5 s of silence; the encoder runs only its first second
        plan = run(s)
        planned += [row for b in plan.steps for row in b.rows]
    assert r.vad_pos >= 5 * 16000 - 512
    # windows whose audio starts within 1 s of the (absent) last speech are encoded, later ones skipped
    assert planned and all(160 * row.window - 256 < 16000 for row in planned)
    assert r.skipped_frames > 0
    skipped = r.skipped_frames
    s.heard_voice(r, r.vad_pos)  # speech resumes
    r.written += 16000
    row = next(row for _ in range(50) for b in run(s).steps for row in b.rows)
    assert row.restart_frames == skipped and row.lo == 8 and r.skipped_frames == 0


def test_silence_before_a_flush_is_skipped_but_the_utterance_still_ends_with_a_step():
    s = Scheduler(4, 8, GEOMETRY, vad=True, skip_silence=1600)
    r = s.admit(80, shape(0))
    r.written = 3 * 16000 + 100
    s.flush(r.handle)
    rows = []
    for _ in range(300):
        plan = run(s)
        rows += [row for b in plan.steps for row in b.rows]
        if plan.finals or (rows and rows[-1].final):
            break
    windows = -(-(GEOMETRY.valid_frames(3 * 16000 + 100) + 7) // 8)  # windows at -7, 1, ... below 300
    assert len(rows) < windows / 2  # most of 3 s of silence skipped
    assert rows[-1].final and rows[-1].restart_frames > 0  # the last step restarts after the skip


@pytest.mark.parametrize("written", [16873, 16000 * 2 + 300, 512 * 40, 512 * 40 + 511])
def test_skip_silence_flush_ends_even_when_the_vad_cannot_judge_the_last_audio(written):
    """The VAD judges whole 512-sample windows; a flushed utterance whose last full encoder window ends in
    the incomplete last VAD window (or one whole VAD window short) must still end (it used to wait
    forever for a judgement that needs audio the caller never sends)."""
    s = Scheduler(4, 8, GEOMETRY, vad=True, skip_silence=16000)
    r = s.admit(160, shape(1))
    r.written = written
    s.flush(r.handle)
    for _ in range(500):
        plan = run(s)
        if plan.finals or any(row.final for b in plan.steps for row in b.rows):
            break
    else:
        raise AssertionError(f"no Final planned: vad_pos={r.vad_pos}, next_window={r.next_window}")
    assert r.utt_start == written and not r.flushes


def test_a_ready_window_waits_for_its_mode_counted_from_the_write_that_completed_it():
    """batch_wait: a ready window is held for the mode's other streams, at most batch_wait after the write
    that made it ready; never when every stream of the mode is ready; never when an utterance ends. The
    wait is asked at every plan, so a changed wait applies at once."""
    now, wait = [0.0], [0.05]
    s = Scheduler(4, 8, GEOMETRY, False, batch_wait=lambda latency_ms: wait[0], clock=lambda: now[0])
    a, b = s.admit(160, shape(1)), s.admit(160, shape(1))
    assert s.wrote(a, samples_for_windows(0, 16))  # ready now, at t = 0
    now[0] = 0.03
    plan = run(s)
    assert not plan.steps and plan.wake_in == pytest.approx(0.02)  # held until 0.05
    now[0] = 0.05
    assert [row.handle for row in run(s).steps[0].rows] == [a.handle]  # b never came: a runs alone
    # Both streams ready: nothing to wait for.
    now[0] = 0.1
    s.wrote(a, samples_for_windows(1, 16) - a.written)
    s.wrote(b, samples_for_windows(0, 16))
    assert sorted(row.handle for row in run(s).steps[0].rows) == sorted([a.handle, b.handle])
    # The wait shrinks to zero: a ready window runs at once.
    now[0] = 0.2
    s.wrote(a, samples_for_windows(2, 16) - a.written)
    wait[0] = 0.0
    assert [row.handle for row in run(s).steps[0].rows] == [a.handle]
    # A flush in the mode: its last step and every ready window run at once, whatever the wait.
    wait[0] = 10.0
    now[0] = 0.3
    s.wrote(a, samples_for_windows(3, 16) - a.written)
    s.wrote(b, 1000)
    s.flush(b.handle)
    plan = run(s)
    assert {row.handle for row in plan.steps[0].rows} == {a.handle, b.handle}


def test_audio_written_while_a_stream_steps_does_not_start_its_next_windows_wait_early():
    """A write during a stream's step must not count as its next window becoming ready (the scheduler
    still names the window in flight); a window already complete when the step ends is due at once."""
    now = [0.0]
    s = Scheduler(4, 8, GEOMETRY, False, batch_wait=lambda latency_ms: 0.05, clock=lambda: now[0])
    a = s.admit(160, shape(1))
    s.admit(160, shape(1))  # a second stream, never ready: a's windows may wait for it
    s.wrote(a, samples_for_windows(0, 16))
    now[0] = 0.05
    plan = s.plan()  # a's first window, alone (b has nothing)
    now[0] = 0.06
    s.wrote(a, 100)  # during the step: the window in flight is "full", but it is not a new one
    assert a.ready_since is None
    for row in plan.steps[0].rows:
        s.step_done(row)
    now[0] = 0.10
    s.wrote(a, samples_for_windows(1, 16) - a.written)  # the next window, complete at 0.10
    assert a.ready_since == 0.10
    now[0] = 0.12
    assert not s.plan().steps  # held until 0.15
    now[0] = 0.16
    plan = s.plan()
    now[0] = 0.17
    s.wrote(a, samples_for_windows(2, 16) - a.written)  # the window after it, complete during the step
    for row in plan.steps[0].rows:
        s.step_done(row)
    assert [row.handle for row in s.plan().steps[0].rows] == [a.handle]  # behind: runs at once


@pytest.mark.parametrize("right", [0, 1, 6])
def test_step_timing_names_the_samples_at_which_each_window_becomes_ready(right):
    """The StepTiming a server tells its clients (so that they may gather audio up to its points) is
    exact: with one sample less a window is not ready, at its point it is, in every utterance."""
    s = make()
    r = s.admit(160, shape(right))
    timing = GEOMETRY.step_timing(r.shape, vad=False)
    assert timing.vad_window is None and GEOMETRY.step_timing(r.shape, vad=True).vad_window == 512
    for utterance in range(2):
        start = r.utt_start
        for k in range(4):
            point = start + timing.first + k * timing.every
            assert point == start + samples_for_windows(k, r.shape.step_mel)
            r.written = point - 1
            assert not s.has_work(r) and run(s).empty
            r.written = point
            assert s.has_work(r)
            (row,) = run(s).steps[0].rows
            assert row.window == r.shape.first_start + k * r.shape.step_mel
        s.flush(r.handle)  # the next utterance's points count from here
        while r.flushes:
            run(s)
        assert r.utt_start == r.written


@pytest.mark.parametrize("skip_silence", [None, 1600])
def test_positions_kept_per_stream_follow_every_change_of_its_window(skip_silence):
    """The scheduler keeps each stream's next-window point and first read position instead of computing
    them at every push and plan: through random writes, flushes, skipped silence and ticks they must
    equal the formulas they stand for."""
    import random

    rng = random.Random(0)
    s = Scheduler(4, 2, GEOMETRY, vad=True, skip_silence=skip_silence)
    records = [s.admit(ms, shape(right)) for ms, right in ((160, 1), (80, 0), (160, 1))]
    for _ in range(600):
        r = rng.choice(records)
        action = rng.random()
        if action < 0.6:
            s.wrote(r, rng.choice([320, 512, 1600, 4000]))
        elif action < 0.7:
            s.flush(r.handle)
        elif action < 0.8 and skip_silence is not None:
            s.heard_voice(r, r.written)
        else:
            run(s)
        for x in records:
            assert x.ready_at == x.utt_start + GEOMETRY.window_ready_at(x.shape, x.next_window)
            assert x.asr_from == GEOMETRY.step_first(x.utt_start, x.window_start())
            assert s.has_work(x) == (
                x.ready_at <= (x.flushes[0] if x.flushes else x.written) or x.written - x.vad_pos >= 1024
            )


def test_a_lone_vad_window_is_run_at_most_vad_wait_after_it_was_found():
    """engine.md: a single VAD window with no audio after it yet "waits at most 64 ms". The plan asked to
    be made again a whole VAD_WAIT later at every plan, not for what was left of it: a loop woken by
    something else at 50 ms (or sleeping its 50 ms at most) then slept another 64, and the window waited
    about 100 ms (its SpeechEnded as late)."""
    from monosemantic.engine.scheduler import VAD_WAIT

    now = [0.0]
    s = Scheduler(4, 8, GEOMETRY, True, clock=lambda: now[0])
    r = s.admit(160, shape(1))
    s.wrote(r, GEOMETRY.vad_window)  # one window, no encoder window yet
    plan = run(s)
    assert plan.empty and plan.wake_in == pytest.approx(VAD_WAIT)
    now[0] = 0.05
    plan = run(s)
    assert plan.empty and plan.wake_in == pytest.approx(VAD_WAIT - 0.05)
    now[0] = VAD_WAIT
    (row,) = run(s).vad
    assert (row.start, row.windows) == (0, 1)
