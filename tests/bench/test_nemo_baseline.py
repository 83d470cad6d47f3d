"""The NeMo baseline of `monosemantic bench`: NeMo's own cache-aware streaming pipeline, driven in real time
with the bench workload, gives the metrics of result.BenchResult for every chunk and utterance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monosemantic.bench.workload import make_workload

CHUNK_MS = 160
CHUNK_SAMPLES = 16000 * CHUNK_MS // 1000
CLIP_S = 2.0  # clips cut to this length: 2 utterances of speech per stream and ~4 s of audio


@pytest.fixture(scope="module")
def checkpoint(nemo_checkpoint) -> str:
    return str(nemo_checkpoint("nemotron_rnnt"))


@pytest.fixture(scope="module")
def clips(audio_clips) -> list[np.ndarray]:
    return [np.ascontiguousarray(a[: int(CLIP_S * 16000)]) for a in audio_clips.values()]


@pytest.fixture(scope="module")
def plans(clips):
    plans = make_workload(clips, streams=3, seconds=4.0, seed=3)
    assert all(len(p.utterances) == 2 for p in plans)
    return plans


@pytest.fixture(scope="module")
def run(checkpoint, plans):
    from monosemantic.bench.nemo_baseline import run_nemo_detailed

    return run_nemo_detailed(checkpoint, plans, CHUNK_MS, device="cpu", compute_threads=1)


def test_every_chunk_and_utterance_is_measured(run, plans):
    result = run.result
    # One latency per chunk fed to NeMo but each utterance's last (the flush, measured as time to final).
    chunks = sum(math.ceil(len(u.audio) / CHUNK_SAMPLES) - 1 for p in plans for u in p.utterances)
    utterances = sum(len(p.utterances) for p in plans)
    assert result.errors == 0, result.notes
    assert len(result.chunk_latency_ms) == chunks
    assert len(result.final_latency_ms) == utterances
    assert result.streams == 3 and result.latency_ms == CHUNK_MS
    assert "CacheAwareRNNTPipeline" in result.system and "[70, 1]" in result.system
    # Latencies run from a send time to the end of the NeMo step that processed it: positive and finite.
    for values in (result.chunk_latency_ms, result.final_latency_ms):
        assert all(0.0 < v < 10_000.0 for v in values)
    assert result.audio_seconds == pytest.approx(sum(len(u.audio) for p in plans for u in p.utterances) / 16000)
    assert 0.0 < result.compute_seconds < result.wall_seconds
    assert math.isfinite(result.rtf) and result.rtf > 0.0
    # Real time: the run lasts about the plans (their last frame is due at ~offset + 4 s), then drains.
    plan_end = max(p.offset_s + sum(len(u.audio) for u in p.utterances) / 16000 for p in plans)
    assert plan_end <= result.wall_seconds < plan_end + 10.0
    assert result.memory_per_stream_mb is not None and result.memory_per_stream_mb > 0.0
    summary = result.summary()
    assert math.isfinite(summary["chunk_latency_ms"]["p95"]) and math.isfinite(summary["final_latency_ms"]["p50"])


def test_finals_are_text_and_do_not_depend_on_the_stream(run, plans):
    texts_by_clip: dict[int, set[str]] = {}
    for plan, finals in zip(plans, run.finals):
        assert len(finals) == len(plan.utterances)
        for utterance, text in zip(plan.utterances, finals):
            # Every clip is speech: the tiny random model emits random but non-empty text for it.
            assert isinstance(text, str) and text.strip(), (plan.index, text)
            texts_by_clip.setdefault(id(utterance.audio), set()).add(text)
    # Each utterance is its own NeMo stream with fresh caches: a clip played by several streams, at
    # different times and in different batches, gets the same final.
    repeated = [texts for key, texts in texts_by_clip.items() if sum(id(u.audio) == key for p in plans for u in p.utterances) > 1]
    assert repeated, "seed 3 should replay a clip on two streams"
    assert all(len(texts) == 1 for texts in repeated), repeated


def test_failed_steps_count_as_missing_finals(checkpoint, clips, monkeypatch):
    from monosemantic.bench import nemo_baseline

    plans = make_workload([c[:16000] for c in clips], streams=2, seconds=1.0, seed=0)
    real_step = nemo_baseline._Runner._step

    def step(self, chunks):
        if any(c.is_last and c.plan >= 0 for c in chunks):  # not the warm-up
            raise RuntimeError("injected")
        return real_step(self, chunks)

    monkeypatch.setattr(nemo_baseline._Runner, "_step", step)
    result = nemo_baseline.run_nemo(checkpoint, plans, CHUNK_MS, compute_threads=1)
    assert result.errors == sum(len(p.utterances) for p in plans) == 2
    assert result.final_latency_ms == []
    assert not result.sustained
    assert "injected" in result.notes


def test_unknown_latency_mode_is_refused_before_loading(checkpoint, plans):
    from monosemantic.bench.nemo_baseline import run_nemo

    with pytest.raises(ValueError, match="80, 160, 560, 1120"):
        run_nemo(checkpoint, plans, 240)
