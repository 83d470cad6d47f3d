"""Audio input: file reading, validation, channel downmix and resampling, with clear errors."""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from .errors import AudioError


# Float PCM is nominally in [-1, 1]; filters and gain overshoot a little. Far beyond, the numbers are not
# audio at that scale (most often int16 sample values in a float array), and values near float32's
# limit overflow to inf inside the features and the VAD's recurrent state.
FLOAT_LIMIT = 4.0


def readable_array(audio, name: str = "audio") -> np.ndarray:
    """`np.asarray(audio)` (a torch tensor moved to the host first), or AudioError when no array can be
    read from it (a ragged list, a released buffer, a tensor without data)."""
    if type(audio) is np.ndarray:  # the common case, on every push: no attribute probing
        return audio
    try:
        if hasattr(audio, "detach") and hasattr(audio, "cpu"):  # torch.Tensor, without importing torch here
            audio = audio.detach().cpu()
            if str(audio.dtype) == "torch.bfloat16":  # numpy has no bfloat16
                audio = audio.float()
            audio = audio.numpy()
        return np.asarray(audio)
    except (ValueError, TypeError, RuntimeError, NotImplementedError, BufferError) as e:
        raise AudioError(f"{name}: cannot read samples from {type(audio).__name__}: {e}") from e


def typed_view_as_array(pcm):
    """A typed memoryview (of a float32 array, say) as an array of its own dtype, so it is read as that
    array would be; anything else, raw byte views ("B", "c") included, as it is. AudioError for a
    released view."""
    if isinstance(pcm, memoryview):
        try:
            fmt = pcm.format
        except ValueError as e:  # every read of a released view raises
            raise AudioError("cannot read samples from a released memoryview") from e
        if fmt not in ("B", "c"):
            return readable_array(pcm)
    return pcm


