"""Streaming equals offline: audio pushed in 20 ms pieces or random piece sizes gives NeMo's offline
tokens for that attention mode, for every mode of every variant (cache-aware and full-context)."""

from __future__ import annotations

import numpy as np
import pytest

import monosemantic
from monosemantic.audio import resample
from _support.modes import latency_contexts


def feed_all(stream, audio: np.ndarray, sizes) -> None:
    start = 0
    for size in sizes:
        if start >= len(audio):
            break
        stream.feed(audio[start : start + size])
        start += size
    if start < len(audio):
        stream.feed(audio[start:])


def twenty_ms(n: int):
    return [320] * (n // 320 + 1)


def random_sizes(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 6000, size=n // 500 + 10).tolist()


@pytest.mark.parametrize("pieces", ["20ms", "random"])
def test_streaming_equals_nemo_offline(variant_name, ms_model, nemo_tokens, audio_clips, pieces):
    model = ms_model(variant_name)
    clips = list(audio_clips.values())
    for latency, context in latency_contexts(model):
        expected = nemo_tokens(variant_name, context)
        for i, audio in enumerate(clips):
            stream = model.new_stream(latency_ms=latency)
            sizes = twenty_ms(len(audio)) if pieces == "20ms" else random_sizes(len(audio), seed=i)
            feed_all(stream, audio, sizes)
            assert stream.finalize().token_ids == expected[i], f"mode {context}, clip {i}"


def test_partials_grow_and_final_extends_them(ms_model, audio_clips):
    """With greedy decoding every emitted token is final: each partial extends the previous one."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    stream = model.new_stream(latency_ms=160)
    previous: list[int] = []
    updates = 0
    for start in range(0, len(audio), 320):
        if stream.feed(audio[start : start + 320]):
            current = stream.transcript().token_ids
            assert current[: len(previous)] == previous and len(current) > len(previous)
            previous = current
            updates += 1
    final = stream.finalize().token_ids
    assert final[: len(previous)] == previous
    assert updates > 3


@pytest.mark.parametrize("length", [0, 1, 100, 159, 160, 161, 1279, 1281, 2000, 9000, 17921])
def test_short_and_odd_lengths_equal_offline(ms_model, audio_clips, length):
    """Tails shorter than a chunk, a frame or a hop: finalize flushes them exactly like offline."""
    model = ms_model("nemotron_tdt")
    audio = audio_clips["jfk.wav"][8000 : 8000 + length]
    for latency in model.latency_modes:
        stream = model.new_stream(latency_ms=latency)
        stream.feed(audio)
        assert stream.finalize().token_ids == model.transcribe(audio, latency_ms=latency).token_ids


def test_finalize_resets_for_the_next_utterance(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    first, second = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    stream = model.new_stream(latency_ms=80)
    stream.feed(first)
    assert stream.finalize().token_ids == model.transcribe(first, latency_ms=80).token_ids
    feed_all(stream, second, twenty_ms(len(second)))
    result = stream.finalize()
    assert result.token_ids == model.transcribe(second, latency_ms=80).token_ids
    # word times restart at the new utterance's start
    assert result.words and result.words[0].start < len(second)


def test_stream_at_another_sample_rate(ms_model, audio_clips):
    """48 kHz input is resampled on the fly; no audio is lost at the end (the resampler is flushed)."""
    from monosemantic.audio import resample

    model = ms_model("nemotron_rnnt")
    audio48 = resample(audio_clips["jfk.wav"], 16000, 48000)
    stream = model.new_stream(latency_ms=160, sample_rate=48000)
    feed_all(stream, audio48, [960] * (len(audio48) // 960 + 1))
    streamed = stream.finalize()
    offline = model.transcribe(audio48, latency_ms=160, sample_rate=48000)
    # Streaming and one-shot resampling differ in the last bits, so only nearly all tokens must agree.
    assert abs(len(streamed.tokens) - len(offline.tokens)) <= max(2, len(offline.tokens) // 20)
    assert streamed.tokens[-1].end >= offline.tokens[-1].end - model.config.frame_samples * 4


def test_bad_input_and_closed_stream(ms_model):
    model = ms_model("nemotron_rnnt")
    stream = model.new_stream(latency_ms=160)
    with pytest.raises(monosemantic.AudioError, match="NaN"):
        stream.feed(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(monosemantic.AudioError, match="dtype"):
        stream.feed(np.array(["a"]))
    with pytest.raises(monosemantic.AudioError, match="1-D"):
        stream.feed(np.zeros((2, 10), dtype=np.float32))
    stream.feed(np.zeros(1600, dtype=np.int16))  # int16 PCM is accepted
    stream.close()
    with pytest.raises(monosemantic.StreamError):
        stream.feed(np.zeros(10, dtype=np.float32))
    with pytest.raises(monosemantic.StreamError):
        stream.finalize()
    with pytest.raises(monosemantic.StreamError):  # returned the old hypothesis after close
        stream.transcript()
    with pytest.raises(monosemantic.StreamError):
        stream.reset()
    with pytest.raises(ValueError, match="not a mode"):
        model.new_stream(latency_ms=100)
    with pytest.raises(monosemantic.AudioError, match="sample rate"):
        model.new_stream(latency_ms=160, sample_rate=0)


def test_reset_mid_utterance_drops_the_resampler_tail(ms_model, audio_clips):
    """reset() starts a new utterance: at 48 kHz the resampler still held the last ~20 ms of the old
    utterance's audio, which then opened the new one (its transcript differed from a fresh stream's)."""
    model = ms_model("nemotron_rnnt")
    audio48 = resample(audio_clips["jfk.wav"], 16000, 48000)
    stream = model.new_stream(latency_ms=160, sample_rate=48000)
    stream.feed(audio48[:48000])
    stream.reset()
    stream.feed(audio48[48000:])
    fresh = model.new_stream(latency_ms=160, sample_rate=48000)
    fresh.feed(audio48[48000:])
    assert stream.finalize().token_ids == fresh.finalize().token_ids


def test_full_context_reset_drops_the_resampler_tail(ms_model, audio_clips):
    model = ms_model("parakeet_tdt")
    audio48 = resample(audio_clips["61-70968-0000.flac"], 16000, 48000)
    stream = model.new_stream(sample_rate=48000)
    stream.feed(audio48[:48000])
    stream.reset()
    stream.feed(audio48[48000:])
    fresh = model.new_stream(sample_rate=48000)
    fresh.feed(audio48[48000:])
    assert stream.finalize().token_ids == fresh.finalize().token_ids



def test_full_context_partials_come_every_interval_whatever_the_piece_size(ms_model, audio_clips, monkeypatch):
    """A full-context stream recomputes its partial every `latency_ms` of audio. Its counter restarted at
    0 at each update and dropped the audio past the interval: with 600 ms pieces and the default 1000 ms,
    updates came every 1200 ms, five in 6 s instead of six."""
    model = ms_model("parakeet_tdt")
    updates = []
    transcribe = model.transcribe
    monkeypatch.setattr(model, "transcribe", lambda audio, **kw: updates.append(len(audio)) or transcribe(audio, **kw))
    stream = model.new_stream(latency_ms=1000)
    audio = np.tile(audio_clips["jfk.wav"], 2)[: 6 * 16000]
    for start in range(0, len(audio), 9600):  # 600 ms pieces
        stream.feed(audio[start : start + 9600])
    assert updates == [19200, 38400, 48000, 67200, 86400, 96000]  # after 1.2, 2.4, 3.0, 4.2, 5.4, 6.0 s


@pytest.mark.parametrize("variant", ["parakeet_tdt", "nemotron_rnnt"])
def test_a_caller_reusing_its_buffer_does_not_change_what_was_fed(ms_model, audio_clips, variant):
    """A capture callback hands over the same buffer every time, refilled (sounddevice's `indata`, a ring
    buffer). A full-context stream kept the caller's float32 array itself (as_float32 and the resampler
    at the model's rate pass it through unconverted), so refilling it rewrote the audio already fed, and
    the final was the transcription of the last piece repeated."""
    model = ms_model(variant)
    audio = audio_clips["jfk.wav"]
    n = len(audio) // 320 * 320
    stream = model.new_stream()
    buffer = np.empty(320, dtype=np.float32)
    for start in range(0, n, 320):
        buffer[:] = audio[start : start + 320]
        stream.feed(buffer)
    buffer[:] = 0.0
    latency = model.default_latency_ms if model.cache_aware else None
    assert stream.finalize().token_ids == model.transcribe(audio[:n], latency_ms=latency).token_ids
