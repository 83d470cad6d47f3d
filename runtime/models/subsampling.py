"""Convolutional time subsampling of the FastConformer encoder (NeMo's ConvSubsampling).

Module indices mirror NeMo's `pre_encode.conv` Sequential so checkpoint keys load unchanged.

Masking generalises NeMo's MaskedConvSequential from a valid length to a valid range [lo, hi) of
each strided conv's input frames: everything outside is zeroed before the conv, exactly as NeMo's zero
padding and length masking would be at a stream's start and end.

Streaming (causal subsampling only): each strided conv (kernel 3, stride 2) keeps the last input frame of
the previous step, which is all the overlap consecutive steps share, so a step convolves only its new
frames; the time axis is then not padded. A stream's first step is laid out like every later one, its
frames before the stream start being masked zeros (lo > 0), so first and later steps share one shape.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig

KERNEL = 3
STRIDE = 2


def _range_mask(x: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None) -> torch.Tensor:
    """Zero time steps outside [lo, hi) of x [B, C, T, F]; None bounds mean unbounded."""
    if lo is None and hi is None:
        return x
    t = torch.arange(x.shape[2], device=x.device)[None, :]
    keep = torch.ones(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
    if lo is not None:
        keep &= t >= lo[:, None]
    if hi is not None:
        keep &= t < hi[:, None]
    return x * keep[:, None, :, None].to(x.dtype)


class ConvSubsampling(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.causal = cfg.causal_downsampling
        channels = cfg.subsampling_conv_channels
        # Causal convs pad (k-1) before and (s-1) after, in time and frequency alike.
        self.pad = (KERNEL - 1, STRIDE - 1) if self.causal else ((KERNEL - 1) // 2, (KERNEL - 1) // 2)
        layers: list[nn.Module] = []
        self.strided: list[int] = []  # indices of the strided convs in `conv`
        in_ch = 1
        for i in range(cfg.subsampling_layers):
            self.strided.append(len(layers))
            if cfg.subsampling == "dw_striding" and i > 0:
                layers.append(nn.Conv2d(in_ch, in_ch, KERNEL, STRIDE, groups=in_ch))
                layers.append(nn.Conv2d(in_ch, channels, 1))
            else:
                layers.append(nn.Conv2d(in_ch, channels, KERNEL, STRIDE))
            layers.append(nn.ReLU())
            in_ch = channels
        self.conv = nn.Sequential(*layers)
        self.freq_in: list[int] = []  # frequency bins at each strided conv's input
        freq = cfg.feat_in
        for _ in range(cfg.subsampling_layers):
            self.freq_in.append(freq)
            freq = self.out_length(freq)
        self.out = nn.Linear(channels * freq, cfg.d_model)

    def out_length(self, length):
        """Frames (or bins) after one strided conv with padding: NeMo's calc_length, floor mode."""
        return (length + sum(self.pad) - KERNEL) // STRIDE + 1

    def cache_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, 1, bins) of the one-frame input cache of each strided conv."""
        return [(self.conv[i].in_channels, 1, f) for i, f in zip(self.strided, self.freq_in)]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        b, c, frames, freq = x.shape
        return self.out(x.transpose(1, 2).reshape(b, frames, c * freq))  # [B, T', d_model]

    def forward(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """Offline. x: [B, T, F]; lo, hi: [B] valid input range -> ([B, T', d_model], lo', hi')."""
        x = x.unsqueeze(1)  # [B, 1, T, F]
        left, right = self.pad
        for i, layer in enumerate(self.conv):
            if i in self.strided:
                x = layer(nn.functional.pad(_range_mask(x, lo, hi), (left, right, left, right)))
                # Output j reads inputs [2j - left, 2j - left + k): it equals a fresh start's output when
                # its reads begin at or after lo - left, i.e. j >= lo / 2 (lo is a multiple of the factor).
                lo = torch.div(lo, STRIDE, rounding_mode="floor")
                hi = self.out_length(hi)
            else:
                x = layer(x)
        return self._project(_range_mask(x, lo, hi)), lo, hi

    def step(
        self,
        x: torch.Tensor,
        caches: list[torch.Tensor],
        lo: torch.Tensor | None = None,
        hi: torch.Tensor | None = None,
    ):
        """Streaming (causal only). x: [B, n, F] new frames, n a multiple of the factor; caches: per
        strided conv [B, C_in, 1, F_in], its last input frame of the previous step (zeros at the start).
        lo, hi: [B] valid range of [cache frame, new frames] (None: all valid), lo > 0 only on a stream's
        first step, hi only on its last. Returns ([B, n / factor, d_model], new caches, valid output
        frames [B] or None when hi is None)."""
        x = x.unsqueeze(1)  # [B, 1, n, F]
        left, right = self.pad
        new_caches = []
        for i, layer in enumerate(self.conv):
            if i in self.strided:
                x = torch.cat((caches[len(new_caches)].to(x.dtype), x), dim=2)
                x = _range_mask(x, lo, hi)
                new_caches.append(x[:, :, -1:])
                x = layer(nn.functional.pad(x, (left, right)))  # frequency padding only
                # With the cache frame prepended, output j' reads inputs [2j', 2j' + 2]: valid outputs
                # start at (lo - 2) / 2 and end at hi // 2; the next conv's input gains a cache frame.
                lo = None if lo is None else torch.div(lo, STRIDE, rounding_mode="floor")
                hi = None if hi is None else torch.div(hi, STRIDE, rounding_mode="floor") + 1
            else:
                x = layer(x)
        if hi is not None:
            hi = hi - 1  # no cache frame after the last conv
        lo = None if lo is None else lo - 1
        return self._project(_range_mask(x, lo, hi)), new_caches, hi
