"""Silero VAD v5/v6 (16 kHz) as a plain nn.Module whose recurrent state is passed in and returned.

The package's own model (`silero_vad.load_silero_vad()`) keeps its LSTM state and audio context inside the
model object, for one fixed batch. The engine instead runs VAD for every active stream in one batched call
per tick, with each stream's state living in a slot-indexed `VADState` that it gathers and scatters. The
network and weights are those of the package's TorchScript model (`silero_vad/data/silero_vad.jit`), and
the forward pass computes the same function, its convolutions as matrix products (faster for the few
windows of a tick), so the probabilities equal the package's to within ~1e-6 (summation order).

`forward` consumes one 512-sample window per stream; `forward_windows` several consecutive windows per
stream in one call (the engine's VAD call per tick). Per window:

    [B, 64 context | 512 window] -> reflect-pad right by 64 -> [B, 640]
    -> STFT (256-tap cos/sin basis, hop 128)   -> [B, 4, 258] -> magnitude [B, 4, 129]
    -> conv k3 s1 + ReLU [B, 4, 128] -> conv k3 s2 + ReLU [B, 2, 64] -> conv k3 s2 + ReLU [B, 1, 64]
    -> conv k3 s1 + ReLU [B, 1, 128] -> LSTM cell (128) -> ReLU -> 1x1 conv -> sigmoid -> prob [B]

(time-major here; the package's tensors are channel-major).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingDependencyError, ModelLoadError
from ..models.precision import exact_fp32

SAMPLE_RATE = 16000
WINDOW = 512  # samples per stream per call (32 ms); the model accepts no other size at 16 kHz
CONTEXT = 64  # trailing samples of the previous window prepended to each window
HIDDEN = 128  # LSTM width

_N_FFT = 256
_HOP = 128
_JIT_FILE = "silero_vad.jit"
_FEATURE = "Silero voice activity detection"


@dataclass
class VADState:
    """Recurrent state of B streams, batch-first so the engine can index slots along dim 0.

    A fresh stream (and a reset row) is all zeros, exactly like the package model after `reset_states()`.
    """

    h: torch.Tensor  # [B, 128] LSTM hidden state
    c: torch.Tensor  # [B, 128] LSTM cell state
    context: torch.Tensor  # [B, 64] last 64 samples of the stream's previous window

    @classmethod
    def zeros(cls, batch: int, device: torch.device | str | None = None) -> VADState:
        return cls(
            h=torch.zeros(batch, HIDDEN, device=device),
            c=torch.zeros(batch, HIDDEN, device=device),
            context=torch.zeros(batch, CONTEXT, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.h.shape[0]

    @property
    def device(self) -> torch.device:
        return self.h.device

    @classmethod
    def cat(cls, states: Sequence[VADState]) -> VADState:
        """Stack states of several groups of streams into one batch (in order)."""
        return cls(
            h=torch.cat([s.h for s in states]),
            c=torch.cat([s.c for s in states]),
            context=torch.cat([s.context for s in states]),
        )

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> VADState:
        """The state of the given rows (a gather: new tensors, unless `rows` is a slice)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return VADState(h=self.h[rows], c=self.c[rows], context=self.context[rows])

    def assign_(self, rows: torch.Tensor | Sequence[int] | slice, src: VADState) -> VADState:
        """Write `src` (one row per entry of `rows`) into the given rows, in place (the scatter)."""
        if not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.h[rows] = src.h
        self.c[rows] = src.c
        self.context[rows] = src.context
        return self

    def reset_(self, mask: torch.Tensor) -> VADState:
        """Zero the rows where `mask` ([B] bool) is True, in place: those streams start afresh.

        Done with a multiply rather than boolean indexing so it has static shapes (graph-capturable)."""
        keep = (~mask.to(device=self.device, dtype=torch.bool)).to(self.h.dtype)  # [B]
        self.h.mul_(keep[:, None])
        self.c.mul_(keep[:, None])
        self.context.mul_(keep[:, None])
        return self

    def clone(self) -> VADState:
        return VADState(h=self.h.clone(), c=self.c.clone(), context=self.context.clone())


