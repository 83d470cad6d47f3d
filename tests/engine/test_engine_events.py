"""The engine's results and events against docs/engine.md: times and Usage at resampled rates, a failed
step ending only its batch, Usage of skipped silence, a lone VAD window judged, speech events in model
samples."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import monosemantic
from monosemantic import Engine, EngineConfig, Final, Partial, SpeechEnded, SpeechStarted, Usage, VADConfig

pytestmark = pytest.mark.timeout(120)


def resampled_lengths(parts, rate, frame):
    """Model-rate sample counts of each utterance pushed in `frame`-sample pieces at `rate`."""
    from monosemantic.audio import StreamResampler

    counts = []
    for part in parts:
        r = StreamResampler(rate, 16000)
        n = sum(len(r.push(part[i : i + frame])) for i in range(0, len(part), frame))
        counts.append(n + len(r.flush()))
    return counts


def reference_tokens(model, part, rate, frame, latency):
    ref = model.new_stream(latency_ms=latency, sample_rate=rate)
    for i in range(0, len(part), frame):
        ref.feed(part[i : i + frame])
    return ref.finalize().token_ids


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_resampled_utterances_times_tokens_and_usage(ms_model, audio_clips, variant, rate):
    from monosemantic.audio import resample

    model = ms_model(variant)
    a = resample(audio_clips["jfk.wav"][: 16000 * 4], 16000, rate)
    b = resample(audio_clips["61-70968-0000.flac"][: 16000 * 3], 16000, rate)
    frame = rate // 50

    async def main():
        async with Engine(model, EngineConfig(vad=None, usage_interval_seconds=1.0)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=rate)
            events = []
            for part in (a, b):
                for i in range(0, len(part), frame):
                    await stream.push(part[i : i + frame])
                await stream.flush()
                async for e in stream:
                    events.append(e)
                    if isinstance(e, Final):
                        break
            await stream.close()
            events += [e async for e in stream]
            return events

    events = asyncio.run(main())
    n1, n2 = resampled_lengths([a, b], rate, frame)
    finals = [e for e in events if isinstance(e, Final)]
    assert len(finals) == 2
    assert (finals[0].start, finals[0].end) == (0, n1)
    assert (finals[1].start, finals[1].end) == (n1, n1 + n2)
    for final, part in zip(finals, (a, b)):
        assert [t.id for t in final.tokens] == reference_tokens(model, part, rate, frame, 160)
        for t in final.tokens:
            assert final.start <= t.start <= t.end <= final.end
            assert type(t.start) is int and type(t.end) is int
    for p in (e for e in events if isinstance(e, Partial)):
        assert p.start in (0, n1) and p.start < p.end <= n1 + n2
    usage = sum(e.audio_seconds for e in events if isinstance(e, Usage))
    assert round(usage * 16000) == n1 + n2


async def until_final(stream):
    events = []
    async for e in stream:
        events.append(e)
        if isinstance(e, Final):
            return events
    return events


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
def test_a_failed_step_closes_only_its_batch(ms_model, audio_clips, variant, monkeypatch):
    model = ms_model(variant)
    audio = audio_clips["jfk.wav"][: 16000 * 3]

    async def main():
        async with Engine(model, EngineConfig(vad=VADConfig())) as engine:
            runner = engine.core.runner
            real_step, failed = runner.step, []

            def step(batch):
                if batch.latency_ms == 160 and not failed:
                    failed.append([r.handle for r in batch.rows])
                    raise RuntimeError("device failure (simulated)")
                return real_step(batch)

            monkeypatch.setattr(runner, "step", step)
            doomed = await engine.open_stream(latency_ms=160)
            other = await engine.open_stream(latency_ms=80)
            try:
                await doomed.push(audio)
            except monosemantic.StreamError:
                pass
            doomed_events = [e async for e in doomed]
            await other.push(audio)
            await other.flush()
            other_events = await until_final(other)
            fresh = await engine.open_stream(latency_ms=160)
            await fresh.push(audio)
            await fresh.flush()
            fresh_events = await until_final(fresh)
            return doomed_events, other_events, fresh_events

    doomed, other, fresh = asyncio.run(main())
    errors = [e for e in doomed if isinstance(e, monosemantic.Error)]
    assert len(errors) == 1 and errors[0].code == "internal" and doomed[-1] is errors[0]
    kinds = [type(e) for e in doomed if isinstance(e, (SpeechStarted, SpeechEnded))]
    assert kinds == [SpeechStarted, SpeechEnded] * (len(kinds) // 2)
    assert [t.id for t in other[-1].tokens] == model.transcribe(audio, latency_ms=80).token_ids
    assert [t.id for t in fresh[-1].tokens] == model.transcribe(audio, latency_ms=160).token_ids


@pytest.mark.parametrize("skip", [None, 500])
def test_usage_at_close_counts_skipped_silence(ms_model, audio_clips, skip):
    """A stream closed without a flush gets Usage for the audio the engine consumed ('Usage every
    usage_interval_seconds of processed audio, and at close'). Silence skipped by skip_silence_ms is
    consumed audio too, counted as it is skipped (it used to be counted only at a Final, so a stream
    closed without one never reported it, nor did periodic Usage come during it)."""
    model = ms_model("nemotron_rnnt")
    audio = np.concatenate([audio_clips["jfk.wav"][: 16000 * 2], np.zeros(16000 * 8, np.float32)])

    async def main():
        config = EngineConfig(skip_silence_ms=skip, usage_interval_seconds=1.0)
        async with Engine(model, config) as engine:
            stream = await engine.open_stream(latency_ms=160)
            for i in range(0, len(audio), 3200):
                await stream.push(audio[i : i + 3200])
            record = engine.core.scheduler.streams[stream.handle]
            # Wait until every full window is stepped (or skipped) and the VAD has caught up.
            for _ in range(1000):
                if record.ready_at > record.written and not record.stepping and record.vad_pos >= record.written - 1024:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            consumed = record.utt_start + engine.core.scheduler.geometry.hop * record.window_start()
            await stream.close()
            return [e async for e in stream], consumed

    events, consumed = asyncio.run(main())
    usage = round(sum(e.audio_seconds for e in events if isinstance(e, Usage)) * 16000)
    assert consumed > len(audio) - 4000
    assert usage == consumed, f"Usage reported {usage / 16000:.2f} s of the {consumed / 16000:.2f} s the engine consumed"


def test_the_last_vad_window_pushed_is_judged(ms_model, audio_clips):
    """'Each tick, the scheduler plans VAD windows for every stream with audio waiting'; a lone waiting
    window is held back to batch it with the next, for at most VAD_WAIT. Here the producer pauses after
    the window that makes the end of speech certain, and its SpeechEnded comes (the window used to wait
    for more audio, indefinitely)."""
    import torch
    from monosemantic.vad.policy import VADPolicy
    from monosemantic.vad.silero import SileroVAD, VADState

    model = ms_model("nemotron_rnnt")
    audio = np.concatenate([np.zeros(512, np.float32), audio_clips["jfk.wav"][: 16000 * 2], np.zeros(16000, np.float32)])
    # The window whose probability makes the end certain (Silero run offline on the same windows).
    n = len(audio) // 512
    probs, _ = SileroVAD.from_package().forward_windows(torch.from_numpy(audio[: n * 512])[None], [n], VADState.zeros(1))
    policy, decisive = VADPolicy(), None
    for i, p in enumerate(probs[0].tolist()):
        if any(t.kind == "end" for t in policy.update([p])):
            decisive = i
            break
    assert decisive is not None
    pushed = audio[: (decisive + 1) * 512]

    async def main():
        async with Engine(model, EngineConfig()) as engine:
            stream = await engine.open_stream(latency_ms=160)
            events = []

            async def read():
                async for e in stream:
                    events.append(e)

            reader = asyncio.create_task(read())
            for i in range(0, len(pushed), 512):  # one VAD window at a time, about real time
                await stream.push(pushed[i : i + 512])
                await asyncio.sleep(0.03)
            await asyncio.sleep(1.0)  # the producer pauses (waiting for the end of speech, say)
            ended = [e for e in events if isinstance(e, SpeechEnded)]
            vad_pos = engine.core.scheduler.streams[stream.handle].vad_pos
            await stream.close()
            await reader
            return ended, vad_pos

    ended, vad_pos = asyncio.run(main())
    assert ended, (f"no SpeechEnded: the VAD judged {vad_pos} of the {len(pushed)} samples pushed a second ago, "
                   f"leaving the window that makes the end certain unjudged")
    assert vad_pos == len(pushed)


@pytest.mark.parametrize("rate", [8000, 48000])
def test_speech_events_at_resampled_rates_are_in_model_samples(ms_model, audio_clips, rate):
    """SpeechStarted/SpeechEnded samples count 16 kHz samples from the stream's start (README: 'Times in
    events are sample counts at 16 kHz'), at any stream rate: they match the 16 kHz stream's, alternate,
    and stay inside the audio."""
    from monosemantic.audio import resample

    from _support.audio import speech_with_silences

    model = ms_model("nemotron_rnnt")
    audio = speech_with_silences(audio_clips, gaps=(1.0, 1.0, 1.0), tail=1.0)

    async def speech(pcm, sr):
        async with Engine(model, EngineConfig()) as engine:
            stream = await engine.open_stream(latency_ms=560, sample_rate=sr)
            await stream.push(pcm)
            await stream.flush()
            events = await until_final(stream)
            await stream.close()
            return events + [e async for e in stream]

    ref = [e for e in asyncio.run(speech(audio, 16000)) if isinstance(e, (SpeechStarted, SpeechEnded))]
    got = [e for e in asyncio.run(speech(resample(audio, 16000, rate), rate)) if isinstance(e, (SpeechStarted, SpeechEnded))]
    assert [type(e) for e in got] == [type(e) for e in ref] == [SpeechStarted, SpeechEnded] * (len(ref) // 2)
    assert len(ref) >= 6
    for a, b in zip(ref, got):
        assert type(b.sample) is int and 0 <= b.sample <= len(audio) + 2 and abs(a.sample - b.sample) <= 1600


def test_partials_never_show_an_unfinished_character(ms_model, audio_clips, monkeypatch):
    """With a byte-fallback tokenizer (multilingual checkpoints) a step can end inside a character's
    byte pieces: the Partial showed U+FFFD there as stable text, and the next step took it back. Each
    Partial's text is now a prefix of every later one and of the Final's."""
    from _support.tokenizers import byte_fallback_proto
    from monosemantic.decoding.tokenizer import Tokenizer

    model = ms_model("nemotron_rnnt")
    tok = Tokenizer(byte_fallback_proto())
    monkeypatch.setattr(model, "tokenizer", tok)  # the decoder's 100 outputs include bytes 0x80-0xFF
    audio = np.concatenate([audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]])

    async def main():
        async with Engine(model, EngineConfig(max_streams=2, vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=80)
            for i in range(0, len(audio), 1280):
                await stream.push(audio[i : i + 1280])
            await stream.flush()
            events = await until_final(stream)
            await stream.close()
            return events

    events = asyncio.run(main())
    partials = [e for e in events if isinstance(e, Partial)]
    final = events[-1]
    assert isinstance(final, Final) and final.text == tok.decode([t.id for t in final.tokens])
    ids = [t.id for t in final.tokens]
    unfinished = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd") and ids[k - 1] in tok._bytes]
    assert len(partials) > 10 and unfinished, "the audio should end steps inside characters"
    texts = [p.text for p in partials] + [final.text]
    for k, partial in enumerate(partials):
        assert partial.stable_text == partial.text
        assert all(later.startswith(partial.stable_text) for later in texts[k + 1 :]), (partial, texts[k + 1])



def test_a_usage_interval_below_one_sample_sends_no_empty_usage(ms_model, audio_clips):
    """usage_interval_seconds below one sample period made the threshold 0 samples: any count of no audio
    (a step or skip that moved past none) sent Usage(0.0). Such an interval asks for Usage as often as
    there is audio to report: every event carries some, and they add up."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][: 16000 * 2]

    async def main():
        async with Engine(model, EngineConfig(vad=None, usage_interval_seconds=1e-5)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(audio)
            await stream.flush()
            events = []
            async for e in stream:
                events.append(e)
                if isinstance(e, Final):
                    break
            state = engine.core.streams[stream.handle]
            with state.guard:
                engine.core._count_usage(state, 0)  # a step that moved past no audio
            await stream.close()
            return events + [e async for e in stream]

    usage = [e.audio_seconds for e in asyncio.run(main()) if isinstance(e, Usage)]
    assert usage and all(seconds > 0 for seconds in usage), usage
    assert round(sum(usage) * 16000) == len(audio)
