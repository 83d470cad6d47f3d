"""The user-facing model: `load_model(...)` and `ASRModel.transcribe / new_stream`."""

from __future__ import annotations

import numbers
import os
import warnings

import numpy as np
import torch

from . import forking
from .audio import as_float32, check_rate, resample
from .decoding.greedy import DecodedChunk, greedy_decode, initial_state
from .decoding.tokenizer import Tokenizer
from .errors import AudioError, ModelLoadError
from .models.checkpoint import read_checkpoint
from .models.config import ModelConfig, parse_model_config
from .models.transducer_model import TransducerModel
from .streaming.chunked import decode_chunked
from .streaming.plan import ChunkPlan
from .streaming.shape import ModeShape
from .streaming.stream import CacheAwareStream, FullContextStream
from .transcript import Transcript

DEFAULT_MODEL = "nvidia/nemotron-speech-streaming-en-0.6b"
FULL_CONTEXT_UPDATE_MS = 1000  # default partial interval for full-context models
# Cache-aware models encode clips longer than this many encoder frames (160 s at 80 ms) chunk by chunk:
# offline attention memory grows with the square of the length, chunked encoding's does not.
CHUNKED_ABOVE_FRAMES = 2000
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_device_and_dtype(device: str | torch.device, dtype: str | torch.dtype) -> None:
    """Refuse a device or dtype that no machine could load (ValueError), without looking for the device:
    for callers that load the model later (the adapters, at their first stream), so that a typo is an
    error where it was made."""
    if device != "auto":
        _parse_device(device)
    resolve_dtype(dtype)


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    # torch names more device types than the runtime runs on, and takes an index for the one CPU device
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index is not None):
        raise ValueError(f"invalid device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        # Worded for both ways in: the Python argument and the command lines' flag.
        raise ValueError(
            f"device {device!r} requested but CUDA is not available on this machine; run on the CPU "
            f"(device='cpu' in Python, --device cpu on the command line)"
        )
    if dev.type == "cuda" and dev.index is not None:
        # torch.device accepts any index; a GPU that is not there failed later, in the move of the
        # weights, as CUDA's bare 'invalid device ordinal'.
        count = torch.cuda.device_count()
        if dev.index >= count:
            names = ", ".join(f"cuda:{i}" for i in range(count))
            raise ValueError(
                f"device {device!r} requested but this machine has {count} CUDA device"
                f"{'' if count == 1 else 's'} ({names})"
            )
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Encoder dtype. 'auto' is float32: the reference precision, exact against NeMo."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.float32
    # Looked up only as a str: a list or dict is unhashable, and `in` raised TypeError on it.
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}: use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPES[dtype]