class SileroVAD(nn.Module):
    """The Silero VAD 16 kHz network with explicit state; the TorchScript model's parameter names are
    mapped onto these on load."""

    def __init__(self) -> None:
        super().__init__()
        # Rows 0..128 of the basis are the cosine (real) filters, rows 129..257 the sine (imaginary) ones.
        self.stft_conv = nn.Conv1d(1, 2 * (_N_FFT // 2 + 1), _N_FFT, stride=_HOP, bias=False)
        self.conv1 = nn.Conv1d(_N_FFT // 2 + 1, 128, 3, stride=1, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, HIDDEN, 3, stride=1, padding=1)
        self.lstm_cell = nn.LSTMCell(HIDDEN, HIDDEN)
        self.final_conv = nn.Conv1d(HIDDEN, 1, 1)

    @classmethod
    def from_package(
        cls, device: torch.device | str | None = None, *, path: str | Path | None = None
    ) -> SileroVAD:
        """The model with the weights of the installed `silero-vad` package, in eval mode on `device`.

        The weights come from the package's TorchScript model (`silero_vad.jit`, or the `.jit` file at
        `path`), the one `silero_vad.load_silero_vad()` runs. (The `silero_vad_16k.safetensors` that
        silero-vad 6.2.3 also bundles holds other weights, whose probabilities differ by up to ~0.7 on
        speech, so it is not used.)"""
        path = Path(path) if path is not None else package_file(_JIT_FILE)
        if not path.is_file():
            raise _silero_missing(f"The Silero VAD model file {path} is missing.")
        weights = _read_jit(path)
        model = cls()
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as e:  # missing/unexpected keys or shape mismatches
            raise ModelLoadError(f"{path} does not hold Silero VAD v5/v6 16 kHz weights: {e}") from e
        return model.to(device).eval().requires_grad_(False)

    def initial_state(self, batch: int) -> VADState:
        return VADState.zeros(batch, device=self.stft_conv.weight.device)

    def forward(self, windows: torch.Tensor, state: VADState) -> tuple[torch.Tensor, VADState]:
        """One 512-sample window per stream -> (speech probability [B], the streams' next state).

        `windows` [B, 512] float32 follow, per row, the audio that produced `state`'s row. The input
        state is not modified."""
        if windows.ndim != 2 or windows.shape[1] != WINDOW:
            raise ValueError(f"expected windows of shape [B, {WINDOW}], got {tuple(windows.shape)}")
        probs, state = self.forward_windows(windows, np.ones(windows.shape[0], dtype=np.int64), state)
        return probs[:, 0], state

    def forward_windows(self, audio: torch.Tensor, counts: Sequence[int], state: VADState) -> tuple[torch.Tensor, VADState]:
        """Several consecutive windows per stream in one call: the convolutional front of every window at
        once (it needs no recurrent state: a window's 64-sample context is the end of the window before
        it), then the LSTM window by window.

        audio [B, W * 512]: row b holds its next counts[b] (1..W) windows, zero-padded after them.
        Returns probabilities [B, W] (entries past a row's count are meaningless) and each row's state
        after its last window. Each row's probabilities equal those of `forward` called window by
        window. The input state is not modified."""
        batch = audio.shape[0]
        if audio.ndim != 2 or audio.shape[1] % WINDOW or audio.shape[1] == 0:
            raise ValueError(f"expected audio of shape [B, W * {WINDOW}], got {tuple(audio.shape)}")
        counts = np.asarray(counts, dtype=np.int64)
        width = audio.shape[1] // WINDOW
        if batch != state.batch_size or counts.shape != (batch,) or counts.min(initial=1) < 1 or counts.max(initial=1) > width:
            raise ValueError(f"{batch} rows of {width} windows, counts {counts.tolist()}, for a state of {state.batch_size} streams")
        device = audio.device
        # cuDNN's and cuBLAS's TF32 modes move CUDA probabilities by up to 4e-3 from the package's.
        with exact_fp32(self.stft_conv.weight.dtype):
            x = torch.cat([state.context, audio], dim=1)  # [B, 64 + W * 512]
            frames = x.unfold(1, CONTEXT + WINDOW, WINDOW).reshape(batch * width, CONTEXT + WINDOW)  # [B * W, 576]
            real = np.flatnonzero(np.arange(width)[None, :] < counts[:, None])  # windows that hold audio
            if len(real) == batch * width:
                features = self._features(frames)  # [B * W, 128]
            else:  # only the real windows go through the convolutions
                index = torch.from_numpy(real).to(device)
                features = frames.new_zeros(batch * width, HIDDEN).index_copy_(0, index, self._features(frames[index]))
            out, h, c = self._lstm(features.view(batch, width, HIDDEN), state, counts)
            probs = self._probability(out.view(batch * width, HIDDEN)).view(batch, width)
            # The next context is the last 64 samples of each row's last real window.
            last = (counts[:, None] * WINDOW + np.arange(CONTEXT)[None, :])  # [B, 64]
            context = torch.gather(x, 1, torch.from_numpy(last).to(device))
            return probs, VADState(h=h, c=c, context=context)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 576] windows with their context -> [N, 128] LSTM inputs (no recurrent state involved).

        The package runs these layers as convolutions. Here each is one matrix product over the
        unfolded frames, in a time-major layout: a window has only 4 STFT frames, so oneDNN's per-call
        set-up (~250 us a convolution on CPU) outweighed the arithmetic about 2x at the few dozen
        windows of a tick. The sums are reordered, so probabilities move by up to about 1e-6 from the
        package's."""
        n = x.shape[0]
        # Right-only reflection padding is what the package model does (its STFT pads [0, 64]).
        x = F.pad(x, (0, CONTEXT), mode="reflect")  # [N, 640]
        frames = x.unfold(1, _N_FFT, _HOP)  # [N, 4, 256]
        basis = self.stft_conv.weight[:, 0, :]  # [258, 256]: Hann-windowed DFT, cosines then sines
        spec = (frames.reshape(-1, _N_FFT) @ basis.t()).view(n, -1, basis.shape[0])  # [N, 4, 258]
        cutoff = _N_FFT // 2 + 1
        real, imag = spec[..., :cutoff], spec[..., cutoff:]  # [N, 4, 129] each
        x = torch.sqrt(real.pow(2) + imag.pow(2))  # [N, 4, 129] magnitude

        x = _conv_k3(x, self.conv1, stride=1)  # [N, 4, 128]
        x = _conv_k3(x, self.conv2, stride=2)  # [N, 2, 64]
        x = _conv_k3(x, self.conv3, stride=2)  # [N, 1, 64]
        x = _conv_k3(x, self.conv4, stride=1)  # [N, 1, 128]
        return x[:, 0]

    def _lstm(
        self, features: torch.Tensor, state: VADState, counts: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features [B, W, 128], row b's first counts[b] windows real -> the LSTM's output after every
        real window [B, W, 128] (zeros past a row's count), and each row's (h, c) after its last one
        [B, 128] each, from `state`.

        The input projection of every window is one product; only the recurrent product runs window by
        window, and window w only for the rows that have one: a row far behind (a burst of audio, up to
        MAX_VAD_WINDOWS in one tick) made every row of the tick run all its windows, 32 recurrent steps
        for rows that had 1 or 2. The rows are ordered by count, longest first, so each window's rows are
        a prefix."""
        cell = self.lstm_cell
        batch, width, _ = features.shape
        # [B, W, 512], both biases folded in once; gates in LSTMCell's order i, f, g, o.
        projected = torch.addmm(cell.bias_ih + cell.bias_hh, features.reshape(batch * width, HIDDEN), cell.weight_ih.t())
        projected = projected.view(batch, width, 4 * HIDDEN)
        order = None
        if counts.min() == width:  # every row has every window (the usual tick)
            h, c, active = state.h.clone(), state.c.clone(), [batch] * width
        else:
            ranked = np.argsort(-counts, kind="stable")
            order = torch.from_numpy(ranked).to(projected.device)
            projected, h, c = projected.index_select(0, order), state.h.index_select(0, order), state.c.index_select(0, order)
            active = [int(n) for n in (counts[ranked][None, :] > np.arange(width)[:, None]).sum(axis=1)]  # rows with window w
        out = projected.new_zeros(batch, width, HIDDEN)
        weight = cell.weight_hh.t()
        for w, n in enumerate(active):
            gates = torch.addmm(projected[:n, w], h[:n], weight)  # [n, 512]
            i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one call; the g quarter takes tanh below
            c_w = f * c[:n] + i * torch.tanh(gates[:, 2 * HIDDEN : 3 * HIDDEN])
            h_w = o * torch.tanh(c_w)
            c[:n], h[:n], out[:n, w] = c_w, h_w, h_w
        if order is not None:  # back to the callers' row order
            back = torch.empty_like(order)
            back[order] = torch.arange(batch, device=order.device)
            out, h, c = out.index_select(0, back), h.index_select(0, back), c.index_select(0, back)
        return out, h, c

    def _probability(self, h: torch.Tensor) -> torch.Tensor:
        """[N, 128] LSTM outputs -> [N] speech probabilities."""
        # The package's decoder is dropout (identity in eval) -> ReLU -> 1x1 conv -> sigmoid; it then
        # averages over the time axis, which has length 1 here, so the mean is the value itself.
        logit = torch.addmm(self.final_conv.bias, F.relu(h), self.final_conv.weight[:, :, 0].t())  # [N, 1]
        return torch.sigmoid(logit)[:, 0]


def _conv_k3(x: torch.Tensor, conv: nn.Conv1d, *, stride: int) -> torch.Tensor:
    """A kernel-3, padding-1 Conv1d + ReLU as one product: x [N, T, C_in] -> [N, T_out, C_out]."""
    n, _, channels = x.shape
    windows = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, stride)  # [N, T_out, C_in, 3]: the weight's (in, tap) order
    t_out = windows.shape[1]
    weight = conv.weight.reshape(conv.weight.shape[0], channels * 3)  # [C_out, C_in * 3]
    out = torch.addmm(conv.bias, windows.reshape(n * t_out, channels * 3), weight.t())  # [N * T_out, C_out]
    return F.relu_(out).view(n, t_out, -1)


def package_file(name: str) -> Path:
    """Path of a data file of the installed `silero-vad` package (which may be absent;
    `SileroVAD.from_package` checks).

    The package is located, not imported: importing it runs `torch.set_num_threads(1)` (in
    `silero_vad/model.py`), which would make every torch op of the whole process, the engine's and the
    application's, single-threaded."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")  # a top-level package: found without running it
    if spec is None or spec.origin is None:
        raise _silero_missing("The silero_vad package is not installed.")
    return Path(spec.origin).parent / "data" / name


def _silero_missing(detail: str) -> MissingDependencyError:
    # silero-vad is a core dependency, so it is missing or broken only in a damaged environment; the
    # direct reinstall command is the one that repairs a package that is present but lacks its files.
    return MissingDependencyError(
        f"{_FEATURE} needs the 'silero-vad' package (a dependency of monosemantic), which is missing or "
        f"damaged; repair it with: pip install --force-reinstall silero-vad. {detail}"
    )


# This module's parameter names -> those of the 16 kHz submodule (`_model`) of the package's TorchScript model.
_JIT_NAMES = {
    "stft_conv.weight": "stft.forward_basis_buffer",
    **{f"conv{i + 1}.{p}": f"encoder.{i}.reparam_conv.{p}" for i in range(4) for p in ("weight", "bias")},
    **{f"lstm_cell.{p}": f"decoder.rnn.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "final_conv.weight": "decoder.decoder.2.weight",
    "final_conv.bias": "decoder.decoder.2.bias",
}


def _read_jit(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript in a FutureWarning at every load; only the weights are
            # read here (the model runs as this module's code), so it told users of nothing to change.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            jit_model = torch.jit.load(str(path), map_location="cpu")
        found = {k: v.detach().clone() for k, v in jit_model._model.state_dict().items()}
    except Exception as e:  # TorchScript raises assorted error types for foreign or corrupt archives
        raise ModelLoadError(f"cannot read the Silero VAD TorchScript model {path}: {e}") from e
    # Both directions, so a future package whose network grew a layer fails here instead of loading
    # a model that silently drops it.
    missing = sorted(set(_JIT_NAMES.values()) - found.keys())
    unexpected = sorted(found.keys() - set(_JIT_NAMES.values()))
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} is not the Silero VAD v5/v6 architecture this runtime implements "
            f"(missing {missing}, unexpected {unexpected})"
        )
    return {ours: found[theirs] for ours, theirs in _JIT_NAMES.items()}


