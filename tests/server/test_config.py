"""ServerConfig refuses timeouts no server can run with, before anything starts: inf or nan reached
aiohttp at shutdown (a traceback and exit status 1 after SIGTERM) or closed idle streams "after nan s"."""

from __future__ import annotations

import math

import pytest

from monosemantic.server.config import ServerConfig

TIMEOUTS = ("idle_timeout_seconds", "close_timeout_seconds", "final_timeout_seconds", "drain_timeout_seconds",
            "heartbeat_seconds")


@pytest.mark.parametrize("name", TIMEOUTS)
@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1.0, "30", True])
def test_a_timeout_must_be_a_positive_finite_number(name, value):
    with pytest.raises(ValueError, match=name):
        ServerConfig(**{name: value})


def test_heartbeat_may_be_off_and_finite_timeouts_are_kept():
    config = ServerConfig(heartbeat_seconds=None, drain_timeout_seconds=0.5, idle_timeout_seconds=600)
    assert config.heartbeat_seconds is None and config.drain_timeout_seconds == 0.5
