"""Shared pytest fixtures: tiny random NeMo checkpoints, NeMo reference models, test audio.

Checkpoints are built at most once per session (a couple of seconds each, plus
NeMo's ~8 s import on first use).  Set MONOSEMANTIC_NEMO_CKPT_CACHE=/some/dir
to reuse them across sessions; the cache is keyed by a fingerprint of the
builder source and library versions, so it never goes stale silently.

Nothing here imports NeMo at collection time; fixtures that need it skip the
test when NeMo is not installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from _support.nemo_checkpoints import (
    CACHE_ENV,
    DATA_DIR,
    VARIANTS,
    build_hf_cache,
    default_cache_dir,
    get_checkpoint,
)


def _require_nemo() -> None:
    pytest.importorskip("nemo.collections.asr", reason="NeMo (the reference implementation) is not installed")


@pytest.fixture(scope="session")
def nemo_checkpoint_dir(tmp_path_factory) -> Path:
    """Where this session's checkpoints live: the persistent cache if configured, else a session temp dir."""
    if os.environ.get(CACHE_ENV):
        return default_cache_dir()
    return tmp_path_factory.mktemp("nemo_checkpoints")


@pytest.fixture(scope="session")
def nemo_checkpoint(nemo_checkpoint_dir) -> Callable[[str], Path]:
    """Factory ``name -> Path`` of the variant's ``.nemo`` file (built on first request)."""
    _require_nemo()
    return lambda name: get_checkpoint(name, nemo_checkpoint_dir)


@pytest.fixture(scope="session")
def nemo_model(nemo_checkpoint) -> Callable[[str], object]:
    """Factory ``name -> NeMo model`` restored from the checkpoint, once per session.

    The model is shared between tests: use the helpers in
    ``_support.nemo_reference`` (they restore look-ahead mode and decoder type)
    rather than mutating it.
    """
    from _support.nemo_reference import load_nemo

    models: dict[str, object] = {}

    def get(name: str):
        if name not in models:
            models[name] = load_nemo(nemo_checkpoint(name))
        return models[name]

    return get


@pytest.fixture(scope="session", params=sorted(VARIANTS))
def variant_name(request) -> str:
    """Parametrises a test over every checkpoint variant."""
    return request.param


@pytest.fixture(scope="session")
def manifest() -> list[dict]:
    """Entries of tests/data/manifest.jsonl (``audio`` file name, reference ``text``, provenance)."""
    lines = (DATA_DIR / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="session")
def audio_clips(manifest) -> dict[str, np.ndarray]:
    """Every manifest clip as float32 mono 16 kHz audio, keyed by file name (manifest order)."""
    import soundfile as sf

    clips = {}
    for entry in manifest:
        audio, sr = sf.read(str(DATA_DIR / entry["audio"]), dtype="float32", always_2d=True)
        assert sr == 16000, f"{entry['audio']}: {sr} Hz"
        clips[entry["audio"]] = np.ascontiguousarray(audio.mean(axis=1))
    return clips


@pytest.fixture
def hf_home_with(nemo_checkpoint, tmp_path) -> Callable[..., Path]:
    """Factory ``(variant, repo_id="nvidia/<variant>") -> HF_HOME`` holding the checkpoint as a cached hub repo.

    Point ``HF_HOME`` at the result and set ``HF_HUB_OFFLINE=1`` (before
    huggingface_hub is imported -- it reads both at import time), or pass
    ``cache_dir=<HF_HOME>/hub`` to ``snapshot_download``.
    """

    def make(variant: str, repo_id: str | None = None) -> Path:
        hf_home = tmp_path / "hf_home"
        build_hf_cache(nemo_checkpoint(variant), repo_id or f"nvidia/{variant}", hf_home)
        return hf_home

    return make


@pytest.fixture(scope="session")
def ms_model(nemo_checkpoint) -> Callable[[str], object]:
    """Factory ``name -> monosemantic.ASRModel`` loaded (by the real loader) from the variant's checkpoint,
    once per session. Tests must not mutate it, or must restore what they change."""
    import monosemantic

    models: dict[str, object] = {}

    def get(name: str):
        if name not in models:
            models[name] = monosemantic.load_model(nemo_checkpoint(name), device="cpu")
        return models[name]

    return get


@pytest.fixture(scope="session")
def model(ms_model):
    """The tiny Nemotron RNN-T checkpoint as an ASRModel, the model most tests of the engine's users run
    (a test module that needs another defines its own `model`, which takes precedence)."""
    return ms_model("nemotron_rnnt")


@pytest.fixture(scope="session")
def nemo_tokens(nemo_model, audio_clips) -> Callable[[str, tuple], list]:
    """Factory ``(variant, attention context) -> token ids`` of NeMo's offline ``transcribe()`` on every
    clip (manifest order) with that context set; computed once per session."""
    from _support.nemo_reference import nemo_transcribe_tokens

    cache: dict[tuple, list] = {}

    def get(name: str, context: tuple):
        key = (name, tuple(context))
        if key not in cache:
            cache[key] = nemo_transcribe_tokens(nemo_model(name), list(audio_clips.values()), list(context))
        return cache[key]

    return get
