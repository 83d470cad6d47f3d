"""NeMo itself as the reference implementation the runtime is compared against.

Each helper runs the code path a NeMo user would hit (``transcribe``, the
model's ``forward``, ``encoder.cache_aware_stream_step``) while neutralising
the few places where NeMo silently alters the input at inference time:

* ``transcribe()`` pads numpy clips shorter than 1 s with zeros on *both*
  sides (``pad_min_duration``/``pad_direction`` of TranscriptionTensorDataset);
  we pass ``pad_min_duration=0`` so the audio reaches the model untouched.
* ``transcribe()`` zeroes ``preprocessor.featurizer.dither`` and ``pad_to``
  for its duration; the offline helpers below do the same so their features
  match what ``transcribe`` decodes (dither is only applied in training mode
  anyway).
* ``transcribe()`` defaults to one DataLoader worker process; we use 0.

The helpers (except the timing one) run torch single-threaded: the models are
tiny, and on a small machine shared with other processes OpenMP's spinning
threads can make NeMo's thousands of tiny decoding ops 100x slower.

Streaming caveat (NeMo behaviour, found while building these helpers): NeMo's
cache-aware streaming equals the offline encoder output (to ~5e-6) for
look-aheads whose first chunk already fills the pre-encode cache, but with
``att_context_size=[70, 0]`` the first chunk is a single mel frame, the next
chunk's pre-encode cache is zero-padded at the *mel* level (offline, the
causal convs pad every layer), and the difference propagates through the
attention caches to every later frame.  Streaming also yields one encoder
frame fewer at the end for the short look-aheads ([70, 1], [70, 0]).

NeMo is imported lazily so test collection stays fast.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from _support.nemo_checkpoints import quiet_nemo, single_thread

ContextSize = Optional[Sequence[int]]


def load_nemo(path: os.PathLike | str):
    """Restore a ``.nemo`` on CPU in eval mode; the class comes from its ``target`` config key."""
    with quiet_nemo():
        from nemo.collections.asr.models import ASRModel

        model = ASRModel.restore_from(str(path), map_location="cpu")
    model.eval()
    return model


@contextlib.contextmanager
def att_context(model, att_context_size: ContextSize):
    """Temporarily select a look-ahead mode of a multi-context (cache-aware) encoder.

    ``None`` keeps the current default (the first entry of the config's
    ``att_context_size``).  For single-context encoders asking for their only
    context is a no-op.  The previous default is restored afterwards so one
    test cannot leak its mode into the next.
    """
    encoder = model.encoder
    if att_context_size is None:
        yield
        return
    wanted = [int(x) for x in att_context_size]
    previous = list(encoder.att_context_size)
    if len(encoder.att_context_size_all) <= 1 and wanted == previous:
        yield
        return
    with quiet_nemo():
        encoder.set_default_att_context_size(wanted)
    try:
        yield
    finally:
        with quiet_nemo():
            encoder.set_default_att_context_size(previous)


@contextlib.contextmanager
def _inference_featurizer(model):
    """dither=0 and pad_to=0 as inside ``transcribe()``, restored afterwards."""
    featurizer = model.preprocessor.featurizer
    saved = featurizer.dither, featurizer.pad_to
    featurizer.dither, featurizer.pad_to = 0.0, 0
    try:
        yield
    finally:
        featurizer.dither, featurizer.pad_to = saved


def _ensure_rnnt_decoder(model) -> None:
    """Hybrid RNNT/CTC models must transcribe with the transducer head (their default)."""
    if getattr(model, "cur_decoder", "rnnt") != "rnnt":
        with quiet_nemo():
            model.change_decoding_strategy(decoding_cfg=model.cfg.decoding, decoder_type="rnnt", verbose=False)


def _as_signal(audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    signal = torch.as_tensor(np.ascontiguousarray(audio, dtype=np.float32))[None]
    return signal, torch.tensor([signal.shape[1]], dtype=torch.int64)


def nemo_transcribe_hypotheses(model, audios: Sequence[np.ndarray], att_context_size: ContextSize = None) -> list:
    """NeMo ``Hypothesis`` objects from ``model.transcribe`` (greedy decoding as configured), batch size 1."""
    from nemo.collections.asr.parts.mixins.transcription import TranscribeConfig

    _ensure_rnnt_decoder(model)
    config = TranscribeConfig(batch_size=1, return_hypotheses=True, num_workers=0, verbose=False)
    config.pad_min_duration = 0.0  # read via getattr by TranscriptionTensorDataset
    tensors = [torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)) for a in audios]
    try:
        with att_context(model, att_context_size), quiet_nemo(), single_thread():
            result = model.transcribe(tensors, override_config=config)
    finally:
        model.eval()
    if isinstance(result, tuple):  # older NeMo: (best_hypotheses, all_hypotheses)
        result = result[0]
    return list(result)


def nemo_transcribe_timestamps(model, audios: Sequence[np.ndarray]) -> list[tuple[list, list]]:
    """NeMo's ``transcribe(timestamps=True)`` of each clip: ``([(start, end)] per token, [(word, start, end)])``
    in encoder frames, as NeMo's decoding computes them (TDT punctuation moved to the previous token's end,
    punctuation joined to its word). The model's decoding config is put back afterwards:
    ``timestamps=True`` changes it for good, and other helpers read ``Hypothesis.timestamp`` as a list."""
    import copy

    from nemo.collections.asr.parts.mixins.transcription import TranscribeConfig

    _ensure_rnnt_decoder(model)
    saved = copy.deepcopy(model.cfg.decoding)
    config = TranscribeConfig(batch_size=1, return_hypotheses=True, num_workers=0, verbose=False, timestamps=True)
    config.pad_min_duration = 0.0
    tensors = [torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32)) for a in audios]
    try:
        with quiet_nemo(), single_thread():
            # timestamps=True as an argument too: a hybrid model's transcribe reads only the argument
            result = model.transcribe(tensors, override_config=config, timestamps=True)
    finally:
        with quiet_nemo():
            kwargs = {"decoder_type": "rnnt"} if hasattr(model, "cur_decoder") else {}
            model.change_decoding_strategy(decoding_cfg=saved, verbose=False, **kwargs)
        model.eval()
    if isinstance(result, tuple):
        result = result[0]
    return [
        (
            [(int(c["start_offset"]), int(c["end_offset"])) for c in h.timestamp["char"]],
            [(w["word"].strip(), int(w["start_offset"]), int(w["end_offset"])) for w in h.timestamp["word"]],
        )
        for h in result
    ]


def nemo_transcribe_tokens(
    model, audios: Sequence[np.ndarray], att_context_size: ContextSize = None
) -> list[list[int]]:
    """Token ids (no blanks) NeMo's ``transcribe`` emits for each float32 16 kHz clip."""
    return [_token_list(h.y_sequence) for h in nemo_transcribe_hypotheses(model, audios, att_context_size)]


