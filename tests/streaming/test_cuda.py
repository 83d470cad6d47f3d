"""On a CUDA device: the same tokens as on CPU (fp32), streaming equal to offline, and the CUDA-graph
encoder step equal to the eager one. Skipped where no GPU is present (CI has none; the device runs)."""

from __future__ import annotations

import pytest
import torch

import monosemantic
from monosemantic.streaming.cuda_graph import GraphedEncoderStep, SlotGraphedEncoderStep
from monosemantic.streaming.encoder_step import EncoderCache, encoder_step
from monosemantic.streaming.slot_cache import SlotCache, slot_encoder_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_model(nemo_checkpoint):
    models = {}

    def get(name):
        if name not in models:
            models[name] = monosemantic.load_model(nemo_checkpoint(name), device="cuda")
        return models[name]

    return get


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt", "parakeet_tdt"])
def test_cuda_tokens_equal_cpu_and_streaming_equals_offline(cuda_model, ms_model, audio_clips, variant):
    gpu, cpu = cuda_model(variant), ms_model(variant)
    clips = list(audio_clips.values())
    for latency in gpu.latency_modes or [None]:
        offline = [t.token_ids for t in gpu.transcribe(clips, latency_ms=latency)]
        assert offline == [t.token_ids for t in cpu.transcribe(clips, latency_ms=latency)]
        for audio, expected in zip(clips, offline):
            stream = gpu.new_stream(latency_ms=latency)
            for start in range(0, len(audio), 320):
                stream.feed(audio[start : start + 320])
            assert stream.finalize().token_ids == expected


@pytest.mark.parametrize("masked", [False, True])
def test_graphed_step_equals_eager(cuda_model, masked):
    model = cuda_model("nemotron_rnnt")
    encoder = model.module.encoder
    plan = model.plan(model.context_for(160))
    shape = plan.shape
    graphed = GraphedEncoderStep(encoder, plan, batch=4, masked=masked)
    gen = torch.Generator(device="cuda").manual_seed(0)
    eager_cache = EncoderCache.zeros(encoder, shape.cache_frames, 4, "cuda")
    graph_cache = eager_cache
    for step in range(6):
        mel = torch.randn(4, shape.step_mel, encoder.cfg.feat_in, device="cuda", generator=gen)
        lo = hi = None
        if masked:
            lo = torch.tensor([shape.first_valid(shape.first_start) if step == 0 else 0] * 4, device="cuda")
            hi = torch.tensor([shape.step_mel + 1, shape.step_mel + 1, 5, shape.step_mel + 1], device="cuda")
        out, length, eager_cache = encoder_step(encoder, plan, mel, eager_cache, lo, hi)
        g_out, g_len, graph_cache = graphed(mel, graph_cache, lo, hi)
        assert torch.equal(length, g_len)
        torch.testing.assert_close(g_out, out, atol=1e-5, rtol=1e-5)


def test_slot_graphed_step_equals_eager(cuda_model):
    """The in-place graph steps any subset of slots, in any order, fewer rows than it was captured for,
    exactly as the eager slot step, and leaves every other slot untouched."""
    model = cuda_model("nemotron_rnnt")
    encoder = model.module.encoder
    plan = model.plan(model.context_for(160))
    shape = plan.shape
    slots, scratch = 8, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    graph_slots = SlotCache.zeros(encoder, shape.cache_frames, slots + 1, "cuda")
    eager_slots = SlotCache.zeros(encoder, shape.cache_frames, slots + 1, "cuda")
    graphed = SlotGraphedEncoderStep(encoder, plan, batch=6, slots=graph_slots, scratch=scratch)
    steps = [[0, 1, 2, 3, 4, 5], [5, 3, 1], [2, 0, 4, 1, 3], [7], [1, 6, 7, 0, 5, 2], [3, 4]]
    for n, rows in enumerate(steps):
        index = torch.tensor(rows, device="cuda")
        mel = torch.randn(len(rows), shape.step_mel, encoder.cfg.feat_in, device="cuda", generator=gen)
        lo = hi = None
        if n == 1:  # a stream's first window beside full ones, and a last, partial one
            lo = torch.tensor([shape.first_valid(shape.first_start), 0, 0], device="cuda")
            hi = torch.tensor([shape.step_mel + 1, 5, shape.step_mel + 1], device="cuda")
        out, length = slot_encoder_step(encoder, plan, mel, eager_slots, index, lo, hi)
        g_out, g_len = graphed(mel, index, lo, hi)
        assert torch.equal(length, g_len)
        torch.testing.assert_close(g_out, out, atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(graph_slots.keys + graph_slots.conv + graph_slots.sub, eager_slots.keys + eager_slots.conv + eager_slots.sub):
            torch.testing.assert_close(mine[:slots], theirs[:slots], atol=1e-5, rtol=1e-5)
        assert torch.equal(graph_slots.length[:slots], eager_slots.length[:slots])
        assert torch.equal(graph_slots.oldest[:slots], eager_slots.oldest[:slots])
    with pytest.raises(ValueError, match="do not fit"):
        graphed(torch.zeros(7, shape.step_mel, encoder.cfg.feat_in, device="cuda"), torch.arange(7, device="cuda"), None, None)


def test_bfloat16_encoder_runs(nemo_checkpoint, audio_clips):
    model = monosemantic.load_model(nemo_checkpoint("nemotron_rnnt"), device="cuda", dtype="bfloat16")
    assert model.module.encoder.dtype == torch.bfloat16
    result = model.transcribe(audio_clips["jfk.wav"], latency_ms=160)
    stream = model.new_stream(latency_ms=160)
    stream.feed(audio_clips["jfk.wav"])
    assert stream.finalize().token_ids == result.token_ids and len(result.tokens) > 0
