"""The plugin's RecognizeStream against the real livekit-agents base classes and a real engine (tiny
checkpoint, CPU): transcripts equal offline transcription, event invariants, turns on speech with
silences, shared engine across concurrent streams, flush, aclose, recognize(), options and errors."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from livekit.agents import APIConnectionError, APIConnectOptions, APIStatusError
from livekit.agents.stt import SpeechEventType as T

import monosemantic
from livekit.plugins import monosemantic as lk_monosemantic

from _support.streams import PassThroughStream

pytestmark = pytest.mark.timeout(300)

NO_VAD = monosemantic.EngineConfig(vad=None)


def finals(events):
    return [e.alternatives[0] for e in events if e.type == T.FINAL_TRANSCRIPT]


def of_type(events, kind):
    return [e for e in events if e.type == kind]


def test_final_equals_offline_transcription_at_16k(checkpoint, ms_model, audio_clips, lk):
    """No VAD: the only utterance boundary is the framework's flush, so the FINAL covers the whole clip
    and must equal the engine's offline transcription of it."""
    audio = audio_clips["jfk.wav"]
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160)

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        return await lk.drive(stt.stream(), audio)

    events = asyncio.run(main())
    [final] = finals(events)
    assert final.text == expected.text and final.text
    assert [str(w) for w in final.words] == [w.text for w in expected.words]
    # (the base class adds the wall time between its start and the first run to the offset: ~0)
    assert final.start_time == pytest.approx(0.0, abs=0.01)
    assert final.end_time == pytest.approx(len(audio) / 16000, abs=0.03)
    turns = lk.check_invariants(events, len(audio) / 16000)
    assert len(turns) == 1 and turns[0][-2].type == T.FINAL_TRANSCRIPT  # START .. FINAL, END
    interims = [e.alternatives[0].text for e in of_type(events, T.INTERIM_TRANSCRIPT)]
    assert interims and all(final.text.startswith(t) for t in interims)
    # an interim spans the audio it has transcribed so far: its end grows, up to the final's
    ends = [e.alternatives[0].end_time for e in of_type(events, T.INTERIM_TRANSCRIPT)]
    assert ends == sorted(ends) and ends[0] > 0.0 and ends[-1] <= final.end_time + 1e-6
    # usage reports exactly the audio pushed
    usage = sum(e.recognition_usage.audio_duration for e in of_type(events, T.RECOGNITION_USAGE))
    assert usage == pytest.approx(len(audio) / 16000, abs=1e-6)


def test_48k_webrtc_frames_hold_the_event_invariants(checkpoint, audio_clips, lk):
    audio = lk.speech_with_silences(audio_clips, gaps=(1.2,), tail=1.0)[: 16000 * 14]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        stream = stt.stream()
        stream.start_time_offset = 3.5  # as the session sets it: times are session-relative
        return await lk.drive(stream, audio, rate=48000, realtime_factor=4.0)

    events = asyncio.run(main())
    turns = lk.check_invariants(events, len(audio) / 16000, offset=3.5)
    assert len(turns) >= 2
    for i, turn in enumerate(turns):
        kinds = [e.type for e in turn]
        assert kinds[0] == T.START_OF_SPEECH and kinds[-1] == T.END_OF_SPEECH
        if i < len(turns) - 1 or T.FINAL_TRANSCRIPT in kinds:
            # FINAL precedes END, so stt turn detection sees the text (only a turn the VAD opened after
            # the last flush, closed by the end of the stream, has no FINAL of its own)
            assert kinds[-2] == T.FINAL_TRANSCRIPT
        if T.PREFLIGHT_TRANSCRIPT in kinds:
            assert kinds.index(T.PREFLIGHT_TRANSCRIPT) < kinds.index(T.FINAL_TRANSCRIPT)
    assert any(f.text for f in finals(events))
    assert all(f.start_time >= 3.5 for f in finals(events))


