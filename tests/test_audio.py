"""Audio input: validation, file reading (any rate, any channel count), resampling without loss."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monosemantic.audio import StreamResampler, as_float32, load_audio_file, resample
from monosemantic.errors import AudioError


def test_as_float32_accepts_float_and_int_pcm():
    assert as_float32(np.array([0.5, -0.25], dtype=np.float64)).dtype == np.float32
    np.testing.assert_allclose(as_float32(np.array([16384, -32768], dtype=np.int16)), [0.5, -1.0])
    np.testing.assert_allclose(as_float32(np.array([2**30], dtype=np.int32)), [0.5])
    np.testing.assert_allclose(as_float32(np.array([1.5, -3.9], dtype=np.float32)), [1.5, -3.9], rtol=1e-6)  # overshoot


def test_as_float32_reads_big_endian_pcm_as_its_values():
    """">i2" and ">f4" arrays (a WAV read as big-endian, network byte order) were refused as an
    unsupported dtype."""
    pcm = (np.arange(-200, 200, dtype=np.int16) * 150).astype(np.int16)
    assert np.array_equal(as_float32(pcm.astype(">i2")), as_float32(pcm))
    samples = as_float32(pcm)
    assert np.array_equal(as_float32(samples.astype(">f4")), samples)
    assert np.array_equal(as_float32(pcm.astype(np.int32).astype(">i4") << 16), samples)


def test_as_float32_accepts_torch_tensors_of_any_float_dtype():
    torch = pytest.importorskip("torch")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        np.testing.assert_allclose(as_float32(torch.tensor([0.5, -0.25], dtype=dtype)), [0.5, -0.25])


@pytest.mark.parametrize(
    "value, needle",
    [
        (np.array([0.0, np.inf], dtype=np.float32), "NaN or infinite"),
        (np.array([np.nan], dtype=np.float32), "NaN or infinite"),
        (np.zeros((2, 5), dtype=np.float32), "1-D"),
        (np.array([1, 2], dtype=np.uint8), "dtype uint8"),
        (b"\x00\x01", "raw bytes"),
        # finite, but not audio at float scale: int16 values in a float array, or values that overflow
        (np.array([0.0, 12000.0], dtype=np.float32), "peak of 12000"),
        (np.array([3e38, -3e38], dtype=np.float32), "must lie in"),
    ],
)
def test_as_float32_rejects_bad_input(value, needle):
    with pytest.raises(AudioError, match=needle):
        as_float32(value)


@pytest.mark.parametrize("value", ["tests/data/jfk.wav", Path("tests/data/jfk.wav")])
def test_a_file_name_is_told_to_be_read_first(value):
    """A file name (NeMo's transcribe takes paths) was refused as 'unsupported sample dtype <U18' (a str)
    or 'dtype object' (a Path), which does not say that samples are wanted."""
    with pytest.raises(AudioError, match="a file name, not samples: read the file first"):
        as_float32(value)


def test_input_no_array_can_be_read_from_is_an_audio_error():
    """These used to surface as the raw ValueError/NotImplementedError of numpy or torch."""
    import torch

    for value in ([[0.1, 0.2], [0.3]], torch.zeros(4, device="meta")):
        with pytest.raises(AudioError, match="cannot read samples"):
            as_float32(value)


def test_load_audio_file_downmixes_and_resamples(tmp_path, audio_clips):
    mono = audio_clips["jfk.wav"][:32000]
    stereo44 = np.stack([resample(mono, 16000, 44100)] * 2, axis=1)
    path = tmp_path / "stereo44.flac"
    sf.write(path, stereo44, 44100)
    loaded = load_audio_file(path, 16000)
    assert abs(len(loaded) - len(mono)) <= 2
    # Round trip through 44.1 kHz and FLAC's 16-bit quantisation stays close to the original.
    n = min(len(loaded), len(mono))
    assert np.corrcoef(loaded[:n], mono[:n])[0, 1] > 0.99


@pytest.mark.parametrize(
    "container, codec, rate, suffix",
    [("MP3", "MPEG_LAYER_III", 16000, "mp3"), ("OGG", "OPUS", 48000, "opus"), ("OGG", "VORBIS", 16000, "ogg")],
)
def test_load_audio_file_reads_the_compressed_formats_the_docs_name(tmp_path, audio_clips, container, codec, rate, suffix):
    """README and the CLI's help name MP3 and Opus: they are read when soundfile's libsndfile has them
    (MP3 from libsndfile 1.1, Opus from 1.0.29)."""
    if codec not in sf.available_subtypes(container):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) has no {container}/{codec}")
    mono = audio_clips["jfk.wav"][:32000]
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, resample(mono, 16000, rate), rate, format=container, subtype=codec)
    loaded = load_audio_file(path, 16000)
    assert abs(len(loaded) - len(mono)) <= 2
    n = min(len(loaded), len(mono))
    assert np.corrcoef(loaded[:n], mono[:n])[0, 1] > 0.99  # a lossy codec, still the same speech


@pytest.mark.parametrize("kind", ["missing", "empty_file", "zero_samples", "corrupt", "directory"])
def test_load_audio_file_errors(tmp_path, kind):
    path = tmp_path / "clip.wav"
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "zero_samples":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    elif kind == "directory":
        path = tmp_path
    with pytest.raises(AudioError) as info:
        load_audio_file(path, 16000)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_stream_resampler_loses_no_audio(audio_clips):
    audio = resample(audio_clips["jfk.wav"], 16000, 48000)
    resampler = StreamResampler(48000, 16000)
    pieces = [resampler.push(audio[i : i + 960]) for i in range(0, len(audio), 960)]
    pieces.append(resampler.flush())
    out = np.concatenate(pieces)
    assert abs(len(out) - len(audio) / 3) <= 1


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_stream_resampler_equals_one_shot_resampling_whatever_the_pieces(audio_clips, rate):
    """Pieces of any size (empty, one sample, odd sizes), then flush: the samples of one-shot resampling
    of the whole signal. A second flush gives nothing more, and after a flush the resampler starts
    afresh (a stream's next utterance)."""
    audio = resample(audio_clips["61-70968-0000.flac"][:40000], 16000, rate)
    expected = resample(audio, rate, 16000)
    rng = np.random.default_rng(rate)
    resampler = StreamResampler(rate, 16000)
    for _ in range(2):
        pieces, start = [], 0
        while start < len(audio):
            size = int(rng.choice([0, 1, 2, 7, 160, 333, 960, 4099]))
            pieces.append(resampler.push(audio[start : start + size]))
            start += size
        pieces.append(resampler.flush())
        assert len(resampler.flush()) == 0
        np.testing.assert_allclose(np.concatenate(pieces), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [0, -16000, 1.5, "16000", True, 10**7])
def test_bad_sample_rates_are_refused(rate):
    with pytest.raises(AudioError, match="sample rate"):
        StreamResampler(rate, 16000)


def test_float64_samples_beyond_float32_range_are_named_by_their_peak():
    """1e300 in a float64 array overflowed to inf in the cast to float32 (a RuntimeWarning, an error
    under -W error) and was then reported as 'NaN or infinite', which the input does not contain."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AudioError, match="peak of 1e\\+300"):
            as_float32(np.array([0.0, 1e300]))
        with pytest.raises(AudioError, match="NaN or infinite"):
            as_float32(np.array([0.0, np.inf]))
    # float64 within range still converts
    assert as_float32(np.array([0.5, -0.25])).dtype == np.float32


@pytest.mark.parametrize("rate", [500, 768000])
def test_a_file_at_an_unsupported_rate_is_named_in_its_error(tmp_path, rate):
    """Every other unreadable file's error names the file; one at a rate outside 1000..384000 Hz said only
    'unsupported sample rate 500', so with several files the user could not tell which one failed."""
    path = tmp_path / f"rate{rate}.wav"
    sf.write(path, np.zeros(rate // 2, dtype=np.float32), rate)
    with pytest.raises(AudioError, match="sample rate") as info:
        load_audio_file(path, 16000)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_float_file_beyond_full_scale_is_refused_with_advice_for_a_file(tmp_path, audio_clips):
    """A float WAV exported hot (peak 7.8) was refused with the advice for an int16 array in a float
    array ('pass them as an int16 array, or divide by 32768'), which a user holding a file cannot act on."""
    path = tmp_path / "loud.wav"
    sf.write(path, audio_clips["jfk.wav"][:16000] * 10, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="peak of") as info:
        load_audio_file(path, 16000)
    message = str(info.value)
    assert str(path) in message and "normalis" in message and "int16" not in message and "\n" not in message


@pytest.mark.parametrize("rate", [1000, 8000, 11025, 44100, 48000, 96000])
def test_stream_resampler_tail_bound_covers_the_tail(rate):
    """A flush waits for room for `tail_bound()` samples before it flushes (engine/frontdoor.py): the
    tail must never be longer, whatever was pushed before."""
    rng = np.random.default_rng(rate)
    for total in (0, 1, 97, rate // 3, 2 * rate + 7):
        r = StreamResampler(rate, 16000)
        audio = (rng.standard_normal(total) * 0.1).astype(np.float32)
        for i in range(0, total, 331):
            r.push(audio[i : i + 331])
        bound = r.tail_bound()
        assert len(r.flush()) <= bound


@pytest.mark.parametrize("shape", [(16000, 2), (2, 16000)])
def test_a_stereo_array_is_told_how_to_downmix(shape):
    """A two-channel array (what soundfile.read returns for a stereo file) was refused as 'expected mono
    audio as a 1-D array', without saying how to make one."""
    with pytest.raises(AudioError, match=r"mean\(axis=") as info:
        as_float32(np.zeros(shape, dtype=np.float32))
    assert "1-D" in str(info.value)


@pytest.mark.parametrize("shape", [(16000, 1), (1, 16000)])
def test_a_one_channel_2d_array_is_not_told_it_has_several_channels(shape):
    """A (n, 1) array (soundfile.read(..., always_2d=True) of a mono file) or a (1, n) one (a batch of
    one tensor) was told it had 'several channels' to downmix; it has one, and needs only flattening."""
    with pytest.raises(AudioError, match=r"reshape\(-1\)") as info:
        as_float32(np.zeros(shape, dtype=np.float32))
    assert "several channels" not in str(info.value) and "1-D" in str(info.value)


def test_a_typed_memoryview_is_read_as_its_dtype_offline_as_in_the_engine():
    """The engine's push (and RemoteEngine's) read a memoryview of a float32 or int16 array as that array;
    as_float32, behind model.transcribe and a model stream's feed, refused the same view as 'raw bytes
    are ambiguous'. Raw byte views stay refused here: only the engine's push takes int16 bytes."""
    samples = np.array([0.5, -0.25, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(as_float32(memoryview(samples)), samples)
    pcm = np.array([16384, -8192], dtype=np.int16)
    np.testing.assert_array_equal(as_float32(memoryview(pcm)), [0.5, -0.25])
    with pytest.raises(AudioError, match="raw bytes"):
        as_float32(memoryview(pcm.tobytes()))
    view = memoryview(samples)
    view.release()
    with pytest.raises(AudioError, match="released memoryview"):
        as_float32(view)


def _name_not_utf8(tmp_path: Path) -> Path:
    """A path whose name is not UTF-8 (bytes a Linux file name may hold), or a skip where it cannot exist."""
    import os
    import sys

    if sys.platform == "win32":
        pytest.skip("Windows file names are Unicode")
    path = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.wav"))  # Latin-1 'é'
    try:
        path.touch()
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


def test_a_file_whose_name_is_not_utf8_is_read(tmp_path, audio_clips):
    """Python holds such a name with surrogates ('caf\\udce9.wav'), and soundfile encodes a str path as
    strict UTF-8: the file could not be read ('cannot read audio (... surrogates not allowed)')."""
    path = _name_not_utf8(tmp_path)
    plain = tmp_path / "plain.wav"
    sf.write(plain, audio_clips["jfk.wav"][:16000], 16000)
    path.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(load_audio_file(path, 16000), load_audio_file(plain, 16000))
