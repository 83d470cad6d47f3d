"""TurnTracker on hand-written engine event sequences: the orderings the real engine produces only with
unlucky timing (speech resuming while a Final is computed, framework flushes inside a turn, text outside
any VAD turn, close mid-turn)."""

from __future__ import annotations

from livekit.agents.stt import SpeechEventType as T

from livekit.plugins.monosemantic.turns import Clock, TurnTracker
from monosemantic import Final, Partial, SpeechEnded, SpeechStarted, Usage, Word

S, I, P, F, E, U = (T.START_OF_SPEECH, T.INTERIM_TRANSCRIPT, T.PREFLIGHT_TRANSCRIPT, T.FINAL_TRANSCRIPT,
                    T.END_OF_SPEECH, T.RECOGNITION_USAGE)


def run(tracker, script):
    """Feed engine events ('flush:<reason>' strings stand for the stream's flush calls); return the
    kinds of the SpeechEvents, and whether each VAD end asked for a flush."""
    out = []
    for step in script:
        if isinstance(step, str):
            tracker.flushed(step.split(":")[1])
            continue
        events, flush = tracker.handle(step)
        out += events
        if flush:
            tracker.flushed("vad")
    return out


def tracker(**kw):
    return TurnTracker(Clock(offset=lambda: 2.0, anchor=lambda: 1000.0), language="en", interim_results=True, **kw)


def test_one_turn_maps_to_start_interim_preflight_final_end_with_times():
    t = tracker()
    words = [Word("hello", 8000, 12000), Word("there", 12800, 16000)]
    events = run(t, [
        SpeechStarted(7000), Partial("hello", "hello"), Partial("hello there", "hello there"), SpeechEnded(17000),
        Final("hello there", words=words, start=0, end=20000), Usage(1.25),
    ])
    assert [e.type for e in events] == [S, I, I, P, F, E, U]
    preflight, final = events[3].alternatives[0], events[4].alternatives[0]
    assert preflight.text == "hello there" and preflight.end_time == 2.0 + 17000 / 16000
    assert (final.start_time, final.end_time) == (2.0, 2.0 + 20000 / 16000)
    assert [(str(w), w.start_time, w.end_time, w.start_time_offset) for w in final.words] == [
        ("hello", 2.5, 2.75, 2.0), ("there", 2.8, 3.0, 2.0)]
    assert events[0].speech_start_time == 1000.0 + 7000 / 16000
    assert events[6].recognition_usage.audio_duration == 1.25
    assert t.idle


def test_speech_resuming_before_the_final_opens_its_turn_after_the_end():
    t = tracker()
    events = run(t, [
        SpeechStarted(0), Partial("a", "a"), SpeechEnded(8000),  # flush A
        SpeechStarted(9000),  # held: turn A is not finished
        SpeechEnded(12000),  # the held segment ends too: flush B
        Final("a", start=0, end=10000),
        Partial("b", "b"),
        Final("b", start=10000, end=13000),
    ])
    # the second turn opens already ending (its speech is over): its late hypothesis is no INTERIM
    assert [e.type for e in events] == [S, I, P, F, E, S, F, E]
    assert events[-2].alternatives[0].text == "b"
    assert t.idle
    # each END at its own turn's VAD end (the second one carried the first turn's, before its own START)
    assert events[4].speech_end_time == 1000.0 + 8000 / 16000
    assert events[5].speech_start_time == 1000.0 + 9000 / 16000
    assert events[7].speech_end_time == 1000.0 + 12000 / 16000


def test_framework_flush_inside_a_turn_gives_a_final_and_keeps_the_turn():
    t = tracker()
    events = run(t, [
        SpeechStarted(0), Partial("one", "one"), "flush:framework", Final("one", start=0, end=8000),
        Partial("two", "two"), SpeechEnded(12000), Final("two", start=8000, end=13000),
    ])
    assert [e.type for e in events] == [S, I, F, I, P, F, E]
    assert [e.alternatives[0].text for e in events if e.type == F] == ["one", "two"]


def test_framework_flush_in_silence_is_acknowledged_with_an_empty_final():
    t = tracker()
    events = run(t, ["flush:framework", Final("", start=0, end=3200)])
    assert [e.type for e in events] == [F] and events[0].alternatives[0].text == ""


def test_text_outside_any_vad_turn_is_delivered_as_its_own_turn():
    t = tracker()
    events = run(t, [Partial("uh", "uh"), "flush:framework", Final("uh", start=0, end=3200)])
    assert [e.type for e in events] == [S, F, E]