def test_turns_follow_the_speech_on_audio_with_silences(checkpoint, audio_clips, lk):
    """Three clips separated by silences: three turns, each closed by a FINAL and exactly one END, in
    order, at the places the speech is."""
    audio = lk.speech_with_silences(audio_clips)
    starts = np.cumsum([0.5] + [len(audio_clips[k]) / 16000 + g for k, g in zip(
        ("jfk.wav", "sense_and_sensibility_01_austen_64kb-0880.wav", "61-70968-0000.flac"), (1.5, 2.0, 1.2))])

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        return await lk.drive(stt.stream(), audio, realtime_factor=4.0)

    events = asyncio.run(main())
    turns = lk.check_invariants(events, len(audio) / 16000)
    texts = [[e.alternatives[0].text for e in turn if e.type == T.FINAL_TRANSCRIPT] for turn in turns]
    assert len(turns) >= 3 and any(texts[0])
    # each clip's onset lies inside (or right at) some turn's transcribed span
    spans = [(f.start_time, f.end_time) for f in finals(events) if f.text]
    for onset in starts[:3]:
        assert any(a - 0.5 <= onset <= b for a, b in spans), (onset, spans)
    # turns do not overlap in time
    bounds = [(t[0].created_at, t[-1].created_at) for t in turns]
    assert all(b[1] <= c[0] for b, c in zip(bounds, bounds[1:]))


def test_eight_concurrent_streams_share_one_engine(checkpoint, ms_model, audio_clips, lk):
    clips = list(audio_clips.values())[:8]
    model = ms_model("nemotron_rnnt")

    async def one(i):
        # one STT per session, as AgentSession would have: they must still share the engine
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        await asyncio.sleep(0.05 * i)
        return await lk.drive(stt.stream(), clips[i % len(clips)])

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    results = asyncio.run(main())
    assert len(monosemantic.engine.shared.shared_engines()) == 1
    for i, events in enumerate(results):
        [final] = finals(events)
        assert final.text == model.transcribe(clips[i % len(clips)], latency_ms=160).text, f"stream {i}"


def _open_streams(engine) -> int:
    return len(engine.core.streams)


def test_flush_finalizes_what_was_pushed_and_the_stream_goes_on(checkpoint, ms_model, audio_clips, lk):
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()  # the stream stays open
        await lk.wait_for(lambda: finals(events))
        first = list(events)
        await lk.feed(stream, b)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return first, events

    first, events = asyncio.run(main())
    assert [f.text for f in finals(first)] == [model.transcribe(a, latency_ms=160).text]
    second = finals(events)[1]
    assert second.text == model.transcribe(b, latency_ms=160).text
    # the second utterance's times continue the stream's clock
    assert second.start_time == pytest.approx(len(a) / 16000, abs=0.03)
    lk.check_invariants(events, (len(a) + len(b)) / 16000)


def test_flush_with_nothing_pushed_acknowledges_with_an_empty_final(checkpoint, lk):
    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        return await lk.drive(stt.stream(), np.zeros(0, np.float32))

    events = asyncio.run(main())
    assert [e.type for e in events if e.type != T.RECOGNITION_USAGE] == [T.FINAL_TRANSCRIPT]
    assert events[0].alternatives[0].text == ""


def test_aclose_mid_utterance_ends_the_turn_and_frees_the_slot(checkpoint, audio_clips, lk):
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0880.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, audio, realtime_factor=4.0)
        await lk.wait_for(lambda: of_type(events, T.START_OF_SPEECH))  # mid-utterance: the turn is open
        assert not of_type(events, T.END_OF_SPEECH)
        engine = await monosemantic.aget_engine(checkpoint, device="cpu")
        assert _open_streams(engine) == 1
        await stream.aclose()
        await asyncio.wait_for(reader, 10)
        return events, _open_streams(engine)

    events, open_after = asyncio.run(main())
    assert open_after == 0
    assert len(of_type(events, T.START_OF_SPEECH)) == len(of_type(events, T.END_OF_SPEECH)) >= 1
    assert events[-1].type in (T.END_OF_SPEECH, T.RECOGNITION_USAGE)


