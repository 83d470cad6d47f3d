"""Parity with NeMo on tiny random checkpoints: features, encoder output and transcribed tokens, in every
attention mode of every variant (RNN-T, TDT, hybrid, Nemotron-like and Parakeet-like)."""

from __future__ import annotations

import numpy as np
import torch

from _support.modes import latency_contexts
from _support.nemo_reference import nemo_encoder_output, nemo_mel, nemo_transcribe_timestamps


def test_features_equal_nemo(variant_name, ms_model, nemo_model, audio_clips):
    model, reference = ms_model(variant_name), nemo_model(variant_name)
    for name, audio in audio_clips.items():
        expected = nemo_mel(reference, audio)
        feats, n = model.module.frontend(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        assert int(n[0]) == expected.shape[1], name
        torch.testing.assert_close(feats[0, :, : int(n[0])], expected, atol=1e-4, rtol=1e-4, msg=name)


def test_encoder_output_within_1e4_of_nemo(variant_name, ms_model, nemo_model, audio_clips):
    model, reference = ms_model(variant_name), nemo_model(variant_name)
    audio = audio_clips["jfk.wav"]
    for context in model.config.encoder.att_context_sizes:
        expected, length = nemo_encoder_output(reference, audio, list(context))
        feats, n = model.module.frontend(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
        with torch.no_grad():
            encoded, enc_len = model.module.encoder(feats, n, context)
        assert int(enc_len[0]) == length
        diff = (encoded[0, :length] - expected).abs().max().item()
        assert diff < 1e-4, f"{context}: max abs diff {diff}"


def test_tokens_equal_nemo_transcribe(variant_name, ms_model, nemo_tokens, audio_clips):
    model = ms_model(variant_name)
    clips = list(audio_clips.values())
    for latency, context in latency_contexts(model):
        expected = nemo_tokens(variant_name, context)
        got = [t.token_ids for t in model.transcribe(clips, latency_ms=latency)]
        assert got == expected, f"mode {context}"
        assert sum(map(len, expected)) > 0 and len({tuple(e) for e in expected}) > 1  # a real check


def test_token_and_word_times_equal_nemo_timestamps(variant_name, ms_model, nemo_model, audio_clips):
    """Token and word times equal NeMo's `transcribe(timestamps=True)` offsets. They differed where NeMo
    has rules of its own: an <unk> piece starts a word (it was glued into the previous one, " ⁇ " and all),
    a punctuation piece joins the word before it, and for TDT a punctuation mark takes the previous
    token's end as its start and end (NeMo's fix for marks predicted long after their word: ours
    stretched the word's end over the silence after it)."""
    model = ms_model(variant_name)
    clips = list(audio_clips.values())
    frame = model.config.frame_samples
    expected = nemo_transcribe_timestamps(nemo_model(variant_name), clips)
    for name, ours, (tokens, words) in zip(audio_clips, model.transcribe(clips), expected):
        assert [(t.start // frame, t.end // frame) for t in ours.tokens] == tokens, name
        assert [(w.text, w.start // frame, w.end // frame) for w in ours.words] == words, name


def test_batch_composition_does_not_change_tokens(variant_name, ms_model, audio_clips):
    """Padding a clip into a batch with longer and shorter clips leaves its tokens unchanged."""
    model = ms_model(variant_name)
    clips = list(audio_clips.values())
    alone = [model.transcribe(c).token_ids for c in clips]
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(len(clips))
    batched = model.transcribe([clips[i] for i in shuffled], batch_size=len(clips))
    assert [batched[list(shuffled).index(i)].token_ids for i in range(len(clips))] == alone