def test_close_mid_turn_ends_it_once():
    t = tracker()
    events = run(t, [SpeechStarted(0), Partial("x", "x")])
    assert [e.type for e in events + t.close()] == [S, I, E]
    assert t.close() == []


def test_close_mid_turn_ends_it_where_the_audio_stops_not_at_an_earlier_turns_end():
    t = tracker()
    events = run(t, [SpeechStarted(0), SpeechEnded(8000), Final("a", start=0, end=9000), SpeechStarted(20000)])
    t.pushed = 40000
    events += t.close()
    assert [e.type for e in events] == [S, F, E, S, E]
    assert events[-2].speech_start_time == 1000.0 + 20000 / 16000
    assert events[-1].speech_end_time == 1000.0 + 40000 / 16000  # it was the first turn's end, 8000


def test_without_vad_text_opens_the_turn_and_the_final_closes_it():
    t = tracker(vad=False)
    events = run(t, [Partial("a", "a"), Partial("a b", "a b"), "flush:framework", Final("a b", start=0, end=9000)])
    assert [e.type for e in events] == [S, I, I, F, E]


def test_interim_results_off_sends_no_interims():
    t = TurnTracker(Clock(offset=lambda: 0.0, anchor=lambda: 0.0), language="en", interim_results=False)
    events = run(t, [SpeechStarted(0), Partial("a", "a"), SpeechEnded(4000), Final("a", start=0, end=5000)])
    assert [e.type for e in events] == [S, P, F, E]


def test_without_vad_a_turn_after_a_pause_starts_where_its_text_begins():
    """Without VAD the turn opens at the first Partial with text. It was dated at the utterance's start
    (the previous flush), so after a pause LiveKit got a speech_start_time seconds (minutes) too early.
    The engine sends no Partial in silence: the text lies in the chunk that ends at that Partial's
    `end`, and not before a Partial of the utterance whose tokens made no text yet."""
    chunk = 2560  # 160 ms
    t = tracker(vad=False, chunk=chunk)
    events = run(t, [Partial("hi", "hi", 0, 1440), "flush:framework", Final("hi", start=0, end=48000),
                     # 5 s of silence: no events; then the step that finds text ends at 129920 (8.12 s)
                     Partial("and", "and", 48000, 129920)])
    assert [e.type for e in events] == [S, I, F, E, S, I]
    assert events[0].speech_start_time == 1000.0  # max(0, 1440 - chunk)
    assert events[4].speech_start_time == 1000.0 + (129920 - chunk) / 16000  # was 1000.0 + 3.0
    assert events[5].alternatives[0].start_time == 2.0 + 48000 / 16000  # the INTERIM spans the utterance

    t = tracker(vad=False, chunk=chunk)
    events = run(t, [Partial("", "", 0, 128000), Partial("so", "so", 0, 129920)])
    assert events[0].speech_start_time == 1000.0 + 128000 / 16000  # audio up to 128000 had no text


def test_text_outside_any_turn_starts_at_its_first_word():
    t = tracker()
    events = run(t, [SpeechStarted(0), SpeechEnded(8000), Final("a", start=0, end=9000),
                     "flush:framework", Final("uh", words=[Word("uh", 40000, 44000)], start=9000, end=48000)])
    assert [e.type for e in events] == [S, F, E, S, F, E]
    assert events[3].speech_start_time == 1000.0 + 40000 / 16000  # not the Final's start, 9000


def test_turn_times_never_go_backwards_when_the_clock_moves_back():
    """The stream's wall clock can move back between two events: a frame the event loop delayed starts
    a stretch of input dated by its arrival, and its backlog, arriving right behind it, dates it back
    (by up to the delay). A START sent in between was late by that much, and the END after it (or the
    next turn's START) could come before it."""
    anchor = [1000.0]
    t = TurnTracker(Clock(offset=lambda: 0.0, anchor=lambda: anchor[0]), language="en", interim_results=True)
    events = run(t, [SpeechStarted(16000)])
    anchor[0] -= 0.5  # the backlog came
    events += run(t, [SpeechEnded(20000), Final("", end=20000)])
    anchor[0] -= 0.5
    events += run(t, [SpeechStarted(24000)])
    times = [e.speech_start_time if e.type == S else e.speech_end_time for e in events if e.type in (S, E)]
    assert len(times) == 3 and times == sorted(times)
    # a retried run's tracker goes on from where this one stopped
    later = TurnTracker(Clock(offset=lambda: 0.0, anchor=lambda: 990.0), language="en", interim_results=True,
                        not_before=t.last_wall)
    [start] = run(later, [SpeechStarted(0)])
    assert start.speech_start_time >= times[-1]