class _CloseFails(PassThroughStream):
    """An engine stream whose close() raises (after closing): a connection that breaks as it closes."""

    async def close(self) -> None:
        await self._es.close()
        raise ConnectionResetError("the connection broke while closing")


def test_an_open_turn_ends_when_closing_the_engine_stream_fails(checkpoint, audio_clips, lk):
    """The turn's END_OF_SPEECH was sent after the engine stream's close(): a close that raised skipped
    it, and the session stayed in 'speaking' for good (LiveKit never replies to a turn with no end); the
    close's error also ended the LiveKit stream's iteration, although nothing was left to free."""
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0880.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        await engine_seam(stt, lambda stream, n: _CloseFails(stream))
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, audio, realtime_factor=4.0)
        await lk.wait_for(lambda: of_type(events, T.START_OF_SPEECH))  # mid-utterance: the turn is open
        try:
            await stream.aclose()
        except Exception:
            pass  # the close's own failure may surface here; the turn must still end
        await asyncio.wait_for(reader, 10)
        return events

    events = asyncio.run(main())
    assert len(of_type(events, T.START_OF_SPEECH)) == len(of_type(events, T.END_OF_SPEECH)) >= 1


def test_stt_aclose_closes_its_streams_but_not_the_shared_engine(checkpoint, audio_clips, lk):
    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        streams = [stt.stream() for _ in range(3)]
        for s in streams:
            for frame in list(lk.frames(audio_clips["jfk.wav"]))[:50]:
                s.push_frame(frame)
        engine = await monosemantic.aget_engine(checkpoint, device="cpu")
        while _open_streams(engine) < 3:
            await asyncio.sleep(0.02)
        await stt.aclose()
        return engine, _open_streams(engine)

    engine, open_after = asyncio.run(main())
    assert open_after == 0
    assert list(monosemantic.engine.shared.shared_engines().values()) == [engine]


def test_recognize_returns_the_offline_transcript(checkpoint, ms_model, audio_clips, lk):
    from livekit.agents.utils import merge_frames

    audio = audio_clips["61-70968-0000.flac"]
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160)

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        event = await stt.recognize(list(lk.frames(audio)))
        # a 48 kHz buffer is resampled by the engine; the transcript is still produced
        event48 = await stt.recognize(merge_frames(list(lk.frames(audio, rate=48000))))
        return event, event48

    event, event48 = asyncio.run(main())
    assert event.type == T.FINAL_TRANSCRIPT
    assert event.alternatives[0].text == expected.text
    assert [str(w) for w in event.alternatives[0].words] == [w.text for w in expected.words]
    assert event48.type == T.FINAL_TRANSCRIPT and event48.alternatives[0].text


def test_latency_change_reopens_the_engine_stream_at_a_boundary(checkpoint, ms_model, audio_clips, lk):
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")
    other = [m for m in model.latency_modes if m != 160][0]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()
        stt.update_options(latency_ms=other)  # mid-stream, while the first utterance finalizes
        await lk.feed(stream, b)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, stream

    events, stream = asyncio.run(main())
    first, second = finals(events)
    assert first.text == model.transcribe(a, latency_ms=160).text
    assert second.text == model.transcribe(b, latency_ms=other).text  # no audio lost or split
    assert second.start_time == pytest.approx(len(a) / 16000, abs=0.03)
    assert stream._latency == other
    lk.check_invariants(events, (len(a) + len(b)) / 16000)


async def engine_seam(stt, wrap=None) -> list:
    """Put an engine in front of `stt`'s: every stream it opens is recorded in the returned list as
    (open_stream's arguments, the stream), and `wrap(stream, n)` (n counting from 1) may hand the plugin
    a stand-in for it."""
    engine = await stt._engine()
    opened = []

    class Engine:
        async def open_stream(self, **kw):
            opened.append((kw, await engine.open_stream(**kw)))
            stream = opened[-1][1]
            return stream if wrap is None else wrap(stream, len(opened))

    async def acquire():
        return Engine()

    stt._engine = acquire
    return opened