def as_float32(audio, *, name: str = "audio", too_loud: str | None = None) -> np.ndarray:
    """A contiguous, writable 1-D float32 array in [-1, 1] from float or integer PCM (numpy array, torch tensor,
    list, typed memoryview). int16/int32 are scaled to [-1, 1]. Raises AudioError for other shapes/dtypes, NaN/inf samples and
    float samples beyond +-FLOAT_LIMIT (`too_loud`: what to do about them, where the default advice, for
    int16 values in a float array, does not fit)."""
    audio = typed_view_as_array(audio)  # as the engine's push reads it
    if isinstance(audio, (bytes, bytearray, memoryview)):
        raise AudioError(f"{name}: raw bytes are ambiguous here; pass a numpy array (int16 PCM or float32)")
    if isinstance(audio, (str, os.PathLike)):  # NeMo's transcribe takes paths; numpy reads one as dtype <U or object
        raise AudioError(
            f"{name} is a file name, not samples: read the file first (soundfile.read(path, dtype='float32') "
            f"returns its samples and their rate) and pass the samples as a 1-D array"
        )
    arr = readable_array(audio, name)
    if arr.dtype.kind in "if" and not arr.dtype.isnative:  # big-endian PCM (">i2") is PCM too
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.int16:
        scale = 32768.0
    elif arr.dtype == np.int32:
        scale = 2147483648.0
    elif arr.dtype in (np.float32, np.float64, np.float16):
        scale = None
    else:
        raise AudioError(f"{name}: unsupported sample dtype {arr.dtype} (use float32 in [-1, 1] or int16 PCM)")
    if arr.ndim != 1:
        hint = ""
        if arr.ndim == 2 and min(arr.shape) == 1:  # one channel, as soundfile's always_2d reads mono
            hint = " (one channel: flatten it, e.g. audio.reshape(-1))"
        elif arr.ndim == 2 and min(arr.shape) <= 8:  # channels: frames x channels, or channels x frames
            axis = 1 if arr.shape[1] <= arr.shape[0] else 0
            hint = f" (several channels: downmix them first, e.g. audio.mean(axis={axis}))"
        raise AudioError(f"{name}: expected mono audio as a 1-D array, got shape {tuple(arr.shape)}{hint}")
    if scale is not None:
        # Scaled integer PCM lies in [-1, 1] and is finite: nothing to check (the check is a third of a
        # 20 ms frame's conversion, on every push of every stream).
        return arr.astype(np.float32) / scale
    # One pass over the samples serves both checks: the peak is NaN or infinite exactly when a sample is.
    # Taken before the cast: a float64 sample beyond float32's range would become inf there (a
    # RuntimeWarning), and be reported as the NaN/inf the input does not hold.
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if not math.isfinite(peak):
        raise AudioError(f"{name}: contains NaN or infinite samples")
    if peak > FLOAT_LIMIT:
        raise AudioError(
            f"{name}: float samples must lie in [-1, 1], got a peak of {peak:g} "
            f"({too_loud or 'int16 sample values? pass them as an int16 array, or divide by 32768'})"
        )
    # Contiguous (a no-op, the same array, when it already is): a reversed view (`audio[::-1]`) has a
    # negative stride, which `torch.from_numpy` refuses downstream. Writable: `torch.from_numpy` warns on
    # every read-only array (`np.frombuffer` of float32 bytes), so those are copied.
    out = np.ascontiguousarray(arr.astype(np.float32, copy=False))
    return out if out.flags.writeable else out.copy()


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a whole signal (soxr, high quality)."""
    check_rate(from_rate)
    if from_rate == to_rate or audio.size == 0:
        return audio
    import soxr

    return soxr.resample(audio, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def check_rate(rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= int(rate) <= 384000:
        raise AudioError(f"unsupported sample rate {rate!r}: expected an integer between 1000 and 384000 Hz")
    return int(rate)


class StreamResampler:
    """Incremental resampler for audio arriving in pieces (soxr's streaming API). `flush()` returns the
    filter's tail so no pushed audio is lost."""

    def __init__(self, from_rate: int, to_rate: int):
        self.from_rate = check_rate(from_rate)
        self.to_rate = to_rate
        self._stream = None
        if self.from_rate != to_rate:
            import soxr

            self._stream = soxr.ResampleStream(self.from_rate, to_rate, 1, dtype="float32", quality="HQ")

    def push(self, audio: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return audio
        return self._stream.resample_chunk(audio, last=False)

    def tail_bound(self) -> int:
        """The most samples `flush()` would give now (soxr's delay, in output samples: at most 0.5 more
        than the tail, rounded), without flushing."""
        return 0 if self._stream is None else math.ceil(self._stream.delay())

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return tail


def check_audio_path(path: str | os.PathLike) -> str:
    """The path as a str when it names something that is not a directory; an AudioError otherwise."""
    text = os.fspath(path)
    if not os.path.exists(text):
        raise AudioError(f"{text}: no such file")
    if os.path.isdir(text):
        raise AudioError(f"{text}: is a directory, not an audio file")
    return text


def load_audio_file(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Read an audio file, downmix to mono and resample to `sample_rate`: 1-D float32.

    Any format the libsndfile behind soundfile reads: wav, flac, ogg (Vorbis, Opus from libsndfile 1.0.29),
    mp3 (from 1.1.0), aiff and more; `soundfile.available_formats()` lists them.
    """
    import soundfile

    text = check_audio_path(path)
    # soundfile encodes a str path as strict UTF-8 outside Windows, so a name that is not UTF-8 (held with
    # surrogates) could not be opened; its bytes open it. Windows names are Unicode (soundfile's wide API).
    name = text if sys.platform == "win32" else os.fsencode(text)
    try:
        data, rate = soundfile.read(name, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports corrupt/unknown formats with various exception types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(f"{text}: cannot read audio ({reason})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{text}: the file holds no audio samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    mono = as_float32(mono, name=text, too_loud="a float file written without normalising: scale it into [-1, 1]")
    try:
        out = resample(mono, int(rate), sample_rate)
    except AudioError as exc:  # a rate outside check_rate's range: say which file has it
        raise AudioError(f"{text}: {exc}") from None
    if not len(out):  # a sample or two at a higher rate: nothing is left to transcribe (or to loop over)
        raise AudioError(f"{text}: its {data.shape[0]} samples at {rate} Hz make no samples at {sample_rate} Hz")
    return out
