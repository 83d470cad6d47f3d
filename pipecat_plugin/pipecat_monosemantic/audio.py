"""Each audio frame's own format, brought to the one the engine stream was opened with.

Pipecat's `InputAudioRawFrame` carries its own `sample_rate` and `num_channels`, and nothing stops a
transport or an upstream processor from sending frames that differ from the pipeline's input rate. The
engine stream takes a sample rate only when it opens, and its bytes are mono int16, so a stereo frame or a
48 kHz frame pushed as is would be heard as audio two or three times as long: the wrong text, with no
error. Frames are therefore downmixed (the average of the channels) and resampled to the stream's rate
here, before they reach the stream.
"""

from __future__ import annotations

import numpy as np

from monosemantic.audio import StreamResampler, check_rate
from monosemantic.errors import AudioError

_NOTHING = b""


def _to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in int16 units -> int16 little-endian bytes."""
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


class FrameAudio:
    """Turns the audio of frames of any channel count and sample rate into mono int16 PCM at `rate`.

    Stateful: the resampler holds back the last few milliseconds of what it was given (its filter's
    lookahead), so `flush()` must be called, and its bytes pushed, before the stream is flushed; a change
    of input rate flushes by itself, ahead of the new frame's audio.
    """

    def __init__(self, rate: int):
        self.rate = rate
        self._resampler: StreamResampler | None = None

    def convert(self, audio: bytes, sample_rate, num_channels) -> bytes:
        """The frame's audio as mono int16 bytes at `rate` (preceded by the audio held back from frames at
        an earlier input rate). AudioError for a channel count, sample rate or byte count that is not
        16-bit PCM; nothing is consumed then."""
        # Validated before anything is taken from the resampler, so a refused frame loses no earlier audio.
        if isinstance(num_channels, bool) or not isinstance(num_channels, (int, np.integer)) or num_channels < 1:
            raise AudioError(f"unsupported channel count {num_channels!r}: expected a positive integer")
        rate = self.rate if sample_rate == self.rate else check_rate(sample_rate)
        width = 2 * int(num_channels)
        if len(audio) % width:
            if width == 2:
                raise AudioError(f"PCM bytes must be 16-bit samples: got an odd byte count ({len(audio)})")
            raise AudioError(
                f"{len(audio)} bytes are not whole 16-bit samples of {num_channels} channels "
                f"({width} bytes per sample frame)"
            )
        held = _NOTHING
        if self._resampler is not None and self._resampler.from_rate != rate:
            held = self.flush()
        if num_channels == 1 and rate == self.rate:
            return held + audio if held else audio
        samples = np.frombuffer(audio, dtype="<i2").astype(np.float32)
        if num_channels > 1:
            samples = samples.reshape(-1, int(num_channels)).mean(axis=1, dtype=np.float32)
        if rate == self.rate:
            return held + _to_pcm16(samples)
        if self._resampler is None:
            self._resampler = StreamResampler(rate, self.rate)
        return held + _to_pcm16(self._resampler.push(samples / 32768.0) * 32768.0)

    def flush(self) -> bytes:
        """The audio the resampler still holds (empty when no frame needed resampling)."""
        if self._resampler is None:
            return _NOTHING
        tail = self._resampler.flush()
        self._resampler = None
        return _to_pcm16(tail * 32768.0)