def test_a_latency_change_pending_at_the_end_of_the_input_opens_no_engine_stream(checkpoint, ms_model, audio_clips, lk):
    """A latency change waiting for the flush of end_input() reopened the engine stream once its Final
    came, only to close it at once: a second engine slot (on a server, a connection) taken at the
    session's end, and, with the engine full, a spurious error event ('latency change postponed')."""
    audio = audio_clips["jfk.wav"]
    model = ms_model("nemotron_rnnt")
    other = [m for m in model.latency_modes if m != 160][0]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        opened = await engine_seam(stt)
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, audio)
        stt.update_options(latency_ms=other)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, [kw["latency_ms"] for kw, _ in opened]

    events, opened = asyncio.run(main())
    assert [f.text for f in finals(events)] == [model.transcribe(audio, latency_ms=160).text]
    assert opened == [160]


def test_a_latency_mode_the_model_lacks_is_refused_on_a_live_stream(checkpoint, audio_clips, lk):
    """update_options used to accept it; the stream then failed to reopen at every idle moment, each
    time flushing, and cut its utterances apart without telling anyone."""
    audio = audio_clips["jfk.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stream = stt.stream()
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, audio[:16000])
        await lk.wait_for(lambda: stream._engine is not None)  # the mode can be checked once it is loaded
        with pytest.raises(ValueError, match="123"):
            stt.update_options(latency_ms=123)
        with pytest.raises(ValueError, match="123"):
            stream.update_options(latency_ms=123)
        # What the STT refuses, the stream refuses too (an empty language, a latency that is no integer),
        # before anything changes: it took them, and labelled transcripts "" or failed at the reopen.
        with pytest.raises(ValueError, match="language"):
            stream.update_options(language="", latency_ms=560)
        with pytest.raises(ValueError, match="latency_ms"):
            stream.update_options(latency_ms="560")
        assert stream._opts.language == "en"
        assert stt._opts.latency_ms == 160 and stream._opts.latency_ms == 160 and not stream._reopen_requested
        await lk.feed(stream, audio[16000:])
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events

    events = asyncio.run(main())
    assert len(finals(events)) == 1


def test_a_refused_reopen_keeps_the_stream_whole_and_is_reported(checkpoint, ms_model, audio_clips, lk):
    """Where the mode cannot be checked up front (a remote engine), the refusal comes when the engine
    stream is reopened: the change is dropped, reported as a recoverable error, and the audio goes on
    in the old stream, not split at every idle moment by retried reopens."""
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream()
        stream.check_latency = lambda latency_ms: None  # as for a remote engine: known only at open
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()
        stt._local = None  # as for a remote engine, no loaded model to check the mode against either
        stt.update_options(latency_ms=123)
        await lk.feed(stream, b)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, errors, stream

    events, errors, stream = asyncio.run(main())
    first, second = finals(events)
    assert first.text == model.transcribe(a, latency_ms=160).text
    assert second.text == model.transcribe(b, latency_ms=160).text
    assert stream._latency == 160 and not stream._reopen_requested
    assert len(errors) == 1 and errors[0].recoverable
    assert isinstance(errors[0].error, APIStatusError) and errors[0].error.status_code == 400


