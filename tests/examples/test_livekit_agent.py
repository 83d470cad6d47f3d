"""examples/livekit_agent.py: a model its worker processes could not load stops it at start, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("livekit.agents")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def start(**env: str) -> subprocess.CompletedProcess:
    """`livekit_agent.py start` against a LiveKit URL where nothing listens: the worker would start its
    processes (each running `setup`, which loads the model) while it tries to connect."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MONOSEMANTIC_", "LIVEKIT_"))}
    environ.update(LIVEKIT_URL="ws://127.0.0.1:9", LIVEKIT_API_KEY="k", LIVEKIT_API_SECRET="s", **env)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "livekit_agent.py"), "start"],
        capture_output=True, text=True, timeout=90, env=environ,
    )


@pytest.mark.parametrize("model", ["missing.nemo", "nobody-here/no-such-model"])
def test_a_model_the_workers_cannot_load_is_one_line_at_start(tmp_path, model):
    """A bad MONOSEMANTIC_MODEL was found by each worker process's `setup`: LiveKit logged a traceback
    ('error initializing process') for every process, and went on starting new ones."""
    spec = str(tmp_path / model) if model.endswith(".nemo") else model
    result = start(MONOSEMANTIC_MODEL=spec, HF_HUB_OFFLINE="1")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: MONOSEMANTIC_MODEL={spec!r}"), result.stderr[-3000:]
