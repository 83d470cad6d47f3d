"""Low-level single-stream streaming API: feed audio pieces, read the growing hypothesis, finalize.

`CacheAwareStream` runs each chunk through the encoder once, carrying caches, and decodes it with the
carried transducer state; its final equals offline transcription with the same attention context.
`FullContextStream` serves models whose encoder sees the whole utterance (e.g. Parakeet): partials
re-transcribe the audio so far, and the final is the offline transcription of the utterance.
Both reset after `finalize()`, ready for the next utterance. The multi-stream engine batches the same
step functions across streams; these classes are the reference for what one stream computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..audio import StreamResampler, as_float32
from ..decoding.greedy import DecodedChunk, greedy_decode, initial_state
from ..errors import StreamError
from ..transcript import Transcript
from .encoder_step import EncoderCache, encoder_step
from .frontend import IncrementalFrontend
from .plan import ChunkPlan

if TYPE_CHECKING:
    from ..asr import ASRModel


class _Hypothesis:
    """Labels emitted so far in the current utterance."""

    def __init__(self):
        self.labels: list[int] = []
        self.frames: list[int] = []
        self.durations: list[int] = []

    def extend(self, chunk: DecodedChunk, row: int = 0) -> int:
        self.labels += chunk.labels[row]
        self.frames += chunk.frames[row]
        self.durations += chunk.durations[row]
        return len(chunk.labels[row])


class _StreamBase:
    def __init__(self, model: "ASRModel", sample_rate: int):
        self.model = model
        self.sample_rate = sample_rate
        self._resampler = StreamResampler(sample_rate, model.sample_rate)
        self._closed = False

    def _reset_resampler(self) -> None:
        """Drop the audio the resampler still holds: after a reset it belonged to the old utterance and
        would open the new one (finalize has taken it already)."""
        self._resampler = StreamResampler(self.sample_rate, self.model.sample_rate)

    def _check_open(self) -> None:
        if self._closed:
            raise StreamError("stream is closed")

    def _prepare(self, audio) -> np.ndarray:
        self._check_open()
        return self._resampler.push(as_float32(audio))

    def close(self) -> None:
        """Discard the stream's state; further calls raise StreamError."""
        self._closed = True


