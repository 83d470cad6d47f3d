"""EngineConfig refuses settings the engine cannot run with, naming the field."""

from __future__ import annotations

import math

import pytest

from monosemantic import EngineConfig


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("max_streams", 0, "max_streams"),
        ("max_batch", -1, "max_batch"),
        ("max_buffered_seconds", 0.5, "max_buffered_seconds"),
        ("batch_wait_ms", -5, "batch_wait_ms"),
        ("batch_wait_ms", math.nan, "batch_wait_ms"),
        ("push_timeout_seconds", 0, "push_timeout_seconds"),
        ("push_timeout_seconds", -1.0, "push_timeout_seconds"),
        ("usage_interval_seconds", 0, "usage_interval_seconds"),
        ("skip_silence_ms", 0, "skip_silence_ms"),
    ],
)
def test_bad_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{field: value})


def test_skip_silence_needs_vad():
    with pytest.raises(ValueError, match="skip_silence_ms needs VAD"):
        EngineConfig(skip_silence_ms=500, vad=None)


def test_good_settings_are_kept():
    config = EngineConfig(max_streams=1, max_batch=1, batch_wait_ms=None, push_timeout_seconds=0.1, skip_silence_ms=300)
    assert (config.max_streams, config.batch_wait_ms, config.skip_silence_ms) == (1, None, 300)
    assert EngineConfig(batch_wait_ms=0).batch_wait_ms == 0