class ASRModel:
    """A loaded transducer: offline transcription and streams. The frontend, prediction network and
    joint always run in float32; `dtype` applies to the encoder."""

    def __init__(self, module: TransducerModel, tokenizer: Tokenizer, source: str, device: torch.device):
        self.module = module
        self.tokenizer = tokenizer
        self.source = source
        self.device = device
        self._plans: dict[tuple[int, int], ChunkPlan] = {}
        cfg = module.cfg
        self.decoding_args = (cfg.decoding.durations, cfg.decoding.max_symbols)
        self._modes: dict[int, tuple[int, int]] = {}
        for context in cfg.encoder.att_context_sizes if cfg.cache_aware else []:
            latency = self._shape(context).latency_ms(cfg.frontend.hop_length, self.sample_rate)
            if latency not in self._modes:
                self._modes[latency] = context
                continue
            # A mode is chosen by latency, i.e. by its right context alone. Keeping the first keeps the
            # checkpoint's default (listed first) reachable, and default_latency_ms meaning that context.
            warnings.warn(
                f"{source}: attention context {list(context)} has the same {latency} ms latency as "
                f"{list(self._modes[latency])}, which comes first; latency_ms={latency} selects "
                f"{list(self._modes[latency])}, and {list(context)} cannot be selected",
                UserWarning,
                stacklevel=3,
            )

    # ---- description -------------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.module.cfg

    @property
    def sample_rate(self) -> int:
        return self.config.frontend.sample_rate

    @property
    def cache_aware(self) -> bool:
        """True if the encoder streams with bounded caches (otherwise streams re-encode the utterance)."""
        return self.config.cache_aware

    @property
    def latency_modes(self) -> list[int]:
        """Selectable streaming latencies in ms (chunk durations), default first; [] for full context."""
        return list(self._modes)

    @property
    def default_latency_ms(self) -> int | None:
        return next(iter(self._modes), None)

    def _shape(self, context: tuple[int, int]) -> ModeShape:
        return ModeShape.of(self.config.encoder, context)

    def context_for(self, latency_ms: int | None) -> tuple[int, int]:
        """Attention (left, right) context of a latency mode; None picks the checkpoint's default."""
        if latency_ms is None:
            return self.config.encoder.att_context_sizes[0]
        if not self._modes:
            raise ValueError(
                f"this model ({self.source}) has full-context attention and no latency modes; omit latency_ms"
            )
        known = isinstance(latency_ms, numbers.Integral) and not isinstance(latency_ms, bool) and latency_ms in self._modes
        if not known:  # a float (160.0) or a list is refused too, not looked up or hashed
            modes = ", ".join(str(m) for m in self._modes)
            raise ValueError(f"latency_ms={latency_ms!r} is not a mode of this model; choose one of: {modes}")
        return self._modes[latency_ms]

    def plan(self, context: tuple[int, int]) -> ChunkPlan:
        if context not in self._plans:
            self._plans[context] = ChunkPlan.build(self.module.encoder, context)
        return self._plans[context]

    # ---- offline -----------------------------------------------------------------------------------
    def make_transcript(self, labels: list[int], frames: list[int], durations: list[int]) -> Transcript:
        cfg = self.config
        return self.tokenizer.transcript(labels, frames, durations, cfg.frame_samples, self.sample_rate, tdt=cfg.is_tdt)

    @torch.no_grad()
    def _transcribe_batch(self, audios: list[np.ndarray], context: tuple[int, int]) -> list[Transcript]:
        lengths = torch.tensor([a.shape[0] for a in audios], dtype=torch.long)
        batch = torch.zeros(len(audios), int(lengths.max()) if len(audios) else 0)
        for i, a in enumerate(audios):
            batch[i, : a.shape[0]] = torch.from_numpy(a)
        module = self.module
        features, n_frames = module.frontend(batch.to(self.device), lengths.to(self.device))
        if self.cache_aware and int(n_frames.max()) > CHUNKED_ABOVE_FRAMES * self.config.encoder.subsampling_factor:
            decoded = decode_chunked(module, self.plan(context), features, n_frames, *self.decoding_args)
            return [self._row_transcript(decoded, i) for i in range(len(audios))]
        encoded, enc_len = module.encoder(features, n_frames, context)
        enc_len = torch.where(n_frames == 0, torch.zeros_like(enc_len), enc_len)  # no audio frame: no output
        state = initial_state(module.decoder, module.joint, len(audios), self.device)
        decoded, _ = greedy_decode(module.decoder, module.joint, encoded, enc_len, state, *self.decoding_args)
        return [self._row_transcript(decoded, i) for i in range(len(audios))]

    def _row_transcript(self, decoded: DecodedChunk, row: int) -> Transcript:
        return self.make_transcript(decoded.labels[row], decoded.frames[row], decoded.durations[row])

    def transcribe(
        self,
        audio,
        *,
        latency_ms: int | None = None,
        sample_rate: int = 16000,
        batch_size: int = 8,
    ) -> Transcript | list[Transcript]:
        """Transcribe a whole clip (1-D float32 in [-1, 1] or int16 at `sample_rate`), or a list of clips.

        With `latency_ms` the encoder uses that streaming mode's attention context, so the result equals
        streaming in that mode; None uses the checkpoint's default context."""
        context = self.context_for(latency_ms)
        check_rate(sample_rate)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        single = not isinstance(audio, (list, tuple))
        clips = [audio] if single else list(audio)
        if not single and any(isinstance(a, numbers.Number) for a in clips):
            raise AudioError(
                "audio is a list of numbers, but a list passed to transcribe is a batch of clips: pass one "
                "clip as a 1-D numpy array (np.asarray(samples, dtype=np.float32)), or a list of such arrays"
            )
        try:
            prepared = [
                resample(as_float32(a, name=f"audio[{i}]" if not single else "audio"), sample_rate, self.sample_rate)
                for i, a in enumerate(clips)
            ]
        except AudioError as exc:
            shape = tuple(getattr(audio, "shape", ()))
            if single and len(shape) == 2 and min(shape) > 1:  # a padded batch, as a 2-D tensor, or channels
                raise AudioError(f"{exc}; a batch of clips is a list of 1-D arrays, not a 2-D array") from None
            raise
        forking.model_ran()
        results: list[Transcript] = []
        for start in range(0, len(prepared), batch_size):
            results += self._transcribe_batch(prepared[start : start + batch_size], context)
        return results[0] if single else results

    # ---- streaming ---------------------------------------------------------------------------------
    def new_stream(self, *, latency_ms: int | None = None, sample_rate: int = 16000):
        """A single stream: `feed(audio)` pieces of any size, `transcript()` so far, `finalize()`.

        Cache-aware models: `latency_ms` is one of `latency_modes` (None: the checkpoint default).
        Full-context models: the interval at which partials are recomputed (None: 1000 ms)."""
        forking.model_ran()
        if self.cache_aware:
            return CacheAwareStream(self, self.plan(self.context_for(latency_ms)), sample_rate)
        interval = FULL_CONTEXT_UPDATE_MS if latency_ms is None else latency_ms
        # Any integral number, as a cache-aware model's latency_ms (np.int64 included), but not a bool.
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval <= 0:
            raise ValueError(f"latency_ms must be a positive integer number of milliseconds, got {latency_ms!r}")
        return FullContextStream(self, int(interval), sample_rate)

    def __repr__(self) -> str:
        cfg = self.config
        kind = "TDT" if cfg.is_tdt else "RNN-T"
        modes = ",".join(map(str, self.latency_modes)) or "full-context"
        return (
            f"ASRModel({self.source!r}, {kind}, {cfg.encoder.n_layers}x{cfg.encoder.d_model}, "
            f"latency_ms=[{modes}], device={self.device}, encoder dtype={self.module.encoder.dtype})"
        )


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
) -> ASRModel:
    """Load a NeMo FastConformer transducer (RNN-T, TDT, hybrid RNNT-CTC).

    source: a `.nemo` file, an extracted checkpoint directory, or a Hugging Face repo id (downloaded
    through huggingface_hub, its cache and progress bar; `revision` picks a branch/tag/commit).
    device: 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'. dtype: encoder precision; 'auto' is
    float32."""
    dev = resolve_device(device)
    enc_dtype = resolve_dtype(dtype)
    checkpoint = read_checkpoint(source, revision)
    cfg = parse_model_config(checkpoint.config, name=str(source))
    with torch.device("meta"):
        module = TransducerModel(cfg)
    module.load_weights(checkpoint.state_dict, str(source))
    del checkpoint.state_dict
    try:
        tokenizer = Tokenizer(checkpoint.tokenizer_proto)
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a corrupt model file
        raise ModelLoadError(f"'{source}': cannot load the SentencePiece tokenizer ({exc})") from None
    if tokenizer.vocab_size != cfg.prediction.vocab_size:
        raise ModelLoadError(
            f"'{source}': tokenizer has {tokenizer.vocab_size} pieces but the decoder expects {cfg.prediction.vocab_size}"
        )
    # Inference only: parameters that required gradients made the state built from them outside a
    # no_grad block (a stream's fresh decoder state) record autograd graphs, which the engine's
    # per-utterance resets chained onto its slots' state for its whole life.
    # Converting weights on the host (a checkpoint stored in half precision, or an encoder dtype other
    # than float32 on the CPU) runs torch's parallel copy kernels, which start its OpenMP pool: a child
    # forked after that would wait forever at its first op, as after a transcription (runtime/forking.py).
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors) or (
        dev.type == "cpu" and enc_dtype != torch.float32
    ):
        forking.model_ran()
    module = module.float().to(dev).eval().requires_grad_(False)
    module.encoder.to(enc_dtype)
    return ASRModel(module, tokenizer, str(source), dev)
