"""ServerConfig refuses timeouts no server can run with, before anything starts: inf or nan reached
aiohttp at shutdown (a traceback and exit status 1 after SIGTERM) or closed idle streams "after nan s"."""

from __future__ import annotations

import logging
import math

import pytest

from monosemantic.server.config import ServerConfig

TIMEOUTS = ("idle_timeout_seconds", "close_timeout_seconds", "final_timeout_seconds", "drain_timeout_seconds",
            "heartbeat_seconds")


@pytest.mark.parametrize("name", TIMEOUTS)
@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1.0, "30", True, 10**400])
def test_a_timeout_must_be_a_positive_finite_number(name, value):
    with pytest.raises(ValueError, match=name):
        ServerConfig(**{name: value})


def test_heartbeat_may_be_off_and_finite_timeouts_are_kept():
    config = ServerConfig(heartbeat_seconds=None, drain_timeout_seconds=0.5, idle_timeout_seconds=600)
    assert config.heartbeat_seconds is None and config.drain_timeout_seconds == 0.5


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, 1001, "0.5", True, 10**400])
def test_the_switch_interval_must_be_a_positive_finite_number_of_ms(value):
    with pytest.raises(ValueError, match="switch_interval_ms"):
        ServerConfig(switch_interval_ms=value)


@pytest.mark.parametrize("key", ["", " s3cret", "s3cret ", "s3cret\n", "s3c\tret", "s3cret\x00", b"s3cret"])
def test_an_api_key_no_client_can_present_is_refused(key):
    """Clients send the key in an HTTP header, whose value has no control characters and loses its outer
    whitespace (or as ?token=, which an empty value does not set): a server with such a key (a
    Kubernetes secret's trailing newline in $MONOSEMANTIC_API_KEY) answered every client 401."""
    with pytest.raises(ValueError, match="api_key") as err:
        ServerConfig(api_key=key)
    assert "s3cret" not in str(err.value)  # the key itself is not written into logs


@pytest.mark.parametrize("key", ["a+b/c==", "k&y#1?=%", "clé-ключ", "in side"])
def test_api_keys_of_odd_printable_characters_are_taken(key):
    assert ServerConfig(api_key=key).api_key == key


@pytest.fixture
def root_logging():
    """`serve` configures the process's root logger, with a handler on this test's captured stderr, which
    is closed after it: put the logger back, or every later test's log line is a logging error."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_refuses_a_bad_switch_interval_in_one_line_before_loading(capsys, root_logging):
    from monosemantic.cli import main

    assert main(["serve", "--model", "/nonexistent.nemo", "--switch-interval-ms", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "switch_interval_ms must be more than 0" in err


@pytest.mark.parametrize("flag, value, words", [
    ("--max-batch", "0", "max_batch must be at least 1"),
    ("--max-buffered-seconds", "0.5", "max_buffered_seconds must be at least 1"),
    ("--max-buffered-seconds", "nan", "max_buffered_seconds must be a finite number"),
    ("--usage-interval", "0", "usage_interval_seconds must be positive"),
    ("--usage-interval", "inf", "usage_interval_seconds must be a finite number"),
    ("--latency-ms", "0", "default_latency_ms must be at least 1"),
])
def test_serve_refuses_a_bad_engine_flag_in_one_line_before_loading(capsys, root_logging, flag, value, words):
    """These flags reach the engine's config, which was built only after the model had loaded (minutes for
    a real checkpoint, then 'start-up failed'); the missing checkpoint here would have been the error."""
    from monosemantic.cli import main

    assert main(["serve", "--model", "/nonexistent.nemo", flag, value]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err


def test_serve_puts_the_switch_interval_back_when_it_returns():
    import asyncio
    import sys

    from monosemantic.errors import MonosemanticError
    from monosemantic.server.app import serve

    before = sys.getswitchinterval()
    # No such address: serve fails to listen after it set the interval (the subprocess test in
    # test_shutdown.py checks that the interval is in force while serving).
    config = ServerConfig(model="/nonexistent.nemo", host="256.0.0.1", switch_interval_ms=0.25)
    with pytest.raises(MonosemanticError, match="cannot listen"):
        asyncio.run(serve(config))
    assert sys.getswitchinterval() == before


def test_serve_log_level_is_one_of_the_documented_levels():
    """A bad --log-level failed in logging's own words; 'critical', not documented, was taken. The levels
    are argparse choices now, any case, and a bad one is refused before anything starts."""
    from monosemantic.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "/nonexistent.nemo", "--log-level", "verbose"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        main(["serve", "--model", "/nonexistent.nemo", "--log-level", "critical"])
