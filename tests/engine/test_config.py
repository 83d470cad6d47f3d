"""EngineConfig refuses settings the engine cannot run with, naming the field."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monosemantic import EngineConfig, VADConfig


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
        ("skip_silence_ms", 250.5, "skip_silence_ms"),
        # Values that used to hang (an infinite batch bound) or fail later with a raw TypeError.
        ("max_batch", math.inf, "max_batch"),
        ("max_batch", math.nan, "max_batch"),
        ("max_batch", 1.5, "max_batch"),
        ("max_streams", "8", "max_streams"),
        ("max_streams", True, "max_streams"),
        ("max_buffered_seconds", math.inf, "max_buffered_seconds"),
        ("max_buffered_seconds", math.nan, "max_buffered_seconds"),
        ("batch_wait_ms", math.inf, "batch_wait_ms"),
        ("push_timeout_seconds", math.inf, "push_timeout_seconds"),
        ("usage_interval_seconds", math.nan, "usage_interval_seconds"),
        ("default_latency_ms", 160.0, "default_latency_ms"),
        ("warmup_latencies", 160, "warmup_latencies"),
        ("warmup_latencies", ("160",), "warmup_latencies"),
        ("vad", "yes", "vad"),
        ("cuda_graphs", "no", "cuda_graphs"),
        # Finite, but their sample counts overflowed an integer (a raw OverflowError at engine creation).
        ("max_buffered_seconds", 1e308, "max_buffered_seconds must be at most"),
        ("usage_interval_seconds", 1e308, "usage_interval_seconds must be at most"),
        ("push_timeout_seconds", 1e20, "push_timeout_seconds must be at most"),
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
    assert EngineConfig(warmup_latencies=[160, 80]).warmup_latencies == (160, 80)  # a list is kept as a tuple
    assert EngineConfig(max_streams=np.int64(4)).max_streams == 4


@pytest.mark.parametrize(
    "make",
    [
        lambda: EngineConfig(batch_wait_ms=10**400),
        lambda: EngineConfig(max_buffered_seconds=10**400),
        lambda: EngineConfig(push_timeout_seconds=10**400),
        lambda: EngineConfig(usage_interval_seconds=10**400),
        lambda: VADConfig(threshold=10**400),
    ],
    ids=["batch_wait_ms", "max_buffered_seconds", "push_timeout_seconds", "usage_interval_seconds", "vad.threshold"],
)
def test_an_integer_too_large_for_a_float_is_a_clear_value_error(make):
    """A Python int past float range is a number (numbers.Real) that math.isfinite cannot convert: it is
    refused with the ValueError naming the field (it was an OverflowError naming none)."""
    with pytest.raises(ValueError, match="must be"):
        make()
