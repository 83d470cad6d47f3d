"""Slot caches (attention caches kept as rings, only new frames written back) step every stream exactly
as the in-order EncoderCache does, whatever rows share a step, through resets, first and last steps."""

from __future__ import annotations

import pytest
import torch

from monosemantic.streaming.encoder_step import EncoderCache, encoder_step
from monosemantic.streaming.slot_cache import SlotCache, slot_encoder_step


def _write_rows(cache: EncoderCache, rows: torch.Tensor, new: EncoderCache) -> None:
    """The in-order reference of a slot layout: a step's whole new caches stored into rows `rows`."""
    for dst, src in zip(cache.keys + cache.values + cache.conv + cache.sub, new.keys + new.values + new.conv + new.sub):
        dst.index_copy_(0, rows, src)
    cache.length.index_copy_(0, rows, new.length)


def _reset_rows(cache: EncoderCache, rows: torch.Tensor) -> None:
    for t in cache.keys + cache.values + cache.conv + cache.sub:
        t.index_fill_(0, rows, 0.0)
    cache.length.index_fill_(0, rows, 0)


@pytest.mark.parametrize("latency", [80, 560])
def test_slot_step_equals_in_order_cache(ms_model, latency):
    model = ms_model("nemotron_rnnt")
    encoder = model.module.encoder
    plan = model.plan(model.context_for(latency))
    shape = plan.shape
    slots = 6
    gen = torch.Generator().manual_seed(0)
    in_order = EncoderCache.zeros(encoder, shape.cache_frames, slots)
    ring = SlotCache.zeros(encoder, shape.cache_frames, slots)
    fresh = set(range(slots))
    # Enough steps that every ring wraps several times, at different phases per slot.
    steps = 4 * shape.cache_frames // shape.chunk_frames + 7
    for n in range(steps):
        count = int(torch.randint(1, slots + 1, (), generator=gen))
        rows = torch.randperm(slots, generator=gen)[:count]
        if n % 9 == 4:  # a slot starts a new stream
            _reset_rows(in_order, rows[:1])
            ring.reset_rows(rows[:1])
            fresh.add(int(rows[0]))
        lo = torch.tensor([shape.first_valid(shape.first_start) if int(r) in fresh else 0 for r in rows])
        hi = torch.full((count,), shape.step_mel + 1)
        if n % 5 == 0:  # a last, partial window beside full ones
            hi[0] = 1 + int(torch.randint(0, shape.step_mel, (), generator=gen))
        masked = bool(fresh & set(rows.tolist())) or n % 5 == 0
        lo, hi = (lo, hi) if masked else (None, None)
        fresh -= set(rows.tolist())
        mel = torch.randn(count, shape.step_mel, encoder.cfg.feat_in, generator=gen)

        out, length, new = encoder_step(encoder, plan, mel, in_order.select(rows), lo, hi)
        _write_rows(in_order, rows, new)
        r_out, r_length = slot_encoder_step(encoder, plan, mel, ring, rows, lo, hi)

        assert torch.equal(length, r_length)
        for b in range(count):
            valid = int(length[b])
            torch.testing.assert_close(r_out[b, :valid], out[b, :valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(ring.length, in_order.length)
    # The ring holds the same frames, rotated: in order from its oldest position.
    for layer in range(len(ring.keys)):
        for s in range(slots):
            order = (torch.arange(shape.cache_frames) + ring.oldest[s]) % shape.cache_frames
            torch.testing.assert_close(ring.keys[layer][s][:, order], in_order.keys[layer][s], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ring.values[layer][s][:, order], in_order.values[layer][s], atol=1e-5, rtol=1e-5)
    assert ring.oldest.ne(0).any()  # the rings did turn


def test_slot_cache_needs_a_left_context(ms_model):
    encoder = ms_model("nemotron_rnnt").module.encoder
    with pytest.raises(ValueError, match="left attention context"):
        SlotCache.zeros(encoder, 0, 2)
