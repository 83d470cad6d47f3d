"""The engine end to end on real speech with tiny models: batch invariance across many streams and
latency modes, flush semantics, slot reuse, bad input isolation, capacity and backpressure."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import monosemantic
from monosemantic import CapacityError, Engine, EngineConfig, Final, Partial, StreamError, Usage

pytestmark = pytest.mark.timeout(600)


async def collect_until_final(stream) -> tuple[list, Final]:
    events = []
    async for event in stream:
        events.append(event)
        if isinstance(event, Final):
            return events, event
    raise AssertionError(f"stream ended without a Final: {events}")


def sync_finals(stream, n: int) -> list[Final]:
    """The next `n` Finals of a SyncStream (other events skipped)."""
    finals = []
    while len(finals) < n:
        event = stream.get(timeout=60)
        if isinstance(event, Final):
            finals.append(event)
    return finals


async def push_randomly(stream, audio: np.ndarray, rng, low=1, high=6000) -> None:
    i = 0
    while i < len(audio):
        n = int(rng.integers(low, high))
        await stream.push(audio[i : i + n])
        i += n
        if rng.random() < 0.3:
            await asyncio.sleep(0)


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
def test_32_streams_two_modes_equal_offline(ms_model, audio_clips, variant):
    """Batch invariance: each stream's final equals that clip transcribed alone offline (and thus NeMo),
    whatever shares its batches, at random start offsets and push sizes."""
    model = ms_model(variant)
    clips = list(audio_clips.values())
    modes = [160, 80]

    async def one(engine, i):
        rng = np.random.default_rng(i)
        await asyncio.sleep(float(rng.uniform(0, 0.2)))  # random start offsets
        stream = await engine.open_stream(latency_ms=modes[i % 2])
        audio = clips[i % len(clips)]
        await push_randomly(stream, audio, rng)
        await stream.flush()
        events, final = await collect_until_final(stream)
        await stream.close()
        return events, final

    async def main():
        async with Engine(model, EngineConfig(max_streams=32, max_batch=32, vad=None)) as engine:
            return await asyncio.gather(*(one(engine, i) for i in range(32)))

    results = asyncio.run(main())
    for i, (events, final) in enumerate(results):
        expected = model.transcribe(clips[i % len(clips)], latency_ms=modes[i % 2])
        assert [t.id for t in final.tokens] == expected.token_ids, f"stream {i}"
        assert final.text == expected.text and final.start == 0 and final.end == len(clips[i % len(clips)])
        partials = [e.text for e in events if isinstance(e, Partial)]
        assert all(final.text.startswith(p) for p in partials)
        assert [w.text for w in final.words] == [w.text for w in expected.words]


def test_flush_semantics(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.flush()  # nothing pushed: an empty Final, not an error
            _, empty = await collect_until_final(stream)
            await stream.push(a)
            await stream.flush()
            await stream.push(b[:12345])
            await stream.flush()
            _, first = await collect_until_final(stream)
            _, second = await collect_until_final(stream)
            await stream.close()
            return empty, first, second

    empty, first, second = asyncio.run(main())
    assert empty.text == "" and empty.tokens == [] and (empty.start, empty.end) == (0, 0)
    assert [t.id for t in first.tokens] == model.transcribe(a, latency_ms=160).token_ids
    assert (first.start, first.end) == (0, len(a))
    # the second utterance is transcribed on its own, with times in stream samples
    alone = model.transcribe(b[:12345], latency_ms=160)
    assert [t.id for t in second.tokens] == alone.token_ids
    assert (second.start, second.end) == (len(a), len(a) + 12345)
    assert [t.start for t in second.tokens] == [t.start + len(a) for t in alone.tokens]


@pytest.mark.parametrize("sync", [False, True])
def test_flush_at_a_sample_ends_the_utterance_there(ms_model, audio_clips, sync):
    """Two utterances pushed at once, faster than real time (a backlog, a pre-connect buffer): a flush
    at the first one's end ends its Final there, and the audio after it is the next utterance, each
    transcribed as if alone. A cut the engine has already encoded past moves up to where it can go: the
    Finals still cover the audio once, each equal to its part transcribed alone."""
    model = ms_model("nemotron_rnnt")
    a, b = audio_clips["jfk.wav"][:48000], audio_clips["61-70968-0000.flac"][:40000]
    both = np.concatenate([a, b])

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(both)
            points = [await stream.flush(at=len(a)), await stream.flush()]
            finals = [(await collect_until_final(stream))[1] for _ in range(2)]
            # behind the engine: wait until it has encoded most of the audio, then cut near its start
            await stream.push(a)
            while engine.core.buffered_seconds(stream.handle) > 0.5:
                await asyncio.sleep(0.01)
            late = await stream.flush(at=len(both) + 100)
            await stream.flush()
            finals += [(await collect_until_final(stream))[1] for _ in range(2)]
            await stream.close()
            return points + [late], finals

    def run_sync():
        with monosemantic.SyncEngine(model, EngineConfig(vad=None)) as engine:
            stream = engine.open_stream(latency_ms=160)
            stream.push(both)
            points = [stream.flush(at=np.int64(len(a))), stream.flush()]
            stream.push(a)
            while engine.core.buffered_seconds(stream.handle) > 0.5:
                time.sleep(0.01)
            points.append(stream.flush(at=len(both) + 100))
            stream.flush()
            finals = sync_finals(stream, 4)
            stream.close()
            return points, finals

    points, finals = run_sync() if sync else asyncio.run(main())
    assert points[:2] == [len(a), len(both)]
    late = points[2]
    assert len(both) + 100 < late < len(both) + len(a)  # moved up past the audio already encoded
    parts = [a, b, a[: late - len(both)], a[late - len(both) :]]
    bounds = [(0, len(a)), (len(a), len(both)), (len(both), late), (late, len(both) + len(a))]
    for final, part, bound in zip(finals, parts, bounds):
        assert (final.start, final.end) == bound
        assert [t.id for t in final.tokens] == model.transcribe(part, latency_ms=160).token_ids


@pytest.mark.parametrize("sync", [False, True])
def test_a_flush_at_a_sample_that_times_out_or_is_cancelled_ends_nothing(ms_model, audio_clips, sync):
    """A flush(at=n) waiting for room for the audio before it (the engine held still, the buffer full)
    that times out or is cancelled leaves the stream as it was: no flush point, the audio pushed kept,
    the resampler untouched (44.1 kHz). Once the engine runs, flush(at=n) again and a plain flush give
    two Finals covering the audio once, each its part transcribed alone."""
    import threading

    from monosemantic.audio import StreamResampler, resample

    model = ms_model("nemotron_rnnt")
    rate = 44100
    audio = resample(np.concatenate([audio_clips["jfk.wav"][:40000], audio_clips["61-70968-0000.flac"][:16000]]), 16000, rate)
    mirror = StreamResampler(rate, 16000)
    model_audio = np.concatenate([mirror.push(audio), mirror.flush()])
    config = EngineConfig(max_buffered_seconds=1.0, push_timeout_seconds=0.3, vad=None)
    hold = threading.Event()

    async def main():
        async with Engine(model, config) as engine:
            engine.core.add_tick_hook(lambda plan, elapsed: hold.wait(30))
            stream = await engine.open_stream(latency_ms=160, sample_rate=rate)
            record = engine.core.scheduler.streams[stream.handle]
            with pytest.raises(StreamError, match="push timed out"):
                await stream.push(audio)  # accepted; most of it waits for room
            with pytest.raises(StreamError, match="flush timed out"):
                await stream.flush(at=30000)
            task = asyncio.create_task(stream.flush(at=30000))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not record.flushes
            hold.set()
            points = [await stream.flush(at=30000), await stream.flush()]
            finals = [(await collect_until_final(stream))[1] for _ in range(2)]
            await stream.close()
            return points, finals

    def run_sync():
        with monosemantic.SyncEngine(model, config) as engine:
            engine.core.add_tick_hook(lambda plan, elapsed: hold.wait(30))
            stream = engine.open_stream(latency_ms=160, sample_rate=rate)
            record = engine.core.scheduler.streams[stream.handle]
            with pytest.raises(StreamError, match="push timed out"):
                stream.push(audio)
            with pytest.raises(StreamError, match="flush timed out"):
                stream.flush(at=30000)
            assert not record.flushes
            hold.set()
            points = [stream.flush(at=30000), stream.flush()]
            finals = sync_finals(stream, 2)
            stream.close()
            return points, finals

    points, finals = run_sync() if sync else asyncio.run(main())
    assert 30000 <= points[0] < points[1] == len(model_audio)
    for final, (start, end) in zip(finals, [(0, points[0]), (points[0], points[1])]):
        assert (final.start, final.end) == (start, end)
        assert [t.id for t in final.tokens] == model.transcribe(model_audio[start:end], latency_ms=160).token_ids


def test_flush_at_refuses_what_is_not_a_sample_index(ms_model):
    async def main():
        async with Engine(ms_model("nemotron_rnnt"), EngineConfig(vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("10", TypeError)):
                with pytest.raises(error, match="at="):
                    await stream.flush(at=bad)
            await stream.close()

    asyncio.run(main())


def test_bad_input_errors_only_that_stream(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            good = await engine.open_stream(latency_ms=160)
            bad = await engine.open_stream(latency_ms=160)
            await good.push(audio[: len(audio) // 2])
            with pytest.raises(monosemantic.AudioError, match="dtype"):
                await bad.push(np.array([1, 2, 3], dtype=np.uint8))
            with pytest.raises(monosemantic.AudioError, match="NaN or infinite"):
                await bad.push(np.array([0.1, np.inf], dtype=np.float32))
            with pytest.raises(monosemantic.AudioError, match="odd byte count"):
                await bad.push(b"\x00\x01\x02")
            await bad.push(b"\x00\x01" * 800)  # the stream is still usable after a bad push
            with pytest.raises(monosemantic.AudioError, match="sample rate"):
                await engine.open_stream(sample_rate=-5)
            with pytest.raises(ValueError, match="not a mode"):
                await engine.open_stream(latency_ms=123)
            for latency in (160.0, [160], "160"):  # not looked up, hashed or silently truncated
                with pytest.raises(ValueError, match="not a mode"):
                    await engine.open_stream(latency_ms=latency)
            with pytest.raises(monosemantic.AudioError, match="must lie in"):
                await bad.push(np.full(320, 3e38, dtype=np.float32))  # finite, but overflows the VAD state
            await bad.close()
            with pytest.raises(StreamError, match="closed"):
                await bad.push(audio[:100])
            with pytest.raises(StreamError, match="closed"):
                await bad.push(b"")  # even with nothing to write
            with pytest.raises(StreamError, match="closed"):
                await bad.flush()
            await good.push(audio[len(audio) // 2 :])
            await good.flush()
            _, final = await collect_until_final(good)
            return final

    final = asyncio.run(main())
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


def test_typed_views_and_tensors_are_read_as_their_own_dtype(ms_model, audio_clips):
    """A memoryview of float32 samples is float audio (it used to be read as int16 bytes); a bfloat16
    tensor is accepted. Both give the transcript of the same audio pushed as a float32 array."""
    import torch

    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:32000]

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            finals = []
            for pcm in (audio, memoryview(audio), torch.from_numpy(audio).to(torch.bfloat16).float().numpy(),
                        torch.from_numpy(audio).to(torch.bfloat16)):
                stream = await engine.open_stream(latency_ms=160)
                await stream.push(pcm)
                await stream.flush()
                finals.append((await collect_until_final(stream))[1])
                await stream.close()
            return finals

    plain, view, rounded, bf16 = asyncio.run(main())
    assert plain.end == view.end == bf16.end == len(audio)
    assert [t.id for t in view.tokens] == [t.id for t in plain.tokens] == model.transcribe(audio, latency_ms=160).token_ids
    assert [t.id for t in bf16.tokens] == [t.id for t in rounded.tokens]


def test_a_failure_past_the_model_calls_fails_that_tick_only(ms_model, audio_clips, monkeypatch):
    """A bug while routing results (here: the partial's text) must not stop the loop thread: the
    streams of that tick get Error('internal'), and the engine serves the next streams exactly."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    real_extend, calls = model.tokenizer.extend, [0]

    def failing_once(*args):
        calls[0] += 1
        if calls[0] == 1:
            raise KeyError("routing bug (simulated)")
        return real_extend(*args)

    monkeypatch.setattr(model.tokenizer, "extend", failing_once)

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            doomed = await engine.open_stream(latency_ms=160)
            try:
                await doomed.push(audio)
            except StreamError:  # the engine may close it while the push is still writing
                pass
            events = [event async for event in doomed]
            assert calls[0] == 1
            fresh = await engine.open_stream(latency_ms=160)
            await fresh.push(audio)
            await fresh.flush()
            _, final = await collect_until_final(fresh)
            return events, final

    events, final = asyncio.run(main())
    errors = [e for e in events if isinstance(e, monosemantic.Error)]
    assert len(errors) == 1 and errors[0].code == "internal" and "routing bug" in errors[0].message
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


def test_capacity(ms_model):
    model = ms_model("nemotron_rnnt")

    async def main():
        async with Engine(model, EngineConfig(max_streams=3, vad=None)) as engine:
            streams = [await engine.open_stream() for _ in range(3)]
            with pytest.raises(CapacityError, match="maximum of 3 streams"):
                await engine.open_stream()
            await streams[0].close()
            await engine.open_stream()  # the freed slot is usable again

    asyncio.run(main())


def test_no_batch_is_sized_beyond_the_streams_the_engine_serves(ms_model):
    """A step never batches more rows than there are streams, so the CUDA graphs `warmup_latencies`
    captures at start stop at the bucket that holds max_streams rows: with max_streams=4 and the default
    max_batch (64), every bucket up to 64 was captured (12 per mode, about a second each, their memory
    sized for 64 rows) where 1, 2, 3 and 4 are all that can ever run."""
    from monosemantic.engine.core import EngineCore

    model = ms_model("nemotron_rnnt")
    core = EngineCore(model, EngineConfig(max_streams=4, vad=None, warmup_latencies=(160,)))
    assert core.runner.buckets == [1, 2, 3, 4]
    core = EngineCore(model, EngineConfig(max_streams=40, max_batch=6, vad=None))
    assert core.runner.buckets == [1, 2, 3, 4, 6]


def test_slot_reuse_1000_cycles_leaves_nothing_behind(ms_model, audio_clips):
    """Open/push/close 1,000 times, half the closes right after a push (mid-step): no slot stays
    taken, and no stream ever sees another stream's transcript."""
    model = ms_model("nemotron_rnnt")
    clips = list(audio_clips.values())
    expected = {i: model.transcribe(c[:8000], latency_ms=80).text for i, c in enumerate(clips)}

    async def main():
        config = EngineConfig(max_streams=4, vad=None)
        async with Engine(model, config) as engine:
            finals = []
            for cycle in range(1000):
                stream = await engine.open_stream(latency_ms=80)
                clip = cycle % len(clips)
                await stream.push(clips[clip][:8000])
                if cycle % 2:
                    await stream.close()  # closes while the loop is stepping it
                    continue
                await stream.flush()
                _, final = await collect_until_final(stream)
                finals.append((clip, final.text))
                await stream.close()
            core = engine.core
            await asyncio.sleep(0.2)
            return finals, len(core.scheduler.free_slots), len(core.streams), len(core.scheduler.streams)

    finals, free, open_streams, records = asyncio.run(main())
    assert free == 4 and open_streams == 0 and records == 0
    assert all(text == expected[clip] for clip, text in finals)


@pytest.mark.parametrize("longest", [False, True])
def test_backpressure_throttles_a_fast_producer(ms_model, audio_clips, longest):
    """The buffer bound holds; with the smallest bound (1 s) a mode whose step reads more than 1 s of
    audio still runs: the bound grows to one step (it used to stall every push until it timed out)."""
    model = ms_model("nemotron_rnnt")
    audio = np.concatenate(list(audio_clips.values()))  # ~45 s
    latency = max(model.latency_modes) if longest else 560
    bound = []

    async def main():
        async with Engine(model, EngineConfig(max_buffered_seconds=1.0, vad=None, push_timeout_seconds=10)) as engine:
            bound.append(engine.core.capacity / model.sample_rate)
            stream = await engine.open_stream(latency_ms=latency)
            peak = 0.0

            async def watch():
                nonlocal peak
                while True:
                    peak = max(peak, engine.core.buffered_seconds(stream.handle))
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            await stream.push(audio)  # 45 s at once: must wait for the engine, 1 s at a time
            await stream.flush()
            watcher.cancel()
            _, final = await collect_until_final(stream)
            return peak, final

    peak, final = asyncio.run(main())
    assert 1.0 < bound[0] < 1.3  # the longest mode's step (1.12 s of chunk plus its look-back) fits
    assert peak <= bound[0] + 1e-6
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=latency).token_ids


