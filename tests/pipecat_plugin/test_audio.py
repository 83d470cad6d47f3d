"""FrameAudio: every frame's audio becomes mono int16 at the stream's rate, with nothing lost or reordered
when the format changes and nothing consumed by a frame it refuses."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="pipecat-ai (the 'pipecat' extra) is not installed")

from monosemantic.audio import resample  # noqa: E402
from monosemantic.errors import AudioError  # noqa: E402
from pipecat_monosemantic.audio import FrameAudio  # noqa: E402


def pcm(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3000).clip(-32768, 32767).astype(np.int16)


def samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def one_piece(x: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    out = resample(x.astype(np.float32) / 32768.0, from_rate, to_rate) * 32768.0
    return np.round(out).clip(-32768, 32767).astype(np.int16)


def test_mono_at_the_stream_rate_passes_through_untouched():
    audio = pcm(320).tobytes()
    assert FrameAudio(16000).convert(audio, 16000, 1) is audio


@pytest.mark.parametrize("channels", [2, 3, 6])
def test_channels_are_averaged(channels):
    x = np.stack([pcm(480, seed) for seed in range(channels)], axis=1)
    out = samples(FrameAudio(16000).convert(x.tobytes(), 16000, channels))
    assert np.array_equal(out, np.round(x.astype(np.float64).mean(axis=1)).astype(np.int16))


def test_resampling_in_frames_with_the_tail_at_flush_equals_resampling_in_one_piece():
    x = pcm(48000 * 2)
    conv = FrameAudio(16000)
    out = b"".join(conv.convert(x[i : i + 960].tobytes(), 48000, 1) for i in range(0, len(x), 960)) + conv.flush()
    assert np.array_equal(samples(out), one_piece(x, 48000, 16000))
    assert conv.flush() == b""


def test_a_rate_change_puts_the_held_audio_first():
    a, b = pcm(4800, 1), pcm(1600, 2)
    conv = FrameAudio(16000)
    first = conv.convert(a.tobytes(), 48000, 1)
    second = conv.convert(b.tobytes(), 16000, 1)
    assert np.array_equal(samples(first + second), np.concatenate([one_piece(a, 48000, 16000), b]))


@pytest.mark.parametrize(
    "audio, rate, channels, message",
    [
        (b"\x00" * 3, 16000, 1, "odd byte count"),
        (b"\x00" * 6, 16000, 2, "not whole 16-bit samples of 2 channels"),
        (b"\x00" * 640, 0, 1, "unsupported sample rate 0"),
        (b"\x00" * 640, 44100.5, 1, "unsupported sample rate 44100.5"),
        (b"\x00" * 640, 16000, 0, "unsupported channel count 0"),
        (b"\x00" * 640, 16000, True, "unsupported channel count True"),
    ],
)
def test_a_refused_frame_raises_and_keeps_the_held_audio(audio, rate, channels, message):
    a = pcm(4800)
    conv = FrameAudio(16000)
    held = conv.convert(a.tobytes(), 48000, 1)
    with pytest.raises(AudioError, match=message):
        conv.convert(audio, rate, channels)
    assert np.array_equal(samples(held + conv.flush()), one_piece(a, 48000, 16000))
