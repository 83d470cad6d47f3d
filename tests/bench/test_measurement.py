"""What the bench measures: fast, deterministic checks of the measurement code, with a fake engine and a
fake NeMo pipeline on a virtual clock, against the definitions in BENCHMARKS.md ("Engine: simulated
real-time streams") and result.py."""

from __future__ import annotations

import numpy as np
import pytest

from monosemantic.bench.engine_bench import _arrival
from monosemantic.bench.workload import FRAME_MS, StreamPlan, Utterance

RATE = 16000


def _send_time_of_sample(plan: StreamPlan, sample: int, frame_ms: int = FRAME_MS) -> float:
    """When the workload actually sends the frame holding stream sample `sample - 1` (seconds after t0)."""
    total = 0
    for send_at, samples, _ in plan.frames(RATE, frame_ms):
        total += len(samples)
        if total >= sample:
            return send_at
    raise AssertionError("sample past the plan")


def test_chunk_audio_complete_time_is_the_send_time_of_the_frame_holding_its_last_sample():
    """Chunk latency runs "from when a chunk's last sample was sent". The workload restarts its 20 ms
    frame grid at every utterance (StreamPlan.frames), and the clips in tests/data are not all whole
    frames long (78480, 47840, 96800, 52640 samples: 80 or 160 samples past a frame), so after such a
    clip the frame boundaries are not multiples of 320 stream samples (`_arrival` used to assume they
    were)."""
    first = Utterance(audio=np.zeros(78480, np.float32), start_s=0.0)  # 245.25 frames (tests/data/61-70968-0000)
    second = Utterance(audio=np.zeros(32000, np.float32), start_s=78480 / RATE)
    plan = StreamPlan(index=0, offset_s=0.0, utterances=[first, second])
    # The engine's chunk ends (utt_start + hop * (window + step_mel), 160 ms mode: first_start -7,
    # step_mel 16, hop 160) of the second utterance's first windows.
    wrong = []
    for k in range(8):
        chunk_end = 78480 + 160 * (-7 + (k + 1) * 16)
        sent = _send_time_of_sample(plan, chunk_end)
        measured = _arrival(plan, 0.0, chunk_end, RATE, FRAME_MS)
        if abs(measured - sent) > 1e-9:
            wrong.append((k, round((measured - sent) * 1000, 3)))
    assert not wrong, f"(chunk, _arrival - actual send time in ms): {wrong}"


# ---------------------------------------------------------------------------------------------------
# run_trial against a fake engine, on a virtual clock (no real time passes, nothing is timed)
# ---------------------------------------------------------------------------------------------------

import asyncio  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from monosemantic.bench import engine_bench  # noqa: E402
from monosemantic.events import Final  # noqa: E402