def test_push_times_out_when_the_engine_cannot_keep_up(ms_model):
    model = ms_model("nemotron_rnnt")

    async def main():
        engine = Engine(model, EngineConfig(max_buffered_seconds=1.0, push_timeout_seconds=0.3, vad=None))
        stream = await engine.open_stream(latency_ms=160)
        engine.core._stopping = True  # the loop thread stops stepping (as if overloaded)
        engine.core.wake.set()
        await asyncio.sleep(0.1)
        with pytest.raises(StreamError, match="timed out"):
            await stream.push(np.zeros(16000 * 3, dtype=np.float32))
        engine.core._stopping = False
        await engine.aclose()

    asyncio.run(main())


def test_partials_carry_the_span_of_audio_they_transcribe(ms_model, audio_clips):
    """Each Partial says where its utterance starts and how far it has transcribed: the end grows, stays
    within the audio pushed, and the next utterance starts at the previous Final's end."""
    model = ms_model("nemotron_rnnt")
    first, second = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            utterances = []
            for audio in (first, second):
                for i in range(0, len(audio), 3200):
                    await stream.push(audio[i : i + 3200])
                await stream.flush()
                utterances.append(await collect_until_final(stream))
            await stream.close()
            return utterances

    (events1, final1), (events2, final2) = asyncio.run(main())
    for events, final, start in ((events1, final1, 0), (events2, final2, len(first))):
        partials = [e for e in events if isinstance(e, Partial)]
        assert partials and final.start == start
        assert all(p.start == start for p in partials)
        ends = [p.end for p in partials]
        assert ends == sorted(ends) and start < ends[0] and ends[-1] <= final.end
    assert final2.end == len(first) + len(second)


