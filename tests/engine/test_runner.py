"""ModelRunner's host audio ring: writes of any size wrap around it, and every read (one strided copy
per batch, through the mirror after the ring's end) returns exactly the samples written."""

from __future__ import annotations

import numpy as np

from monosemantic.engine.runner import ModelRunner
from monosemantic.engine.scheduler import MAX_VAD_WINDOWS


def test_reads_return_what_was_written_across_wraps(ms_model):
    model = ms_model("nemotron_rnnt")
    plans = {ms: model.plan(model.context_for(ms)) for ms in (160, 560)}
    ring = 20000  # small, so the streams below wrap it many times
    runner = ModelRunner(model, plans, slots=3, ring_samples=ring, vad=False)
    assert runner.mirror >= MAX_VAD_WINDOWS * 512
    rng = np.random.default_rng(0)
    streams = [rng.standard_normal(200_000).astype(np.float32) for _ in range(3)]
    written = [0, 0, 0]
    reads = 0
    while min(written) < 190_000:
        slot = int(rng.integers(3))
        n = int(rng.choice([1, 160, 320, 7919, 16384]))
        n = min(n, len(streams[slot]) - written[slot])
        runner.write(slot, written[slot], streams[slot][written[slot] : written[slot] + n])
        written[slot] += n
        # Read back the newest audio of every slot (as much as a read may take, and still in the ring).
        length = int(rng.integers(1, runner.mirror + 1))
        if min(written) >= length:
            slots = np.array([0, 1, 2])
            first = np.array([w - int(rng.integers(length, min(w, ring) + 1)) for w in written])
            got = runner._gather(slots, first, length)
            want = np.stack([streams[s][f : f + length] for s, f in zip(slots, first)])
            np.testing.assert_array_equal(got, want)
            reads += 1
    assert reads > 50
