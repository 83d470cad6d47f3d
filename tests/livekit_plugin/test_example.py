"""examples/livekit_agent.py imports without network or LLM keys, builds its STT on a tiny checkpoint
(prewarm loads it into the shared engine), and names the pip package when an LLM plugin is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import monosemantic

pytestmark = pytest.mark.timeout(120)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "livekit_agent.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("livekit_agent_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_builds_its_stt_and_prewarms_the_shared_engine(example, checkpoint, monkeypatch):
    monkeypatch.setenv("MONOSEMANTIC_MODEL", checkpoint)
    monkeypatch.setenv("MONOSEMANTIC_DEVICE", "cpu")
    stt = example.build_stt()
    assert stt.model == checkpoint
    stt.prewarm()  # no running loop: blocks until the engine is up
    assert len(monosemantic.engine.shared.shared_engines()) == 1


def test_example_model_choice(example):
    assert example.build_model("openai/gpt-4.1-mini", "LLM") == "openai/gpt-4.1-mini"  # LiveKit Inference
    with pytest.raises(SystemExit, match="pip install livekit-plugins-nosuchvendor"):
        example.build_model("nosuchvendor:some-model", "TTS")


@pytest.mark.parametrize("value", ["fast", "160ms"])
def test_a_latency_that_is_not_a_number_names_the_variable(example, monkeypatch, value):
    """MONOSEMANTIC_LATENCY_MS=fast raised int()'s bare ValueError ("invalid literal for int() with base
    10") from the worker's setup, naming neither the variable nor what it wants."""
    monkeypatch.setenv("MONOSEMANTIC_LATENCY_MS", value)
    with pytest.raises(SystemExit, match="MONOSEMANTIC_LATENCY_MS must be"):
        example.build_stt()