class CacheAwareStream(_StreamBase):
    """One stream of a cache-aware model in one latency mode."""

    def __init__(self, model: "ASRModel", plan: ChunkPlan, sample_rate: int):
        super().__init__(model, sample_rate)
        self.plan = plan
        self.frontend = IncrementalFrontend(model.module.frontend)
        self.reset()

    def reset(self) -> None:
        """Start a new utterance: fresh features, caches and decoder state."""
        self._check_open()
        module, shape = self.model.module, self.plan.shape
        device = self.model.device
        self._reset_resampler()
        self.frontend.reset()
        # Mel frames from absolute index `mel_start`; those before 0 are the zero padding of the start.
        self.mel = torch.zeros(module.cfg.frontend.n_mels, -shape.first_start, device=device)
        self.mel_start = shape.first_start
        self.window_start = shape.first_start
        self.cache = EncoderCache.zeros(module.encoder, shape.cache_frames, 1, device)
        self.decoder = initial_state(module.decoder, module.joint, 1, device)
        self.hypothesis = _Hypothesis()

    def next_window(self, available: int) -> tuple[torch.Tensor, int, int]:
        """The next step's input: (mel [step_mel, n_mels] with zeros past `available` frames, lo, hi),
        lo and hi as encoder_step takes them (0 and step_mel + 1 when they mask nothing)."""
        shape = self.plan.shape
        offset = self.window_start - self.mel_start
        window = self.mel[:, offset : offset + min(available, shape.step_mel)]
        if window.shape[1] < shape.step_mel:
            window = torch.nn.functional.pad(window, (0, shape.step_mel - window.shape[1]))
        # hi counts the subsampling's cached frame in front of the window.
        return window.T, shape.first_valid(self.window_start), 1 + min(available, shape.step_mel)

    def _step(self, available: int) -> int:
        """Encode and decode the window at `window_start`, holding `available` of its step_mel frames."""
        shape = self.plan.shape
        window, first, end = self.next_window(available)
        device = self.model.device
        lo = torch.tensor([first], device=device) if first else None
        hi = torch.tensor([end], device=device) if end <= shape.step_mel else None
        module = self.model.module
        encoded, length, self.cache = encoder_step(module.encoder, self.plan, window[None], self.cache, lo, hi)
        decoded, self.decoder = greedy_decode(
            module.decoder, module.joint, encoded, length, self.decoder, *self.model.decoding_args
        )
        self.window_start += shape.step_mel
        self.mel = self.mel[:, self.window_start - self.mel_start :]
        self.mel_start = self.window_start
        return self.hypothesis.extend(decoded)

    def _run_full_windows(self) -> int:
        step, emitted = self.plan.shape.step_mel, 0
        while self.mel_start + self.mel.shape[1] >= self.window_start + step:
            emitted += self._step(step)
        return emitted

    def feed(self, audio) -> int:
        """Push audio (1-D float32 in [-1, 1] or int16, any length, at the stream's sample rate).
        Returns how many tokens were added to the hypothesis."""
        pcm = self._prepare(audio)
        mel = self.frontend.push(torch.from_numpy(pcm))
        self.mel = torch.cat((self.mel, mel), dim=1)
        return self._run_full_windows()

    def transcript(self) -> Transcript:
        """The hypothesis of the current utterance so far (every token emitted is final)."""
        self._check_open()
        h = self.hypothesis
        return self.model.make_transcript(h.labels, h.frames, h.durations)

    def finalize(self) -> Transcript:
        """Flush all audio pushed so far through the model, return the utterance's final transcript and
        reset for the next utterance."""
        self._check_open()
        pcm = self._resampler.flush()
        mel = torch.cat((self.frontend.push(torch.from_numpy(pcm)), self.frontend.flush()), dim=1)
        self.mel = torch.cat((self.mel, mel), dim=1)
        self._run_full_windows()
        mel_end = self.mel_start + self.mel.shape[1]  # frames of the utterance (index of the last + 1)
        # Earlier steps covered the frames before window_start: a last, partial step is needed only if
        # real frames lie beyond it.
        if mel_end > max(0, self.window_start):
            self._step(mel_end - self.window_start)
        final = self.transcript()
        self.reset()
        return final


class FullContextStream(_StreamBase):
    """One stream of a full-context model: re-transcribes the utterance every `interval_ms` of audio."""

    def __init__(self, model: "ASRModel", interval_ms: int, sample_rate: int):
        super().__init__(model, sample_rate)
        self.interval = max(1, model.sample_rate * interval_ms // 1000)
        self.reset()

    def reset(self) -> None:
        self._check_open()
        self._reset_resampler()
        self.audio: list[np.ndarray] = []
        self.samples = 0
        self.since_update = 0
        self._current = Transcript(text="", sample_rate=self.model.sample_rate)

    def feed(self, audio) -> int:
        pcm = self._prepare(audio)
        # Kept until the utterance ends, and the caller may refill its array meanwhile (a capture
        # callback's buffer): float32 at the model's rate comes through unconverted (it, or a view of
        # it), anything else as a new array.
        self.audio.append(pcm.copy() if pcm is audio or not pcm.flags.owndata else pcm)
        self.samples += pcm.shape[0]
        self.since_update += pcm.shape[0]
        if self.since_update < self.interval:
            return 0
        # Counted on from the interval's end, not from 0: pieces that overshoot it (600 ms at 1000 ms)
        # would otherwise stretch every interval by their overshoot.
        self.since_update %= self.interval
        before = len(self._current.tokens)
        self._current = self.model.transcribe(np.concatenate(self.audio), sample_rate=self.model.sample_rate)
        return max(0, len(self._current.tokens) - before)

    def transcript(self) -> Transcript:
        """The latest re-transcription (it may revise earlier words: the model sees the whole utterance)."""
        self._check_open()
        return self._current

    def finalize(self) -> Transcript:
        self._check_open()
        self.audio.append(self._resampler.flush())
        final = self.model.transcribe(np.concatenate(self.audio), sample_rate=self.model.sample_rate)
        self.reset()
        return final
