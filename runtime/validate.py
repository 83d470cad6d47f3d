"""Checks of user-given numbers shared by configurations that cannot import each other's modules (the
server's config imports nothing heavy; the client runs without the engine)."""

from __future__ import annotations

import math
import numbers


def finite_real(value) -> bool:
    """A real number, not a bool, and finite. An int too large for a float counts as not finite (math's
    checks raise OverflowError on it, which names no setting)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_positive_seconds(name: str, value) -> None:
    """ValueError unless `value` is a positive finite number: inf or nan would reach aiohttp and asyncio
    as timeouts (a traceback at shutdown, a stream closed "after nan s")."""
    if not (finite_real(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number of seconds, got {value!r}")


def flush_point(at) -> int | None:
    """A flush's `at` (EngineStream.flush, RemoteStream.flush): None, or a sample index (an int, or a
    numpy integer), never negative."""
    if at is None:
        return None
    if isinstance(at, bool) or not isinstance(at, numbers.Integral):
        raise TypeError(f"flush(at=...) takes a sample index (an int) or None, got {type(at).__name__}")
    if at < 0:
        raise ValueError(f"flush(at=...) must not be negative, got {at}")
    return int(at)
