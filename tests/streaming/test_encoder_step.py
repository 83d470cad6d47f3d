"""Batch invariance of the streaming step: streams at different points of their lives (first step,
partially and fully filled caches, a last partial window) batched in one encoder step and one decode step
get exactly what each gets alone."""

from __future__ import annotations

import pytest
import torch

from monosemantic.decoding.greedy import DecoderState, greedy_decode
from monosemantic.streaming.encoder_step import EncoderCache, encoder_step


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
@pytest.mark.parametrize("latency", [80, 560])
def test_batched_step_equals_single_steps(ms_model, audio_clips, variant, latency):
    model = ms_model(variant)
    module = model.module
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0870.wav"]
    plan = model.plan(model.context_for(latency))
    step_mel = plan.shape.step_mel
    # Realistic states: streams that have run 0 steps (empty caches), a few, and enough to fill the cache.
    streams = []
    for seconds in (0.0, 0.0, 0.3, 1.2, 6.0):
        stream = model.new_stream(latency_ms=latency)
        stream.feed(audio[: int(seconds * 16000)])
        streams.append(stream)
    assert [int(s.cache.length[0]) for s in streams][-1] == plan.shape.cache_frames
    feats, _ = module.frontend(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    windows = [feats[0, :, 10 * i : 10 * i + step_mel].T for i in range(len(streams))]
    first = plan.shape.first_valid(plan.shape.first_start)
    # (lo, hi): two first steps, two steady steps, one last partial window.
    bounds = [(first, step_mel + 1), (first, step_mel // 2), (0, step_mel + 1), (0, step_mel + 1), (0, step_mel // 3 + 1)]

    singles = []
    for s, mel, (lo, hi) in zip(streams, windows, bounds):
        # A full window alone goes unmasked; batched beside masked rows it gets lo = 0, hi = steady.
        unmasked = (lo, hi) == (0, step_mel + 1)
        lo, hi = (None, None) if unmasked else (torch.tensor([lo]), torch.tensor([hi]))
        out, length, _ = encoder_step(module.encoder, plan, mel[None], s.cache, lo, hi)
        decoded, _ = greedy_decode(module.decoder, module.joint, out, length, s.decoder, *model.decoding_args)
        singles.append((out[0, : int(length[0])], decoded.labels[0], decoded.frames[0]))

    cache = EncoderCache.cat([s.cache for s in streams])
    lo = torch.tensor([b[0] for b in bounds])
    hi = torch.tensor([b[1] for b in bounds])
    out, length, _ = encoder_step(module.encoder, plan, torch.stack(windows), cache, lo, hi)
    state = DecoderState.cat([s.decoder for s in streams])
    decoded, _ = greedy_decode(module.decoder, module.joint, out, length, state, *model.decoding_args)
    assert sum(len(x[1]) for x in singles) > 0
    for row, (enc, labels, frames) in enumerate(singles):
        assert int(length[row]) == enc.shape[0]
        torch.testing.assert_close(out[row, : int(length[row])], enc, atol=1e-5, rtol=1e-5)
        assert decoded.labels[row] == labels and decoded.frames[row] == frames


def test_cache_select_and_cat_round_trip(ms_model):
    model = ms_model("nemotron_rnnt")
    plan = model.plan(model.context_for(160))
    cache = EncoderCache.zeros(model.module.encoder, plan.shape.cache_frames, 3)
    for t in cache.keys + cache.values + cache.conv + cache.sub:
        t.normal_()
    cache.length = torch.tensor([0, 5, 70])
    joined = EncoderCache.cat([cache.select(slice(0, 1)), cache.select(slice(1, 3))])
    for a, b in zip(joined.keys + joined.values + joined.conv + joined.sub, cache.keys + cache.values + cache.conv + cache.sub):
        assert torch.equal(a, b)
    assert torch.equal(joined.length, cache.length)
