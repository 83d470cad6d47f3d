"""Incremental log-mel features: audio in pieces of any size in, exactly the offline frames out.

Frame i needs the pre-emphasised samples under its window, [i*hop - n_fft/2 + lead, ... + win_length)
where lead = (n_fft - win_length) / 2; it is emitted as soon as they have all arrived. The rest of its
n_fft span is multiplied by zero window taps, so zeros stand in for samples not yet received. `flush()`
emits the remaining valid frames with zeros after the end, as offline feature extraction does.
"""

from __future__ import annotations

import torch

from ..models.frontend import LogMelFrontend, preemphasis, valid_frames


class IncrementalFrontend:
    """Per-stream feature state. Not thread-safe; one per stream."""

    def __init__(self, frontend: LogMelFrontend):
        if frontend.cfg.normalize:
            raise ValueError("incremental features need a model without utterance-level normalization")
        self.frontend = frontend
        cfg = frontend.cfg
        self.hop = cfg.hop_length
        self.half = cfg.n_fft // 2
        lead = (cfg.n_fft - cfg.win_length) // 2
        self.reach = lead + cfg.win_length - self.half  # samples a frame needs after its centre
        self.device = frontend.window.device
        self.reset()

    def reset(self) -> None:
        # Pre-emphasised samples from absolute index `buffer_start`; zeros stand for time before 0.
        self.buffer = torch.zeros(self.half, device=self.device)
        self.buffer_start = -self.half
        self.previous: torch.Tensor | None = None  # last raw sample, for pre-emphasis continuity
        self.total = 0  # samples received
        self.next_frame = 0

    def _emit(self, count: int) -> torch.Tensor:
        """Compute frames next_frame .. next_frame+count-1 from the buffer: [n_mels, count]."""
        if count <= 0:
            return torch.zeros(self.frontend.cfg.n_mels, 0, device=self.device)
        first = self.next_frame * self.hop - self.half - self.buffer_start
        span = (count - 1) * self.hop + 2 * self.half
        segment = self.buffer[first : first + span]
        if segment.shape[0] < span:
            segment = torch.nn.functional.pad(segment, (0, span - segment.shape[0]))
        mel = self.frontend.frames(segment[None])[0]  # [n_mels, count]
        self.next_frame += count
        drop = self.next_frame * self.hop - self.half - self.buffer_start
        if drop > 0:
            self.buffer = self.buffer[drop:]
            self.buffer_start += drop
        return mel

    @torch.no_grad()
    def push(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [S] float32 at the model's rate -> newly complete frames [n_mels, n]."""
        if audio.numel():
            audio = audio.to(self.device, torch.float32)
            coeff = self.frontend.cfg.preemph
            if coeff is not None:
                prev = None if self.previous is None else self.previous.view(1)
                self.previous = audio[-1].clone()
                audio = preemphasis(audio[None], coeff, prev)[0]
            self.buffer = torch.cat((self.buffer, audio))
            self.total += audio.shape[0]
        ready = (self.total - self.reach) // self.hop + 1 if self.total >= self.reach else 0
        return self._emit(ready - self.next_frame)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """The remaining valid frames, computed with zeros after the last sample: [n_mels, n]."""
        count = int(valid_frames(self.frontend.cfg, self.total)) if self.total else 0
        return self._emit(count - self.next_frame)