def test_stereo_frames_at_48k_are_mixed_down_before_resampling(checkpoint, audio_clips, lk):
    """LiveKit's resampler takes one channel: stereo frames at any rate but 16 kHz used to reach the
    engine as mono audio of twice the length. (The texts are not compared: LiveKit's resampler output
    differs by a sample value or two from run to run, which the tiny random model's text follows.)"""
    from livekit import rtc

    audio = audio_clips["jfk.wav"]

    def stereo(frames):
        for frame in frames:
            pcm = np.frombuffer(frame.data, dtype=np.int16)
            both = np.repeat(pcm, 2)  # interleaved left/right, equal channels
            yield rtc.AudioFrame(both.tobytes(), frame.sample_rate, 2, len(pcm))

    async def run(make):
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stream = stt.stream()
        pushed, push = [], stream._push

        async def recording(pcm):  # what reaches the engine
            pushed.append(np.array(pcm))
            await push(pcm)

        stream._push = recording
        events = []
        reader = lk.start_reader(stream, events)
        for i, frame in enumerate(make(lk.frames(audio, 48000))):
            stream.push_frame(frame)
            if i % 5 == 4:
                await asyncio.sleep(0.005)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        usage = sum(e.recognition_usage.audio_duration for e in of_type(events, T.RECOGNITION_USAGE))
        return finals(events), np.concatenate(pushed).astype(np.int32), usage

    [mono], mono_pcm, _ = asyncio.run(run(lambda frames: frames))
    [both], both_pcm, usage = asyncio.run(run(stereo))
    assert len(both_pcm) == len(mono_pcm) == len(audio)
    assert np.abs(both_pcm - mono_pcm).max() <= 4  # the same audio, up to the resampler's dither
    assert both.end_time == pytest.approx(len(audio) / 16000, abs=0.03) and both.text
    assert usage == pytest.approx(len(audio) / 16000, abs=1e-6)


def test_bad_options_are_clear_errors(checkpoint):
    with pytest.raises(ValueError, match="latency_ms"):
        lk_monosemantic.STT(model=checkpoint, latency_ms=0)
    with pytest.raises(TypeError, match="EngineConfig"):
        lk_monosemantic.STT(model=checkpoint, engine_config={"vad": None})
    with pytest.raises(ValueError, match="interim_results"):
        lk_monosemantic.STT(model=checkpoint, interim_results="no")  # a non-empty string: true, interims on
    # The model loads at the first stream; a typo there was an error only then, in the middle of a call.
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        lk_monosemantic.STT(model=checkpoint, device="gpu")
    with pytest.raises(ValueError, match="invalid dtype 'fp32x'"):
        lk_monosemantic.STT(model=checkpoint, dtype="fp32x")
    stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
    with pytest.raises(ValueError, match="language"):
        stt.update_options(language="")
    with pytest.raises(ValueError, match="interim_results"):
        stt.update_options(interim_results=None)


@pytest.mark.parametrize("language", ["", None])
def test_a_bad_language_for_one_stream_or_recognize_call_is_a_clear_error(checkpoint, language):
    """`stream(language=...)` and `recognize(..., language=...)` took any value (update_options checks
    it): every transcript then carried it, None or empty, as its language."""
    from livekit import rtc

    stt = lk_monosemantic.STT(model=checkpoint, device="cpu")

    async def main():
        with pytest.raises(ValueError, match="language"):
            stt.stream(language=language)
        with pytest.raises(ValueError, match="language"):
            await stt.recognize(rtc.AudioFrame(bytes(3200), 16000, 1, 1600), language=language)

    asyncio.run(main())


def test_unknown_latency_mode_fails_the_stream_without_retrying(checkpoint, audio_clips, lk):
    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", latency_ms=123)
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=3, retry_interval=0.01))
        with pytest.raises(APIStatusError) as info:
            async for _ in stream:
                pass
        return info.value, errors

    error, errors = asyncio.run(main())
    assert not error.retryable and error.status_code == 400 and "123" in str(error)
    assert len(errors) == 1 and not errors[0].recoverable


def test_missing_model_is_a_clear_non_retryable_error(tmp_path, lk):
    async def main():
        stt = lk_monosemantic.STT(model=str(tmp_path / "nope.nemo"), device="cpu")
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=0.01))
        with pytest.raises(APIConnectionError) as info:
            async for _ in stream:
                pass
        return info.value

    error = asyncio.run(main())
    assert not error.retryable and "nope.nemo" in str(error)


