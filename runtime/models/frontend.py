"""NeMo's log-mel frontend (FilterbankFeatures) in fp32.

Frame i is centred on sample i*hop and its n_fft-sample analysis frame spans
[i*hop - n_fft/2, i*hop + n_fft/2) of the pre-emphasised signal, zero outside the audio. Computing every
frame with `center=False` on such a zero-padded span gives bit-for-bit the frames NeMo computes with
`center=True` over the whole file, which is what lets the streaming frontend reproduce offline features.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FrontendConfig
from .precision import exact_fp32

NORMALIZE_EPS = 1e-5  # NeMo's CONSTANT added to the std in normalize_batch

_WINDOWS = {
    "hann": torch.hann_window,
    "hamming": torch.hamming_window,
    "blackman": torch.blackman_window,
    "bartlett": torch.bartlett_window,
}


def valid_frames(cfg: FrontendConfig, num_samples: torch.Tensor | int):
    """Number of valid feature frames for `num_samples` of audio (NeMo's get_seq_len)."""
    pad = (cfg.n_fft // 2) * 2
    return (num_samples + pad - cfg.n_fft) // cfg.hop_length


def preemphasis(audio: torch.Tensor, coeff: float, previous: torch.Tensor | None = None) -> torch.Tensor:
    """y[n] = x[n] - coeff*x[n-1]; y[0] = x[0] at a stream's start, or uses `previous` (the last raw
    sample before this piece, shape [B]) when continuing a stream."""
    # audio: [B, S]
    if audio.shape[1] == 0:
        return audio
    first = audio[:, :1] if previous is None else audio[:, :1] - coeff * previous.unsqueeze(1)
    return torch.cat((first, audio[:, 1:] - coeff * audio[:, :-1]), dim=1)


class LogMelFrontend(nn.Module):
    """Log-mel features; `window` and `fb` are loaded from the checkpoint (preprocessor.featurizer.*)."""

    def __init__(self, cfg: FrontendConfig):
        super().__init__()
        self.cfg = cfg
        window = _WINDOWS[cfg.window](cfg.win_length, periodic=False)
        self.register_buffer("window", window)  # [win_length]
        self.register_buffer("fb", torch.zeros(1, cfg.n_mels, cfg.n_fft // 2 + 1))  # [1, n_mels, bins]

    def frames(self, padded: torch.Tensor) -> torch.Tensor:
        """Log-mel frames of a pre-emphasised signal that already carries n_fft/2 samples of context
        (or zeros) before its first frame centre and after its last: [B, S] -> [B, n_mels, T]."""
        with exact_fp32(torch.float32):
            return self._frames(padded)

    def _frames(self, padded: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        spec = torch.stft(
            padded,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window,
            center=False,
            return_complex=True,
        )  # [B, bins, T]
        # NeMo takes sqrt(re^2 + im^2) and then raises it to mag_power; kept for bit parity.
        mag = torch.view_as_real(spec).pow(2).sum(-1).sqrt()
        if cfg.mag_power != 1.0:
            mag = mag.pow(cfg.mag_power)
        mel = torch.matmul(self.fb, mag)  # [B, n_mels, T]
        if cfg.log:
            if cfg.log_zero_guard_type == "add":
                mel = torch.log(mel + cfg.log_zero_guard_value)
            else:
                mel = torch.log(torch.clamp(mel, min=cfg.log_zero_guard_value))
        return mel

    def normalize(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Utterance-level normalization over valid frames (NeMo's normalize_batch)."""
        # mel: [B, n_mels, T]; lengths: [B]
        kind = self.cfg.normalize
        if not kind:
            return mel
        valid = torch.arange(mel.shape[2], device=mel.device)[None, :] < lengths[:, None]  # [B, T]
        count = valid.sum(dim=1)  # [B]
        if kind == "per_feature":
            mean = torch.where(valid[:, None], mel, 0.0).sum(dim=2) / count[:, None]  # [B, n_mels]
            var = torch.where(valid[:, None], mel - mean[:, :, None], 0.0) ** 2
            std = torch.sqrt(var.sum(dim=2) / (count[:, None] - 1.0))
            std = std.masked_fill(std.isnan(), 0.0) + NORMALIZE_EPS
            out = (mel - mean[:, :, None]) / std[:, :, None]
            return out.masked_fill(~valid[:, None], 0.0)
        # all_features: one mean/std per utterance
        means, stds = [], []
        for b in range(mel.shape[0]):
            seg = mel[b, :, : int(lengths[b])]
            means.append(seg.mean())
            stds.append(seg.std())
        mean = torch.stack(means).view(-1, 1, 1)
        std = torch.stack(stds).view(-1, 1, 1) + NORMALIZE_EPS
        return (mel - mean) / std

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Offline features of a padded batch: audio [B, S] fp32, lengths [B] in samples ->
        (features [B, n_mels, T] with frames >= valid length set to pad_value, valid lengths [B])."""
        cfg = self.cfg
        audio = audio.float()
        n_valid = valid_frames(cfg, lengths)
        n_valid = torch.where(lengths == 0, torch.zeros_like(n_valid), n_valid)
        if cfg.preemph is not None:
            audio = preemphasis(audio, cfg.preemph)
        in_audio = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
        audio = audio.masked_fill(~in_audio, 0.0)
        half = cfg.n_fft // 2
        mel = self.frames(nn.functional.pad(audio, (half, half)))
        mel = self.normalize(mel, n_valid)
        frame_valid = torch.arange(mel.shape[2], device=mel.device)[None, :] < n_valid[:, None]
        mel = mel.masked_fill(~frame_valid[:, None], cfg.pad_value)
        return mel, n_valid
