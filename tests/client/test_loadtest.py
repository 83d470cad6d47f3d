"""`monosemantic loadtest` as a user runs it: Ctrl-C mid-run ends it quietly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_ctrl_c_mid_run_exits_130_without_asyncio_noise(ms_model):
    """Ctrl-C while streams run: exit status 130 and nothing but asyncio-free output (it printed
    "_GatheringFuture exception was never retrieved" and a CancelledError traceback)."""
    from _support.server import RunningServer, with_default_sigint

    with RunningServer(ms_model("nemotron_rnnt")) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monosemantic", "loadtest", "--url", f"ws://127.0.0.1:{server.port}",
             "--streams", "2", "--duration", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=with_default_sigint,
        )
        try:
            assert server.wait_until(lambda: server.open_streams() >= 1, timeout=60)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    assert "never retrieved" not in stderr and "Traceback" not in stderr, stderr


def test_the_run_keeps_bounded_memory_whatever_the_number_of_partials(monkeypatch):
    """Every partial's arrival time and lag was kept in lists to the end of the run: about 1.5 GB at the
    largest run (1024 streams for an hour at 160 ms). The figures are now kept in fixed-size
    histograms, so four times the partials take no more memory."""
    import asyncio
    import gc
    import tracemalloc

    import numpy as np

    import monosemantic.client.remote as remote
    from monosemantic.client.loadtest import LoadtestConfig, run_loadtest, summarize
    from monosemantic.events import Partial

    class Stream:
        model_sample_rate = 16000

        def __init__(self, partials: int):
            self.partials, self.closed = partials, asyncio.Event()

        async def push(self, pcm) -> None:
            pass

        async def flush(self) -> None:
            pass

        async def close(self) -> None:
            self.closed.set()

        async def _events(self):
            for _ in range(self.partials):
                yield Partial("a", "a", 0, 1600)
            await self.closed.wait()

        def __aiter__(self):
            return self._events()

    partials = [0]

    class Engine:
        def __init__(self, *args, **kwargs):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc) -> None:
            pass

        async def open_stream(self, latency_ms=None, sample_rate=16000):
            return Stream(partials[0])

    monkeypatch.setattr(remote, "RemoteEngine", Engine)
    cfg = LoadtestConfig(url="ws://unused", streams=1, duration_s=1.0, ramp_s=0.0, final_timeout_s=0.01)
    clip = np.zeros(16000, np.float32)

    def retained(n: int) -> tuple[int, dict]:
        partials[0] = n
        tracemalloc.start()
        try:
            result = asyncio.run(run_loadtest(cfg, [clip]))
            gc.collect()
            size = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return size, summarize(cfg, result)

    small, small_summary = retained(50_000)
    large, large_summary = retained(200_000)
    assert small_summary["per_minute"][0]["partials"] == 50_000 and large_summary["per_minute"][0]["partials"] == 200_000
    assert large - small < 1_000_000, f"150,000 more partials kept {large - small} more bytes"


def test_histogram_percentiles_are_numpys_within_their_stated_resolution():
    import numpy as np

    from monosemantic.client.loadtest import Histogram

    rng = np.random.default_rng(0)
    for values in (rng.lognormal(-1.5, 1.0, 20_000), rng.uniform(0.0, 2e-4, 1000), [0.25], [0.1, 0.3], [5e-5, 7000.0, 2e4]):
        histogram = Histogram()
        for v in values:
            histogram.add(float(v))
        got = histogram.percentiles(qs=(0, 1, 50, 95, 99, 100), scale=1.0)
        for q, value in got.items():
            exact = float(np.percentile(values, float(q[1:])))
            assert abs(value - exact) <= max(5e-4 * exact, 1e-4), (q, value, exact)
        assert got["p0"] == min(values) and got["p100"] == max(values)
    assert Histogram().percentiles()["p50"] != Histogram().percentiles()["p50"]  # NaN: nothing measured
