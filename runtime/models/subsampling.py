"""Convolutional time subsampling of the FastConformer encoder (NeMo's ConvSubsampling).

Module indices mirror NeMo's `pre_encode.conv` Sequential so checkpoint keys load unchanged.

Masking generalises NeMo's MaskedConvSequential from a valid length to a valid range [lo, hi) of input
frames. Everything outside the range is zeroed before every conv, exactly as NeMo's zero padding would be
at a stream's start and end. That is what lets a stream's first chunk (which NeMo runs with a shorter
input) share one input shape with later chunks: it is laid out as `2 * factor` masked frames followed by
its real frames, with lo = 2 * factor (see streaming/encoder_step.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig

KERNEL = 3
STRIDE = 2


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
            if cfg.subsampling == "dw_striding" and i > 0:
                self.strided.append(len(layers))
                layers.append(nn.Conv2d(in_ch, in_ch, KERNEL, STRIDE, groups=in_ch))
                layers.append(nn.Conv2d(in_ch, channels, 1))
            else:
                self.strided.append(len(layers))
                layers.append(nn.Conv2d(in_ch, channels, KERNEL, STRIDE))
            layers.append(nn.ReLU())
            in_ch = channels
        self.conv = nn.Sequential(*layers)
        freq = cfg.feat_in
        for _ in range(cfg.subsampling_layers):
            freq = self.out_length(freq)
        self.out = nn.Linear(channels * freq, cfg.d_model)

    def out_length(self, length):
        """Frames (or frequency bins) after one strided conv: NeMo's calc_length, floor mode."""
        return (length + sum(self.pad) - KERNEL) // STRIDE + 1

    def forward(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """x: [B, T, F] features; lo, hi: [B] valid input range. Returns ([B, T', d_model], lo', hi')."""
        x = x.unsqueeze(1)  # [B, 1, T, F]
        left, right = self.pad
        for i, layer in enumerate(self.conv):
            if i in self.strided:
                t = torch.arange(x.shape[2], device=x.device)
                keep = (t[None, :] >= lo[:, None]) & (t[None, :] < hi[:, None])  # [B, T]
                x = x * keep[:, None, :, None].to(x.dtype)
                x = layer(nn.functional.pad(x, (left, right, left, right)))
                # An output frame j reads inputs [2j - left, 2j - left + k): it equals a fresh start's
                # output when its reads begin at or after lo - left, i.e. j >= lo / 2 (lo is even here).
                lo = torch.div(lo, STRIDE, rounding_mode="floor")
                hi = self.out_length(hi)
            else:
                x = layer(x)
        t = torch.arange(x.shape[2], device=x.device)
        keep = (t[None, :] >= lo[:, None]) & (t[None, :] < hi[:, None])
        x = x * keep[:, None, :, None].to(x.dtype)
        b, c, frames, freq = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, frames, c * freq))  # [B, T', d_model]
        return x, lo, hi
