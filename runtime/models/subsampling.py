"""Convolutional time subsampling of the FastConformer encoder (NeMo's ConvSubsampling).

Module indices mirror NeMo's `pre_encode.conv` Sequential so checkpoint keys load unchanged.

Masking generalises NeMo's MaskedConvSequential from a valid length to a valid range [lo, hi) of
each strided conv's input frames: everything outside is zeroed before the conv, exactly as NeMo's zero
padding and length masking would be at a stream's start and end.

Streaming (causal subsampling only): each strided conv (kernel 3, stride 2) reads the last input frame of
the previous step, which is all the overlap consecutive steps share, so a step convolves only its new
frames; the time axis is then not padded. The first conv keeps its last three input frames and so also
recomputes its previous step's last output, the frame the second conv needs (a one-channel mel frame
is cheap to keep; prepending a cached frame to the second conv's 128-channel input meant copying that
input, the largest tensor of the step); each later conv keeps its last input frame. A stream's first
step is laid out like every later one, its frames before the stream start being masked zeros (lo > 0),
so first and later steps share one shape.

On CPU the convs run channels-last, with the frequency padding done inside the conv: oneDNN's
channels-first kernels for these shapes (one input channel, then depthwise) ran 3-9x slower, and the
padded copy of each input cost as much as a conv (measured at batch 32, reduced model). The sums are
the same up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import EncoderConfig
from .skinny import linear

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


def _padded_conv(layer: nn.Conv2d, x: torch.Tensor, left: int, right: int, out_bins: int) -> torch.Tensor:
    """layer applied to x [B, C, T, F] zero-padded by (left, right) in frequency -> [B, C', T', out_bins]."""
    if x.device.type != "cpu":
        return layer(nn.functional.pad(x, (left, right)))
    # Pad `left` on both sides inside the conv: output j still reads bins [s*j - left, s*j - left + k), so
    # the outputs agree with the (left, right) padding's; a surplus last output (left > right) is dropped.
    # `to` rather than `contiguous`: with one channel, channels-first strides also pass as channels-last
    # and `contiguous` would keep them, leaving oneDNN on its channels-first kernel.
    cl = torch.channels_last
    out = nn.functional.conv2d(
        x.to(memory_format=cl), layer.weight.to(memory_format=cl), layer.bias,
        layer.stride, (0, left), layer.dilation, layer.groups,
    )
    return out[..., :out_bins]


def _prepend(frame: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, F] cached frame before [B, C, T, F] new frames -> [B, C, 1 + T, F]; on CPU channels-last
    (torch.cat of a channels-first cache row and channels-last frames gives channels-first, and turning
    that back costs a slow transposing copy of the whole input)."""
    if x.device.type != "cpu":
        return torch.cat((frame, x), dim=2)
    b, c, t, f = x.shape
    out = torch.empty((b, c, 1 + t, f), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out[:, :, :1] = frame
    out[:, :, 1:] = x
    return out


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
            # In place: the conv output it follows is fresh, and the first conv's is the step's largest
            # tensor (at batch 32, a new 10 MB buffer for the ReLU cost a third of that conv's time).
            layers.append(nn.ReLU(inplace=True))
            in_ch = channels
        self.conv = nn.Sequential(*layers)
        self.freq_in: list[int] = []  # frequency bins at each strided conv's input
        freq = cfg.feat_in
        for _ in range(cfg.subsampling_layers):
            self.freq_in.append(freq)
            freq = self.out_length(freq)
        self.out = nn.Linear(channels * freq, cfg.d_model)
        # Streaming: the first conv recomputes the second's cached input frame (see cache_shapes).
        self.recompute = len(self.strided) > 1

    def out_length(self, length):
        """Frames (or bins) after one strided conv with padding: NeMo's calc_length, floor mode."""
        return (length + sum(self.pad) - KERNEL) // STRIDE + 1

    def cache_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, frames, bins) of the input history a streaming step keeps for each strided conv
        but the second: the first keeps its last KERNEL input frames (mel), from which it recomputes the
        previous step's last output, the second's history, so the largest input is never copied to
        prepend a cached frame; each later one keeps its last input frame."""
        shapes = []
        for k, (i, bins) in enumerate(zip(self.strided, self.freq_in)):
            if k == 1:
                continue
            frames = KERNEL if k == 0 and self.recompute else 1
            shapes.append((self.conv[i].in_channels, frames, bins))
        return shapes

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        b, c, frames, freq = x.shape
        x = x.transpose(1, 2).reshape(b, frames, c * freq)
        return linear(x, self.out.weight, self.out.bias)  # [B, T', d_model]

    def forward(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        """Offline. x: [B, T, F]; lo, hi: [B] valid input range -> ([B, T', d_model], lo', hi')."""
        x = x.unsqueeze(1)  # [B, 1, T, F]
        left, right = self.pad
        for i, layer in enumerate(self.conv):
            if i in self.strided:
                x = nn.functional.pad(_range_mask(x, lo, hi), (0, 0, left, right))  # time padding
                x = _padded_conv(layer, x, left, right, self.out_length(x.shape[3]))
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
        """Streaming (causal only). x: [B, n, F] new frames, n a multiple of the factor; caches: input
        history of the previous step, [B, *shape] for each of `cache_shapes()` (zeros at the start).
        lo, hi: [B] valid range of [cache frame, new frames] (None: all valid), lo > 0 only on a stream's
        first step, hi only on its last. Returns ([B, n / factor, d_model], new caches, valid output
        frames [B] or None when hi is None)."""
        x = x.unsqueeze(1)  # [B, 1, n, F]
        left, right = self.pad
        extra = KERNEL - 1 if self.recompute else 0  # history frames of the first conv before the usual one
        cached = iter(caches)
        new_caches = []
        for i, layer in enumerate(self.conv):
            if i not in self.strided:
                x = layer(x)
                continue
            k = self.strided.index(i)
            if k == 0:
                x = torch.cat((next(cached).to(x.dtype), x), dim=2)  # [B, 1, extra + 1 + n, F]
                # The bounds count from the usual cache frame; lo = 0 (not a first step) keeps the history.
                lo_k = None if lo is None else torch.where(lo > 0, lo + extra, lo)
                x = _range_mask(x, lo_k, None if hi is None else hi + extra)
                new_caches.append(x[:, :, -(extra + 1) :])
            elif k == 1 and self.recompute:
                # The first conv's extra output, the previous step's last, is this input's cached frame.
                x = _range_mask(x, lo, hi)
            else:
                x = _prepend(next(cached).to(x.dtype), x)
                x = _range_mask(x, lo, hi)
                new_caches.append(x[:, :, -1:])
            x = _padded_conv(layer, x, left, right, self.out_length(x.shape[3]))  # no time padding
            # With the cache frame prepended, output j' reads inputs [2j', 2j' + 2]: valid outputs
            # start at (lo - 2) / 2 and end at hi // 2; the next conv's input gains a cache frame.
            lo = None if lo is None else torch.div(lo, STRIDE, rounding_mode="floor")
            hi = None if hi is None else torch.div(hi, STRIDE, rounding_mode="floor") + 1
        if hi is not None:
            hi = hi - 1  # no cache frame after the last conv
        lo = None if lo is None else lo - 1
        return self._project(_range_mask(x, lo, hi)), new_caches, hi