def test_full_engine_is_retried_until_a_slot_frees(checkpoint, audio_clips, lk, ms_model):
    """CapacityError is retryable: the stream gets its slot once another session's stream closes."""
    config = monosemantic.EngineConfig(max_streams=1, vad=None)
    audio = audio_clips["jfk.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=config)
        engine = await monosemantic.aget_engine(checkpoint, device="cpu", config=config)
        blocker = await engine.open_stream(latency_ms=160)
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=5, retry_interval=0.2))
        asyncio.get_running_loop().call_later(0.5, lambda: asyncio.ensure_future(blocker.close()))
        events = await lk.drive(stream, audio)
        return events, errors

    events, errors = asyncio.run(main())
    assert errors and all(e.recoverable for e in errors)
    assert finals(events)[0].text == ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160).text


class _LostBeforeFinal(PassThroughStream):
    """An engine stream whose connection is lost while its first Final is on the way."""

    async def __anext__(self):
        event = await self._es.__anext__()
        if isinstance(event, monosemantic.Final):
            await asyncio.sleep(0.5)  # meanwhile the stream holds new audio back for the latency change
            raise monosemantic.StreamError("connection lost")
        return event


def test_audio_held_back_for_a_latency_change_goes_to_the_retry(checkpoint, ms_model, audio_clips, lk):
    """A latency change holds new audio back until the flush's Final; the engine stream fails before
    it. The held audio was taken from the input but given to no engine stream: the retried run used to
    start after it (the next utterance lost its first second), it starts with it now."""
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")
    other = [m for m in model.latency_modes if m != 160][0]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        await engine_seam(stt, lambda stream, n: _LostBeforeFinal(stream) if n == 1 else stream)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=0.1))
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()
        stt.update_options(latency_ms=other)
        await lk.feed(stream, b, realtime_factor=2.0)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events

    events = asyncio.run(main())
    [final] = [f for f in finals(events) if f.text]  # the first utterance's audio was lost with its stream
    assert final.start_time == pytest.approx(len(a) / 16000, abs=0.03)
    assert final.text == model.transcribe(b, latency_ms=other).text
    lk.check_invariants(events, (len(a) + len(b)) / 16000)


def test_a_framework_flush_lost_with_its_engine_stream_is_answered_after_the_retry(checkpoint, ms_model, audio_clips, lk):
    """The session's commit_user_turn() flushes the STT and waits `transcript_timeout` for a FINAL. The
    engine stream died before that flush's Final; the base class retried the run on a new engine stream,
    but nothing flushed that one, so the flush was never answered and the session waited its whole
    timeout. The retry now flushes for it first: an empty FINAL (that audio was lost), then the stream
    goes on."""
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        opened = await engine_seam(stt, lambda stream, n: _LostBeforeFinal(stream) if n == 1 else stream)
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=0.01))
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()  # as commit_user_turn() does
        await lk.wait_for(lambda: len(opened) == 2)  # the run failed and was retried
        await lk.feed(stream, b)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, errors

    events, errors = asyncio.run(main())
    assert len(errors) == 1 and errors[0].recoverable
    # one FINAL per flush: the lost one's (empty), then end_input()'s
    assert [f.text for f in finals(events)] == ["", model.transcribe(b, latency_ms=160).text]
    assert finals(events)[1].start_time == pytest.approx(len(a) / 16000, abs=1e-3)


class _EndsAfterFirstFinal(PassThroughStream):
    """An engine stream that ends right after its first Final, without an error and without being closed:
    a server's connection closed cleanly by something between it and the plugin (a proxy, say)."""

    ended = False

    async def __anext__(self):
        if self.ended:
            await self._es.close()
            raise StopAsyncIteration
        event = await self._es.__anext__()
        self.ended = isinstance(event, monosemantic.Final)
        return event