def test_usage_events_and_close_ends_iteration(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = np.concatenate([audio_clips["jfk.wav"]] * 2)  # 22 s

    async def main():
        async with Engine(model, EngineConfig(usage_interval_seconds=5.0, vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=560)
            await stream.push(audio)
            await stream.flush()
            events, _ = await collect_until_final(stream)
            await stream.close()
            rest = [e async for e in stream]
            return events + rest

    events = asyncio.run(main())
    usage = [e.audio_seconds for e in events if isinstance(e, Usage)]
    # Usage counts exactly the audio pushed: not the masked start of the first window, nor the padding
    # of the last one past the flush point.
    assert len(usage) >= 4 and abs(sum(usage) - len(audio) / 16000) < 1e-6


@pytest.mark.parametrize("skip_silence_ms", [None, 300])
def test_usage_counts_every_utterance_in_full(ms_model, audio_clips, skip_silence_ms):
    """Utterances whose length is no multiple of the 10 ms feature hop, and silence skipped by
    skip_silence_ms, are counted to the sample (the last partial frame of each utterance used to be
    left out)."""
    model = ms_model("nemotron_rnnt")
    speech = audio_clips["jfk.wav"]
    utterances = [np.concatenate([speech[k * 20000 : k * 20000 + 16000], np.zeros(40000 + 333 * k, np.float32)])
                  for k in range(3)]

    async def main():
        config = EngineConfig(skip_silence_ms=skip_silence_ms, freeze_gc=False)
        async with Engine(model, config) as engine:
            stream = await engine.open_stream(latency_ms=160)
            events = []
            for audio in utterances:
                await stream.push(audio)
                await stream.flush()
                events += (await collect_until_final(stream))[0]
            await stream.close()
            return events + [e async for e in stream]

    events = asyncio.run(main())
    usage = sum(e.audio_seconds for e in events if isinstance(e, Usage))
    assert round(usage * 16000) == sum(len(u) for u in utterances)


def test_engine_shutdown_closes_streams_with_an_error(ms_model):
    model = ms_model("nemotron_rnnt")

    async def main():
        engine = Engine(model, EngineConfig(vad=None))
        stream = await engine.open_stream()
        await stream.push(np.zeros(3200, dtype=np.float32))
        await engine.aclose()
        return [e async for e in stream]

    events = asyncio.run(main())
    assert isinstance(events[-1], monosemantic.Error) and events[-1].code == "closed"


@pytest.mark.parametrize("facade", ["asyncio", "sync"])
def test_a_process_exiting_with_its_engine_busy_and_open_exits_cleanly(nemo_checkpoint, facade):
    """An engine its owner never closed, stepping when the interpreter exits: the loop is stopped at exit
    rather than left inside a torch op, which aborted the process (SIGABRT, "terminate called without an
    active exception")."""
    import subprocess
    import sys
    from pathlib import Path

    audio = Path(__file__).parents[1] / "data" / "jfk.wav"
    code = f"""
import asyncio, time
import soundfile as sf
import monosemantic
model = monosemantic.load_model({str(nemo_checkpoint("nemotron_rnnt"))!r}, device="cpu")
audio, _ = sf.read({str(audio)!r}, dtype="float32")
config = monosemantic.EngineConfig(max_streams=8, vad=None)
streams = []  # held: a stream dropped unclosed is closed by the engine, which would then be idle
if {facade!r} == "asyncio":
    async def main():
        engine = monosemantic.Engine(model, config)
        for _ in range(8):
            streams.append(await engine.open_stream(latency_ms=80))
            await streams[-1].push(audio)
        await asyncio.sleep(0.05)
    asyncio.run(main())
else:
    engine = monosemantic.SyncEngine(model, config)
    for _ in range(8):
        streams.append(engine.open_stream(latency_ms=80))
        streams[-1].push(audio)
    time.sleep(0.05)
print("exiting")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "exiting" in done.stdout, done.stderr
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr


def test_a_child_forked_while_engines_run_gets_clear_errors_and_fresh_engines(nemo_checkpoint):
    """A fork copies an engine but not its loop thread. In the child, the inherited engine refuses new
    streams, and the inherited streams their pushes, flushes and reads, with an error naming the fork
    (they used to be accepted and never stepped, and a read waited forever), get_engine builds a new engine that transcribes as the parent's
    did (torch's OpenMP pool, which does not survive the fork either, is not used there), and the parent
    goes on unaffected."""
    import subprocess
    import sys
    from pathlib import Path

    audio = Path(__file__).parents[1] / "data" / "jfk.wav"
    code = f"""
import asyncio, faulthandler, os
import soundfile as sf
import monosemantic
from monosemantic import EngineConfig, Final, StreamError
path = {str(nemo_checkpoint("nemotron_rnnt"))!r}
audio, _ = sf.read({str(audio)!r}, dtype="float32")
config = EngineConfig(max_streams=4, vad=None)

def sync_final(engine):
    s = engine.open_stream(latency_ms=160)
    s.push(audio)
    s.flush()
    text = next(e.text for e in s.events(timeout=60) if isinstance(e, Final))
    s.close()
    return text

def async_final(engine):
    async def main():
        s = await engine.open_stream(latency_ms=160)
        await s.push(audio)
        await s.flush()
        async for e in s:
            if isinstance(e, Final):
                await s.close()
                return e.text
    return asyncio.run(main())

sync = monosemantic.SyncEngine(monosemantic.load_model(path, device="cpu"), config)
shared = monosemantic.get_engine(path, device="cpu", config=config)
held = sync.open_stream(latency_ms=160)
held.push(audio[:16000])
want = sync_final(sync)
assert async_final(shared) == want
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the child, with its traceback
    try:
        calls = [("open", sync.open_stream), ("push", lambda: held.push(audio[:320])), ("flush", held.flush), ("get", held.get)]
        for name, call in calls:
            try:
                call()
                print("child: no error from", name, flush=True)
                os._exit(2)
            except StreamError as e:
                assert "forked" in str(e), e
        fresh = monosemantic.get_engine(path, device="cpu", config=config)
        assert fresh is not shared
        got = async_final(fresh)
        print("child final", got == want, flush=True)
        os._exit(0 if got == want else 3)
    except BaseException as e:
        print("child:", type(e).__name__, e, flush=True)
        os._exit(4)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status))
print("parent", sync_final(sync) == want, async_final(shared) == want)
sync.close()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
    assert "child final True" in done.stdout and "child exit 0" in done.stdout, done.stdout + done.stderr
    assert "parent True True" in done.stdout, done.stdout + done.stderr


def test_sync_facade_from_threads(ms_model, audio_clips):
    import threading

    model = ms_model("nemotron_tdt")
    clips = list(audio_clips.values())[:4]
    results = {}
    with monosemantic.SyncEngine(model, EngineConfig(vad=None)) as engine:

        def worker(i):
            stream = engine.open_stream(latency_ms=160)
            for start in range(0, len(clips[i]), 320):
                stream.push(clips[i][start : start + 320])
            stream.flush()
            for event in stream.events(timeout=60):
                if isinstance(event, Final):
                    results[i] = [t.id for t in event.tokens]
                    break
            stream.close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == {i: model.transcribe(c, latency_ms=160).token_ids for i, c in enumerate(clips)}


def test_full_context_models_are_refused_with_a_reason(ms_model):
    with pytest.raises(ValueError, match="cache-aware"):
        Engine(ms_model("parakeet_tdt"))


def test_48k_int16_bytes_as_webrtc_delivers_them(ms_model, audio_clips):
    from monosemantic.audio import resample

    model = ms_model("nemotron_rnnt")
    audio48 = resample(audio_clips["jfk.wav"], 16000, 48000)
    pcm = (np.clip(audio48, -1, 1) * 32767).astype("<i2").tobytes()

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
            for i in range(0, len(pcm), 1920):  # 20 ms frames
                await stream.push(pcm[i : i + 1920])
            await stream.flush()
            _, final = await collect_until_final(stream)
            return final

    final = asyncio.run(main())
    # The single-stream API with the same streaming resampler and the same int16 frames is the reference.
    reference = model.new_stream(latency_ms=160, sample_rate=48000)
    for i in range(0, len(pcm), 1920):
        reference.feed(np.frombuffer(pcm[i : i + 1920], dtype="<i2"))
    assert [t.id for t in final.tokens] == reference.finalize().token_ids
    assert final.end == pytest.approx(len(audio_clips["jfk.wav"]), abs=2)


@pytest.mark.parametrize("freeze", [False, True])
def test_engine_start_freezes_the_garbage_collector_unless_told_not_to(ms_model, freeze):
    import gc

    from monosemantic.engine.core import EngineCore

    gc.unfreeze()
    core = EngineCore(ms_model("nemotron_rnnt"), EngineConfig(max_streams=1, vad=None, freeze_gc=freeze))
    try:
        assert gc.get_freeze_count() == 0  # nothing before the loop starts
        core.start()
        assert (gc.get_freeze_count() > 0) == freeze
    finally:
        core.stop()
        gc.unfreeze()


def test_every_tick_hook_runs_until_removed(ms_model, audio_clips):
    """Several observers (server metrics, a benchmark) each see every tick; a removed one stops."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:48000]
    calls = {"metrics": 0, "bench": 0}

    def metrics(plan, elapsed):
        calls["metrics"] += 1

    def bench(plan, elapsed):
        calls["bench"] += 1

    async def utterance(stream):
        await stream.push(audio)
        await stream.flush()
        await collect_until_final(stream)

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            engine.core.add_tick_hook(metrics)
            engine.core.add_tick_hook(bench)
            stream = await engine.open_stream(latency_ms=160)
            await utterance(stream)
            engine.core.remove_tick_hook(bench)
            seen = dict(calls)
            await utterance(stream)
            return seen

    seen = asyncio.run(main())
    assert seen["metrics"] >= 5 and abs(seen["bench"] - seen["metrics"]) <= 1  # a tick may be mid-hooks
    assert calls["metrics"] >= seen["metrics"] + 5 and calls["bench"] <= seen["bench"] + 1


def test_a_failing_tick_hook_is_removed_and_the_streams_go_on(ms_model, audio_clips, caplog):
    """An observer that raises (a metrics bug) is logged and removed; the tick's streams are not failed
    with it, and the other observers keep seeing every tick."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:48000]
    calls = {"broken": 0, "metrics": 0}

    def broken(plan, elapsed):
        calls["broken"] += 1
        raise RuntimeError("metrics bug")

    def metrics(plan, elapsed):
        calls["metrics"] += 1

    async def main():
        async with Engine(model, EngineConfig(vad=None)) as engine:
            engine.core.add_tick_hook(broken)
            engine.core.add_tick_hook(metrics)
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(audio)
            await stream.flush()
            events, final = await collect_until_final(stream)
            await stream.close()
            return events, final, engine.core.tick_hooks

    with caplog.at_level("ERROR", logger="monosemantic.engine"):
        events, final, hooks = asyncio.run(main())
    assert not [e for e in events if isinstance(e, monosemantic.Error)]
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids
    assert calls["broken"] == 1 and calls["metrics"] >= 5 and hooks == (metrics,)
    assert "tick hook" in caplog.text and "metrics bug" in caplog.text


@pytest.mark.parametrize("keep", [False, True])
def test_engine_start_keeps_freed_memory_on_cpu_unless_told_not_to(ms_model, monkeypatch, keep):
    from monosemantic.engine import core as core_module

    calls = []
    monkeypatch.setattr(core_module, "keep_freed_memory", lambda: calls.append(1) or True)
    core = core_module.EngineCore(ms_model("nemotron_rnnt"), EngineConfig(max_streams=1, vad=None, keep_freed_memory=keep))
    try:
        core.start()
        assert len(calls) == int(keep)
    finally:
        core.stop()


@pytest.mark.parametrize("entry", ["async_with", "open_stream"])
def test_starting_the_engine_leaves_the_event_loop_running(ms_model, monkeypatch, entry):
    """The engine's start (CUDA graph capture of `warmup_latencies`: seconds on a GPU) ran on the event
    loop inside `async with Engine(...)` and the first `open_stream`: every other task of the loop (a
    voice agent's other calls, a server's connections) stood still meanwhile."""
    from monosemantic.engine.runner import ModelRunner

    def slow_warmup(self, latencies):
        import time

        time.sleep(0.5)

    monkeypatch.setattr(ModelRunner, "warmup", slow_warmup)

    async def main() -> int:
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        engine = Engine(ms_model("nemotron_rnnt"), EngineConfig(max_streams=1, vad=None))
        try:
            if entry == "async_with":
                await engine.__aenter__()
            else:
                await (await engine.open_stream()).close()
            started = ticks
        finally:
            await engine.aclose()
            task.cancel()
        return started

    assert asyncio.run(main()) >= 10  # the loop ran on through the half second of warmup