def _token_list(y_sequence) -> list[int]:
    if isinstance(y_sequence, torch.Tensor):
        return [int(t) for t in y_sequence.tolist()]
    return [int(t) for t in y_sequence]


@torch.inference_mode()
def nemo_mel(model, audio: np.ndarray) -> torch.Tensor:
    """Preprocessor features ``[n_mels, T]`` of one clip (valid frames only, no pad_to)."""
    signal, length = _as_signal(audio)
    with _inference_featurizer(model), single_thread():
        feats, feat_len = model.preprocessor(input_signal=signal, length=length)
    return feats[0, :, : int(feat_len[0])].float().clone()


@torch.inference_mode()
def nemo_encoder_output(
    model, audio: np.ndarray, att_context_size: ContextSize = None
) -> tuple[torch.Tensor, int]:
    """Offline encoder output ``([T, D], T)`` of one clip via ``model.forward`` -- what transcribe decodes."""
    signal, length = _as_signal(audio)
    with _inference_featurizer(model), att_context(model, att_context_size), single_thread():
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=length)
    n = int(encoded_len[0])
    return encoded[0, :, :n].T.float().clone(), n


def _require_streaming(model) -> None:
    """Cache-aware streaming needs a finite left context (the cache); Parakeet-style [-1, -1] has none."""
    if int(model.encoder.att_context_size[0]) < 0:
        raise ValueError(
            f"encoder att_context_size {list(model.encoder.att_context_size)} has unlimited left context; "
            "this is not a cache-aware streaming model"
        )


def steady_state_chunk_frames(model) -> tuple[int, int]:
    """(mel frames fed per steady-state streaming step incl. pre-encode cache, frames dropped after pre-encode)."""
    cfg = model.encoder.streaming_cfg
    chunk = cfg.chunk_size[1] if isinstance(cfg.chunk_size, list) else cfg.chunk_size
    pre = cfg.pre_encode_cache_size[1] if isinstance(cfg.pre_encode_cache_size, list) else cfg.pre_encode_cache_size
    return int(pre + chunk), int(cfg.drop_extra_pre_encoded)


def nemo_cache_aware_step_fn(
    model, att_context_size: ContextSize = None, batch_size: int = 1, seed: int = 0
) -> Callable[[], torch.Tensor]:
    """A zero-arg callable running one steady-state ``encoder.cache_aware_stream_step``, for timing.

    Input is a random mel chunk of the steady-state size (pre-encode cache +
    chunk frames).  Caches start random and full (``cache_last_channel_len`` =
    cache size), as after the first few seconds of a stream, and are carried
    from call to call like a real stream.  The look-ahead mode is set on the
    model and stays set (timing code owns the model).  Returns the encoder
    output of the step.
    """
    encoder = model.encoder
    if att_context_size is not None:
        with quiet_nemo():
            encoder.set_default_att_context_size([int(x) for x in att_context_size])
    _require_streaming(model)
    model.eval()
    n_frames, drop = steady_state_chunk_frames(model)
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    mel = torch.randn((batch_size, encoder._feat_in, n_frames), generator=gen).to(param)
    mel_len = torch.full((batch_size,), n_frames, dtype=torch.int64, device=param.device)
    channel, time_, _ = encoder.get_initial_cache_state(batch_size=batch_size, dtype=param.dtype, device=param.device)
    state = {
        "channel": torch.randn(channel.shape, generator=gen).to(param),
        "time": torch.randn(time_.shape, generator=gen).to(param),
        "len": torch.full((batch_size,), channel.shape[2], dtype=torch.int64, device=param.device),
    }

    @torch.inference_mode()
    def step() -> torch.Tensor:
        encoded, _, state["channel"], state["time"], state["len"] = encoder.cache_aware_stream_step(
            processed_signal=mel,
            processed_signal_length=mel_len,
            cache_last_channel=state["channel"],
            cache_last_time=state["time"],
            cache_last_channel_len=state["len"],
            keep_all_outputs=False,
            drop_extra_pre_encoded=drop,
        )
        return encoded

    return step


__all__ = [
    "att_context",
    "load_nemo",
    "nemo_cache_aware_step_fn",
    "nemo_encoder_output",
    "nemo_mel",
    "nemo_transcribe_hypotheses",
    "nemo_transcribe_tokens",
    "steady_state_chunk_frames",
]