def test_an_engine_stream_that_ends_unasked_is_retried(checkpoint, ms_model, audio_clips, lk):
    """The run ended with the engine stream, as if the plugin had closed it: the LiveKit stream ended
    without an error while its input was live, so the session's STT pipeline took it for the end of its
    audio and stopped for good (and every later push_frame raised 'is closed')."""
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    model = ms_model("nemotron_rnnt")

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        opened = await engine_seam(stt, lambda stream, n: _EndsAfterFirstFinal(stream) if n == 1 else stream)
        errors = []
        stt.on("error", errors.append)
        stream = stt.stream(conn_options=APIConnectOptions(max_retry=2, retry_interval=0.1))
        events = []
        reader = lk.start_reader(stream, events)
        await lk.feed(stream, a)
        stream.flush()
        await lk.wait_for(lambda: finals(events))
        await lk.feed(stream, b)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, errors, len(opened)

    events, errors, opened = asyncio.run(main())
    assert [f.text for f in finals(events) if f.text] == [model.transcribe(x, latency_ms=160).text for x in (a, b)]
    assert opened == 2 and len(errors) == 1 and errors[0].recoverable
    assert isinstance(errors[0].error, APIConnectionError) and "ended" in str(errors[0].error)
    # (not lk.check_invariants: its 1 us bound on time order is below the rounding of the wall-clock
    # arithmetic a retry's times go through)
    kinds = [e.type for e in events]
    assert kinds.count(T.START_OF_SPEECH) == kinds.count(T.END_OF_SPEECH) == 2
    assert finals(events)[-1].start_time == pytest.approx(len(a) / 16000, abs=1e-3)


def test_input_faster_than_real_time_is_cut_into_turns_at_the_vads_ends(checkpoint, ms_model, audio_clips, lk):
    """Three clips with silences between them pushed all at once, as a pre-connect buffer or a backlog
    after a retry comes: each turn's FINAL ends where the VAD heard its speech end, not after all the
    audio pushed by then (which held the next clip's start, and put it into this turn's FINAL). Every
    FINAL equals the offline transcription of its span, and no span holds two clips' onsets."""
    audio = lk.speech_with_silences(audio_clips)
    onsets = np.cumsum([0.5] + [len(audio_clips[k]) / 16000 + g for k, g in zip(
        ("jfk.wav", "sense_and_sensibility_01_austen_64kb-0880.wav", "61-70968-0000.flac"), (1.5, 2.0, 1.2))])[:3]
    model = ms_model("nemotron_rnnt")
    config = monosemantic.EngineConfig(max_buffered_seconds=60.0)
    engine = monosemantic.get_engine(checkpoint, device="cpu", config=config)  # the STT's shared engine
    release = threading.Event()  # the engine stands still until the whole input is in it (a busy engine)
    engine.core.add_tick_hook(lambda plan, elapsed: release.wait(30))

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=config)
        stream = stt.stream()
        events: list = []
        reader = lk.start_reader(stream, events)
        for frame in lk.frames(audio):
            stream.push_frame(frame)  # no pacing: the whole input at once
        await lk.wait_for(lambda: stream._tracker is not None and stream._tracker.pushed == len(audio))
        release.set()
        # the input stays open (live audio would follow): the turns end at the VAD's ends meanwhile
        await lk.wait_for(lambda: len(of_type(events, T.END_OF_SPEECH)) >= 3, timeout=90)
        stream.end_input()
        await asyncio.wait_for(reader, 120)
        return events

    events = asyncio.run(main())
    lk.check_invariants(events, len(audio) / 16000)
    spans = [(f.start_time, f.end_time, f.text) for f in finals(events)]
    for onset in onsets:
        assert sum(a <= onset < b for a, b, _ in spans) == 1, (onset, spans)
    assert all(sum(a <= onset < b for onset in onsets) <= 1 for a, b, _ in spans), spans
    assert len([text for *_, text in spans if text]) >= 3
    pcm = lk.to_int16(audio).astype(np.float32) / 32768
    for a, b, text in spans:
        part = pcm[round(a * 16000) : round(b * 16000)]
        assert text == model.transcribe(part, latency_ms=160).text, (a, b)