HOP, STEP_MEL, FIRST_START, REACH = 160, 16, -7, 200


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _FakeStream:
    """An infinitely fast engine: a window is stepped (the tick hook called) at the push that makes it
    ready, a flush is answered by a Final at once."""

    def __init__(self, engine, handle: int):
        self.engine, self.handle = engine, handle
        self.written, self.utt_start, self.next_window = 0, 0, 0
        self.events: asyncio.Queue = asyncio.Queue()

    def _ready_at(self) -> int:
        return self.utt_start + HOP * (FIRST_START + (self.next_window + 1) * STEP_MEL - 1) + REACH

    async def push(self, samples) -> None:
        self.written += len(samples)
        while self._ready_at() <= self.written:
            row = SimpleNamespace(handle=self.handle, final=False, utt_start=self.utt_start,
                                  window=FIRST_START + self.next_window * STEP_MEL)
            self.next_window += 1
            self.engine.tick([row])

    async def flush(self) -> None:
        self.utt_start, self.next_window = self.written, 0
        self.events.put_nowait(Final(text="x"))

    async def close(self) -> None:
        self.events.put_nowait(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        event = await self.events.get()
        if event is None:
            raise StopAsyncIteration
        return event


class _FakeEngine:
    def __init__(self, clock):
        self.clock = clock
        self.model = SimpleNamespace(sample_rate=RATE, device="cpu")
        self.config = SimpleNamespace(freeze_gc=False, max_batch=256, vad=None)
        self.hooks = []
        self.handles = 0
        self.core = SimpleNamespace(
            add_tick_hook=self.hooks.append,
            remove_tick_hook=self.hooks.remove,
            scheduler=SimpleNamespace(geometry=SimpleNamespace(hop=HOP)),
            shapes={160: SimpleNamespace(step_mel=STEP_MEL)},
            runner=SimpleNamespace(slot_bytes=SimpleNamespace(total=lambda: 2**20)),
        )

    def tick(self, rows) -> None:
        plan = SimpleNamespace(steps=[SimpleNamespace(latency_ms=160, rows=rows)])
        for hook in list(self.hooks):
            hook(plan, 0.0)

    async def open_stream(self, latency_ms: int):
        self.handles += 1
        return _FakeStream(self, self.handles)


def _run_fake_trial(monkeypatch, plans, wake_late_s: float):
    """run_trial on the fake engine; every asyncio.sleep of the client wakes `wake_late_s` after it was
    due (as a coroutine does when the loop thread holds the GIL, or the event loop is busy)."""
    clock = _Clock()
    real_sleep = asyncio.sleep

    async def sleep(delay):
        for _ in range(3):  # what is ready now (a receiver with its Final) runs before time moves on
            await real_sleep(0)
        clock.t += max(0.0, delay) + wake_late_s

    monkeypatch.setattr(engine_bench, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(engine_bench, "asyncio", SimpleNamespace(
        sleep=sleep, create_task=asyncio.create_task, gather=asyncio.gather))
    engine = _FakeEngine(clock)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(engine_bench.run_trial(engine, plans, 160))
    finally:
        loop.close()


def _aligned_plan(offset_s: float = 0.25) -> list[StreamPlan]:
    # Whole 20 ms frames only (no misalignment from _arrival), two utterances of 1 s.
    a = np.zeros(16000, np.float32)
    return [StreamPlan(index=0, offset_s=offset_s, utterances=[Utterance(a, 0.0), Utterance(a, 1.0)])]


def test_fake_engine_on_time_client_measures_zero_latency(monkeypatch):
    """Sanity of the harness below: an infinitely fast engine and a punctual client give chunk, engine-side
    and final latencies of 0 and no client lag."""
    res = _run_fake_trial(monkeypatch, _aligned_plan(), wake_late_s=0.0)
    assert res.errors == 0 and len(res.final_latency_ms) == 2
    assert len(res.chunk_latency_ms) == len(res.engine_latency_ms) > 0
    assert max(res.chunk_latency_ms) == pytest.approx(0.0, abs=1e-6)
    assert max(res.engine_latency_ms) == pytest.approx(0.0, abs=1e-6)
    assert max(res.send_lag_ms) == pytest.approx(0.0, abs=1e-6)
    assert max(res.final_latency_ms) == pytest.approx(0.0, abs=1e-6)


def test_client_lag_counts_a_send_made_late_after_the_clients_sleep(monkeypatch):
    """Client lag is "how late the client sent each frame against its real-time schedule". Here every
    frame is pushed 3 ms after its scheduled time (the client's sleep woke late): chunk latency (from the
    schedule) is 3 ms, engine-side latency (from the actual push) 0, so the split says the client was
    3 ms late, and so does client lag (it was computed from the delay before the sleep and read 0 for
    every frame the client slept for)."""
    res = _run_fake_trial(monkeypatch, _aligned_plan(), wake_late_s=0.003)
    assert np.allclose(res.chunk_latency_ms, 3.0) and np.allclose(res.engine_latency_ms, 0.0)
    assert np.allclose(res.final_latency_ms, 3.0)  # from the scheduled flush: the late client counts
    lag = np.asarray(res.send_lag_ms)
    assert np.allclose(lag, 3.0), f"client lag reported: p95 {np.percentile(lag, 95):.1f} ms, max {lag.max():.1f} ms; every frame was sent 3 ms late"


# ---------------------------------------------------------------------------------------------------
# `monosemantic bench --baseline nemo --frame-ms N`: both systems must be fed the same frames
# ---------------------------------------------------------------------------------------------------


def test_baseline_nemo_is_fed_the_same_frame_size_as_the_engine(monkeypatch, tmp_path):
    """The workload is the same for both systems ("on the same model, workload and process"), and
    --frame-ms sets the client frame size for both (NeMo's baseline used to get 20 ms frames whatever
    the engine got). The NeMo pipeline is faked (no model is run); NeMo's real feeding loop runs about a
    second."""
    import contextlib

    import soundfile

    from monosemantic import asr
    from monosemantic.bench import command, nemo_baseline, workload
    from monosemantic.cli import _parser

    used: dict[str, set[int]] = {"engine": set(), "nemo": set()}
    real_frames = workload.StreamPlan.frames
    who = ["nemo"]

    def frames(self, sample_rate=16000, frame_ms=workload.FRAME_MS):
        used[who[0]].add(frame_ms)
        return real_frames(self, sample_rate, frame_ms)

    monkeypatch.setattr(workload.StreamPlan, "frames", frames)

    class FakeTrials:  # the engine: records the frames it would send
        def __init__(self, model, config):
            pass

        def run(self, plans, latency_ms, frame_ms=workload.FRAME_MS):
            who[0] = "engine"
            try:
                for plan in plans:
                    list(plan.frames(16000, frame_ms))
            finally:
                who[0] = "nemo"
            return engine_bench.BenchResult("monosemantic engine", len(plans), latency_ms, 1.0, 1.0, 0.1, [1.0] * 20)

        def close(self):
            pass

    class FakeModel:
        sample_rate, default_latency_ms = 16000, 160
        device = type("Device", (), {"type": "cpu", "__str__": lambda self: "cpu"})()

        def context_for(self, latency):
            return (70, 1)

    class FakePipe:
        chunk_size_in_secs = 0.16

        def open_session(self):
            pass

        def transcribe_step(self, frames):
            return [SimpleNamespace(final_transcript="x") for _ in frames]

    monkeypatch.setattr(asr, "load_model", lambda *a, **k: FakeModel())
    monkeypatch.setattr(engine_bench, "EngineTrials", FakeTrials)
    monkeypatch.setattr(nemo_baseline, "_pick_mode", lambda path, latency: ([70, 1], None))
    monkeypatch.setattr(nemo_baseline, "_build_pipeline", lambda *a, **k: FakePipe())
    monkeypatch.setattr(nemo_baseline, "_quiet_nemo", contextlib.nullcontext)
    monkeypatch.setattr(nemo_baseline._Runner, "_frames", lambda self, chunks: chunks)
    model = tmp_path / "m.nemo"
    model.write_bytes(b"")
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, np.zeros(6400, np.float32), 16000)  # 0.4 s (over two chunks): NeMo's real-time loop stays short
    args = _parser().parse_args([
        "bench", "--model", str(model), "--device", "cpu", "--latency-ms", "160", "--streams", "1",
        "--seconds", "0.4", "--frame-ms", "40", "--baseline", "nemo", "--no-vad", "--no-keep-freed-memory",
        "--audio", str(clip),
    ])
    assert command.run(args) == 0
    assert used["engine"] == {40}
    assert used["nemo"] == used["engine"], f"frame sizes (ms) fed: {used}"


def test_nemo_chunk_and_final_latency_run_from_the_actual_send_times(monkeypatch):
    """The baseline's side of the same definitions, on a virtual clock with an instantaneous fake pipeline:
    every chunk's latency (from the send of the frame holding its last sample) and every time to final
    (from the scheduled flush) is 0, also for utterances that start off the 20 ms grid."""
    from monosemantic.bench import nemo_baseline

    class Clock:
        t = 50.0

        def monotonic(self):
            return self.t

        def sleep(self, s):
            self.t += max(1e-9, s)  # a real sleep always moves the clock (no float standstill)

    clock = Clock()
    monkeypatch.setattr(nemo_baseline, "time", clock)
    monkeypatch.setattr(nemo_baseline._Runner, "_frames", lambda self, chunks: chunks)
    pipe = SimpleNamespace(chunk_size_in_secs=0.16,
                           transcribe_step=lambda frames: [SimpleNamespace(final_transcript="x") for _ in frames])
    lengths = [78480, 47840, 32000]  # 80 and 160 samples past a whole frame, then whole frames
    plans = []
    for index, offset in enumerate((0.137, 0.5)):
        utts, start = [], 0.0
        for n in lengths:
            utts.append(Utterance(np.zeros(n, np.float32), start))
            start += n / RATE
        plans.append(StreamPlan(index=index, offset_s=offset, utterances=utts))
    res = nemo_baseline._Runner(pipe, plans, 160, "cpu").run().result
    assert res.errors == 0
    assert len(res.chunk_latency_ms) == 2 * sum(-(-n // 2560) - 1 for n in lengths)
    assert len(res.final_latency_ms) == 2 * len(lengths)
    assert max(abs(x) for x in res.chunk_latency_ms + res.final_latency_ms) < 1e-6


def test_engine_chunk_latency_is_zero_on_an_instant_engine_for_utterances_off_the_frame_grid(monkeypatch):
    """What run_trial reports for the same utterances as the NeMo test above, on an instantaneous engine
    (each window stepped at the push of the frame holding its last sample): 0, as NeMo's. With the
    stream-wide frame grid `_arrival` used to assume, the second utterance (starting 80 samples off it)
    had its chunks reported 5 ms late, the third (240 off) 5 ms early, below the engine-side latency."""
    lengths = [78480, 47840, 32000]
    utts, start = [], 0.0
    for n in lengths:
        utts.append(Utterance(np.zeros(n, np.float32), start))
        start += n / RATE
    res = _run_fake_trial(monkeypatch, [StreamPlan(index=0, offset_s=0.137, utterances=utts)], wake_late_s=0.0)
    assert max(res.engine_latency_ms) == pytest.approx(0.0, abs=1e-6)
    off = sorted({round(x, 3) for x in res.chunk_latency_ms})
    assert off == [0.0], f"chunk latencies reported (ms) on an instant engine and punctual client: {off}"
