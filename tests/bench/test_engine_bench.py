"""The engine side of `monosemantic bench`: a short real-time run measures every chunk and final, and a
run whose engine fails a step counts the errors and ends (no hang waiting for finals that never come)."""

from __future__ import annotations

import numpy as np
import pytest

from monosemantic.bench.engine_bench import EngineTrials
from monosemantic.bench.workload import make_workload
from monosemantic.engine import EngineConfig

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def clips(audio_clips):
    # Short utterances keep the real-time runs brief.
    return [clip[:24000] for clip in list(audio_clips.values())[:3]]


def test_a_short_run_measures_chunks_and_finals(ms_model, clips):
    plans = make_workload(clips, streams=3, seconds=2.0, seed=1)
    trials = EngineTrials(ms_model("nemotron_rnnt"), EngineConfig(max_streams=4, vad=None))
    try:
        res = trials.run(plans, 160)
    finally:
        trials.close()
    assert res.errors == 0 and res.streams == 3
    assert len(res.final_latency_ms) == sum(len(p.utterances) for p in plans)
    assert len(res.chunk_latency_ms) > 3 * 8 and all(np.isfinite(res.chunk_latency_ms))
    assert res.audio_seconds == pytest.approx(sum(len(u.audio) for p in plans for u in p.utterances) / 16000)
    assert "mean batch=" in res.notes and "first error" not in res.notes
    # The latency split: one send lag per frame pushed; each chunk's latency from its actual push is at
    # most its latency from the schedule (the client never sends early).
    assert len(res.send_lag_ms) == sum(1 for p in plans for _ in p.frames()) and min(res.send_lag_ms) >= 0
    assert len(res.engine_latency_ms) == len(res.chunk_latency_ms)
    assert all(own <= total + 1.0 for own, total in zip(res.engine_latency_ms, res.chunk_latency_ms))
    assert res.summary()["engine_latency_ms"]["p50"] > 0


def test_a_failing_step_is_counted_and_the_run_ends(ms_model, clips, monkeypatch):
    plans = make_workload(clips, streams=3, seconds=2.0, seed=2)
    trials = EngineTrials(ms_model("nemotron_rnnt"), EngineConfig(max_streams=4, vad=None))
    runner = trials.engine.core.runner
    real_step, calls = runner.step, [0]

    def flaky_step(batch):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step(batch)

    monkeypatch.setattr(runner, "step", flaky_step)
    try:
        res = trials.run(plans, 160)
    finally:
        trials.close()
    assert 1 <= res.errors <= 3 and not res.sustained
    assert "first error: internal: RuntimeError: CUDA out of memory (simulated)" in res.notes
    assert res.final_latency_ms  # the streams the failure spared still got their finals
