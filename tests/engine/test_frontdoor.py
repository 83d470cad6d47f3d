"""The front doors: the asyncio mailbox (callbacks posted from the engine thread reach the asyncio loop in
order, many per loop wake-up), and streams over a real engine: start-up from several event loops,
streams dropped unclosed or outliving their loop, cancelled pushes and flushes, push timeouts, ordering,
the synchronous stream's end."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import numpy as np
import pytest

import monosemantic
from monosemantic import Engine, EngineConfig, Final, SyncEngine
from monosemantic.audio import resample
from monosemantic.engine.frontdoor import _Mailbox

from _support.events import final_of


def test_mailbox_delivers_in_order_in_few_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        mailbox = _Mailbox(loop)
        wakeups = [0]
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            wakeups[0] += 1
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        got: list[tuple[int, int]] = []
        done = asyncio.Event()

        def engine_thread():  # a burst per "tick", from another thread, as the engine posts events
            for tick in range(20):
                for stream in range(50):
                    mailbox.post(got.append, (tick, stream))
            mailbox.post(lambda _: done.set(), None)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        await asyncio.wait_for(done.wait(), 10)
        thread.join()
        return got, wakeups[0]

    got, wakeups = asyncio.run(main())
    assert got == [(tick, stream) for tick in range(20) for stream in range(50)]
    assert 1 <= wakeups < len(got) // 10  # batched: far fewer wake-ups than events


def test_posting_to_a_closed_loop_is_dropped_not_raised():
    """A stream left open when its event loop closed: the engine thread must not die posting to it."""
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    loop.close()
    got: list = []
    for i in range(3):
        mailbox.post(got.append, i)  # no RuntimeError('Event loop is closed')
    assert got == [] and mailbox._items == []


# ---- the front doors over a real engine: lifecycle, cancellation, ordering -------------------------------

QUIET = dict(vad=None, freeze_gc=False, keep_freed_memory=False)


def wait_until(condition, seconds=5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_event_loops_opening_the_first_streams_at_once_start_one_engine_thread(ms_model, monkeypatch):
    model = ms_model("nemotron_rnnt")
    for _ in range(3):
        engine = Engine(model, EngineConfig(max_streams=4, **QUIET))
        # Starting takes a while on a GPU (CUDA graph capture); make it as slow here.
        warmup = engine.core.runner.warmup
        monkeypatch.setattr(engine.core.runner, "warmup", lambda latencies: (time.sleep(0.2), warmup(latencies)))
        barrier = threading.Barrier(3)

        def open_one():
            async def run():
                barrier.wait()
                await engine.open_stream()

            asyncio.run(run())

        threads = [threading.Thread(target=open_one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loops = [t for t in threading.enumerate() if t.name == "monosemantic-engine"]
        engine.core.stop()
        assert len(loops) == 1


@pytest.mark.parametrize("front", ["async", "sync"])
def test_a_stream_dropped_without_close_gives_back_its_slot(ms_model, audio_clips, front):
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:16000]
    config = EngineConfig(max_streams=1, **QUIET)
    if front == "sync":
        with SyncEngine(model, config) as engine:
            for _ in range(3):
                stream = engine.open_stream()
                stream.push(audio)
                del stream
                gc.collect()
                assert wait_until(lambda: not engine.core.streams), "the dropped stream still holds its slot"
        return

    async def main():
        async with Engine(model, config) as engine:
            for _ in range(3):
                stream = await engine.open_stream()
                await stream.push(audio)
                del stream
                gc.collect()
                deadline = time.monotonic() + 5
                while engine.core.streams and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert not engine.core.streams, "the dropped stream still holds its slot"

    asyncio.run(main())


@pytest.mark.parametrize("front", ["async", "sync"])
def test_an_engine_dropped_without_closing_it_ends_its_thread_and_frees_its_model(ms_model, audio_clips, front):
    """An engine its owner lost track of (no aclose or close, its streams dropped too, one mid-audio): the
    loop thread, which used to hold the engine (and its model's slots) until the process exited, ends,
    and the engine is freed. An engine that still has a stream object is kept: the stream may be used."""
    import weakref

    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:16000]
    before = {t for t in threading.enumerate() if t.name == "monosemantic-engine"}

    def loops():
        return {t for t in threading.enumerate() if t.name == "monosemantic-engine"} - before

    if front == "sync":
        engine = SyncEngine(model, EngineConfig(max_streams=2, **QUIET))
        stream = engine.open_stream()
        stream.push(audio)
    else:

        async def open_one():
            engine = Engine(model, EngineConfig(max_streams=2, **QUIET))
            stream = await engine.open_stream()
            await stream.push(audio)
            return engine, stream

        engine, stream = asyncio.run(open_one())
    core = weakref.ref(engine.core)
    assert len(loops()) == 1
    del engine
    gc.collect()
    time.sleep(0.3)
    assert core() is not None and len(loops()) == 1, "an engine whose stream is still held was stopped"
    del stream
    gc.collect()
    assert wait_until(lambda: not loops()), "the dropped engine's loop thread still runs"
    gc.collect()
    assert core() is None, f"the dropped engine is still referenced by {gc.get_referrers(core())}"


def test_a_stream_left_open_when_its_event_loop_ends_gives_back_its_slot(ms_model, audio_clips):
    """A shared engine outlives the event loops that use it: a loop that ended (say, torn down by an
    exception) with a stream still open and still referenced must not keep the slot forever."""
    model = ms_model("nemotron_rnnt")
    engine = Engine(model, EngineConfig(max_streams=1, **QUIET))
    kept = []

    async def session():
        stream = await engine.open_stream()
        await stream.push(audio_clips["jfk.wav"][:8000])
        kept.append(stream)

    try:
        asyncio.run(session())
        assert wait_until(lambda: not engine.core.streams), "the ended loop's stream still holds its slot"
        asyncio.run(session())  # the slot is usable again
    finally:
        engine.core.stop()


def test_a_cancelled_push_or_flush_loses_no_audio_at_48k(ms_model, audio_clips, monkeypatch):
    """While the engine has no room, a push or flush is cancelled (asyncio.wait_for): the audio it had
    accepted goes first at the next call (the flush, waiting for room for the resampler's tail, has not
    taken it); the Final covers it all."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    audio48 = resample(audio, 16000, 48000)
    cut = len(audio48) // 2

    async def main():
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
            write = engine.core.write
            await stream.push(audio48[:cut])
            monkeypatch.setattr(engine.core, "write", lambda handle, samples: 0)  # a full buffer
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.push(audio48[cut:]), 0.2)
            monkeypatch.setattr(engine.core, "write", write)
            await stream.push(audio48[:0])  # writes the cancelled push's audio
            write_tail = engine.core.write_tail
            monkeypatch.setattr(engine.core, "write", lambda handle, samples: 0)
            monkeypatch.setattr(engine.core, "write_tail", lambda handle, most, produce: None)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.flush(), 0.2)  # cancelled while waiting for room for the tail
            monkeypatch.setattr(engine.core, "write", write)
            monkeypatch.setattr(engine.core, "write_tail", write_tail)
            await stream.flush()
            return await final_of(stream)

    final = asyncio.run(main())
    reference = model.new_stream(latency_ms=160, sample_rate=48000)
    reference.feed(audio48[:cut])
    reference.feed(audio48[cut:])
    expected = reference.finalize()
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == expected.token_ids


def test_a_flush_waits_for_a_throttled_push_of_the_same_stream(ms_model, audio_clips):
    """flush() called while another task's push still waits for room covers that push's audio, in
    order: the resampler tail must not overtake it."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    audio48 = resample(audio, 16000, 48000)

    async def main():
        async with Engine(model, EngineConfig(max_buffered_seconds=1.0, **QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
            push = asyncio.create_task(stream.push(audio48))
            await asyncio.sleep(0.02)
            assert not push.done()  # 11 s of audio into a 1 s buffer: it is being throttled
            await stream.flush()
            await push
            return await final_of(stream)

    final = asyncio.run(main())
    reference = model.new_stream(latency_ms=160, sample_rate=48000)
    reference.feed(audio48)
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == reference.finalize().token_ids


def test_a_cancelled_push_keeps_its_own_copy_of_the_callers_audio(ms_model, audio_clips, monkeypatch):
    """At the model's rate nothing is resampled, so the audio a cancelled push left pending was a view of
    the caller's array: a caller reusing its buffer then changed what the next push wrote."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    buffer = audio.copy()

    async def main():
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            write = engine.core.write
            monkeypatch.setattr(engine.core, "write", lambda handle, samples: 0)  # a full buffer
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.push(buffer), 0.2)
            buffer[:] = 0.0  # the caller reuses its buffer
            monkeypatch.setattr(engine.core, "write", write)
            await stream.flush()
            return await final_of(stream)

    final = asyncio.run(main())
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


@pytest.mark.parametrize("front", ["async", "sync"])
def test_a_push_timeout_says_whether_it_took_the_audio(ms_model, front):
    """The first push to time out has taken its audio (what is left goes first at the next push); a
    push timing out behind it has not, and must be pushed again: the errors tell the two apart."""
    from monosemantic import PushTimeoutError

    model = ms_model("nemotron_rnnt")
    config = EngineConfig(max_buffered_seconds=1.0, push_timeout_seconds=0.2, **QUIET)
    pushes = [np.zeros(16000 * 3, dtype=np.float32), np.zeros(16000, dtype=np.float32)]

    def stall(core):
        core._stopping = True  # the loop stops stepping, as if overloaded
        core.wake.set()
        time.sleep(0.1)

    errors = []
    if front == "async":

        async def main():
            engine = Engine(model, config)
            stream = await engine.open_stream(latency_ms=160)
            stall(engine.core)
            for pcm in pushes:
                with pytest.raises(PushTimeoutError) as caught:
                    await stream.push(pcm)
                errors.append(caught.value)
            with pytest.raises(PushTimeoutError) as caught:
                await stream.flush()
            errors.append(caught.value)
            engine.core._stopping = False
            await engine.aclose()

        asyncio.run(main())
    else:
        engine = SyncEngine(model, config)
        stream = engine.open_stream(latency_ms=160)
        stall(engine.core)
        for pcm in pushes + [None]:
            with pytest.raises(PushTimeoutError) as caught:
                stream.push(pcm) if pcm is not None else stream.flush()
            errors.append(caught.value)
        engine.core._stopping = False
        engine.close()
    took, refused, flush = errors
    assert took.accepted and "do not push it again" in str(took)
    assert not refused.accepted and "push this audio again" in str(refused)
    assert not flush.accepted and "call flush() again" in str(flush)
    assert all(isinstance(e, monosemantic.StreamError) for e in errors)  # still a StreamError


def test_sync_get_after_the_end_returns_none_again(ms_model, audio_clips):
    """After the end was read, get() and events() end at once (they blocked forever), also for a
    second thread that was waiting when the end came."""
    model = ms_model("nemotron_rnnt")
    with SyncEngine(model, EngineConfig(**QUIET)) as engine:
        stream = engine.open_stream(latency_ms=160)
        stream.push(audio_clips["jfk.wav"][:16000])
        stream.flush()
        while not isinstance(stream.get(timeout=30), Final):
            pass
        got = []

        def read_to_the_end():
            while (event := stream.get(timeout=10)) is not None:
                pass
            got.append(event)

        waiters = [threading.Thread(target=read_to_the_end) for _ in range(2)]
        for t in waiters:
            t.start()
        time.sleep(0.1)
        stream.close()
        for t in waiters:
            t.join()
        assert got == [None, None]
        assert stream.get(timeout=1) is None
        assert list(stream.events(timeout=1)) == []


def test_pushed_objects_no_samples_can_be_read_from_are_audio_errors():
    """Each used to raise the raw error of numpy or torch; an int8 view was read as int16 bytes."""
    import ctypes

    import torch

    from monosemantic.engine.frontdoor import pcm_to_float32

    released = memoryview(np.zeros(4, dtype=np.float32))
    released.release()
    released_bytes = memoryview(b"\x00\x01")
    released_bytes.release()
    cases = [
        ([[0.1, 0.2], [0.3]], "cannot read samples"),
        (released, "released memoryview"),
        (released_bytes, "released memoryview"),
        (memoryview((ctypes.c_void_p * 2)()), "cannot read samples"),
        (torch.zeros(4, device="meta"), "cannot read samples"),
        (memoryview(np.ones(4, dtype=np.int8)), "dtype int8"),
    ]
    for pcm, needle in cases:
        with pytest.raises(monosemantic.AudioError, match=needle):
            pcm_to_float32(pcm)
    assert pcm_to_float32(memoryview(b"\x00\x40")).tolist() == [0.5]  # untyped bytes stay int16 PCM


def test_a_stream_used_from_another_event_loop_is_refused_not_stalled(ms_model, audio_clips):
    """Its wake-ups go to the loop that opened it: awaited from another loop, a throttled push and the
    event iterator stalled until something unrelated woke that loop. Now a clear error; the stream stays
    usable from its own loop."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    engine = Engine(model, EngineConfig(**QUIET))
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        stream = asyncio.run_coroutine_threadsafe(engine.open_stream(latency_ms=160), owner).result(30)

        async def elsewhere():
            for call in (lambda: stream.push(audio[:1600]), stream.flush, stream.__anext__):
                with pytest.raises(monosemantic.StreamError, match="event loop that opened it"):
                    await call()

        asyncio.run(elsewhere())

        async def at_home():
            await stream.push(audio)
            await stream.flush()
            return await final_of(stream)

        final = asyncio.run_coroutine_threadsafe(at_home(), owner).result(60)
        assert final.start == 0 and final.end == len(audio)  # nothing the refused calls carried got in
    finally:
        asyncio.run_coroutine_threadsafe(engine.aclose(), owner).result(30)
        owner.call_soon_threadsafe(owner.stop)
        thread.join(10)


def test_a_closed_engine_cannot_be_entered_again(ms_model):
    """`async with` on an engine already closed used to succeed silently, leaving an engine that refused
    every stream."""
    model = ms_model("nemotron_rnnt")

    async def main():
        engine = Engine(model, EngineConfig(**QUIET))
        async with engine:
            pass
        with pytest.raises(monosemantic.StreamError, match="shut down"):
            async with engine:
                pass
        with pytest.raises(monosemantic.StreamError, match="shut down"):
            await engine.open_stream()
        never_started = Engine(model, EngineConfig(**QUIET))
        await never_started.aclose()
        with pytest.raises(monosemantic.StreamError, match="shut down"):
            await never_started.__aenter__()

    asyncio.run(main())


def test_no_event_follows_the_end_when_close_races_the_engine_thread(ms_model, audio_clips, monkeypatch):
    """close() from another thread while the engine thread is between a step's results and their
    events: those events come before the end of events, never after it (a sync reader got a Partial
    after get() had returned None). The tokenizer is held only to open that window every time."""
    model = ms_model("nemotron_rnnt")
    inside, go_on, returned = threading.Event(), threading.Event(), threading.Event()
    extend = model.tokenizer.extend

    def held(*args, **kwargs):
        inside.set()
        go_on.wait(10)
        try:
            return extend(*args, **kwargs)
        finally:
            returned.set()

    monkeypatch.setattr(model.tokenizer, "extend", held)
    with SyncEngine(model, EngineConfig(**QUIET)) as engine:
        stream = engine.open_stream(latency_ms=160)
        stream.push(audio_clips["jfk.wav"][: 16000 * 3])
        assert inside.wait(60)  # a step found labels; its Partial is not sent yet
        closer = threading.Thread(target=stream.close)
        closer.start()
        time.sleep(0.2)
        go_on.set()
        closer.join(10)
        assert not closer.is_alive() and returned.wait(10)
        time.sleep(0.5)  # the engine thread sends what it was about to (the Partial came this late)
        events = []
        while (event := stream.get(timeout=10)) is not None:
            events.append(event)
        assert [stream.get(timeout=0.2) for _ in range(3)] == [None, None, None]
        assert all(not isinstance(e, Final) for e in events)


def test_two_tasks_reading_one_stream_both_see_the_end_on_close(ms_model):
    """Events end after close, for every reader: a second task waiting in `async for` when the first
    took the end of events ends too (it used to wait forever; SyncStream re-queues its end the same way)."""
    model = ms_model("nemotron_rnnt")

    async def main():
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)

            async def read():
                return [event async for event in stream]

            readers = [asyncio.create_task(read()) for _ in range(2)]
            await asyncio.sleep(0.1)  # both wait for an event
            await stream.close()
            done, pending = await asyncio.wait(readers, timeout=3)
            for task in pending:
                task.cancel()
            return len(done), len(pending)

    done, pending = asyncio.run(main())
    assert pending == 0, "a reader of a closed stream waits forever for its end"


def test_sync_no_final_after_the_end_when_close_races_an_empty_flush(ms_model, monkeypatch):
    """An utterance ending with no step left (here: a flush with no audio) sends its Final from the
    loop's `finals` path. close() from another thread while that Final is being made: the Final comes
    before the end of events or not at all, never after get() returned None (that path did not hold the
    stream's guard or check that it was closed)."""
    model = ms_model("nemotron_rnnt")
    inside, go_on = threading.Event(), threading.Event()
    make = model.make_transcript

    def held(*args, **kwargs):
        inside.set()
        go_on.wait(10)
        return make(*args, **kwargs)

    monkeypatch.setattr(model, "make_transcript", held)
    with SyncEngine(model, EngineConfig(**QUIET)) as engine:
        stream = engine.open_stream(latency_ms=160)
        stream.flush()  # nothing pushed: a Final with nothing to encode
        assert inside.wait(30)
        closer = threading.Thread(target=stream.close)
        closer.start()
        closer.join(10)
        go_on.set()
        time.sleep(0.5)  # the engine thread sends what it was about to
        events = []
        while (event := stream.get(timeout=5)) is not None:
            events.append(event)
        after = [stream.get(timeout=0.2) for _ in range(3)]
    assert after == [None, None, None], f"events after the end: {after}"


def _pieces(n: int, rng, low: int, high: int) -> list[tuple[int, int]]:
    out, i = [], 0
    while i < n:
        k = int(rng.integers(low, high)) | 1  # odd sizes
        out.append((i, min(n, i + k)))
        i += k
    return out


@pytest.mark.parametrize("rate,vad", [(8000, False), (44100, False), (48000, False), (44100, True)])
def test_cancelled_pushes_and_flushes_at_resampled_rates_lose_nothing(ms_model, audio_clips, rate, vad):
    """Odd-sized pushes into a throttled stream at a resampled rate, each under a tiny wait_for timeout,
    and flushes retried until they go through: every Final covers exactly its utterance's audio (the
    streaming resampler's count) and transcribes it as the single-stream reference does."""
    from monosemantic.audio import StreamResampler

    model = ms_model("nemotron_rnnt")
    audio = resample(audio_clips["jfk.wav"], 16000, rate)
    parts = [audio[: len(audio) // 3], audio[len(audio) // 3 :]]
    rng = np.random.default_rng(rate)
    plans = [_pieces(len(p), rng, 1, rate // 2) for p in parts]

    async def main():
        quiet = dict(QUIET, vad=monosemantic.VADConfig()) if vad else QUIET
        config = EngineConfig(max_buffered_seconds=1.0, **quiet)
        async with Engine(model, config) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=rate)
            cancelled = 0
            for part, plan in zip(parts, plans):
                for a, b in plan:
                    try:
                        await asyncio.wait_for(stream.push(part[a:b]), float(rng.uniform(0.0005, 0.02)))
                    except asyncio.TimeoutError:
                        cancelled += 1
                        # Its own audio was accepted (cancelled while writing it): write the rest now, so
                        # that no later push is cancelled before it takes its own (a separate test).
                        await stream.push(part[:0])
                while True:
                    try:
                        await asyncio.wait_for(stream.flush(), float(rng.uniform(0.0005, 0.02)))
                        break
                    except asyncio.TimeoutError:
                        cancelled += 1
            finals = [await final_of(stream), await final_of(stream)]
            await stream.close()
            return finals, cancelled

    finals, cancelled = asyncio.run(main())
    assert cancelled > 0
    reference = model.new_stream(latency_ms=160, sample_rate=rate)
    start = 0
    for final, part, plan in zip(finals, parts, plans):
        counter = StreamResampler(rate, 16000)
        n = sum(len(counter.push(part[a:b])) for a, b in plan) + len(counter.flush())
        for a, b in plan:
            reference.feed(part[a:b])
        expected = reference.finalize()
        assert (final.start, final.end) == (start, start + n)
        assert [t.id for t in final.tokens] == expected.token_ids
        start += n


def test_a_push_cancelled_behind_an_earlier_cancelled_push_loses_no_audio(ms_model, audio_clips, monkeypatch):
    """Two pushes, each cancelled by asyncio.wait_for while the engine has no room: the caller sees the
    same TimeoutError for both and has no `accepted` flag to tell them apart, so neither's audio may be
    lost. The second is cancelled while still writing the first one's rest, before it took its own
    audio; it takes it then (it used to vanish from the Final)."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    first, second = audio[:32000], audio[32000:48000]

    async def main():
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            write = engine.core.write
            monkeypatch.setattr(engine.core, "write", lambda handle, samples: 0)  # a full buffer
            for pcm in (first, second):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(stream.push(pcm), 0.2)
            monkeypatch.setattr(engine.core, "write", write)
            await stream.flush()
            return await final_of(stream)

    final = asyncio.run(main())
    assert final.end == len(first) + len(second), "a cancelled push's audio was silently dropped"


def test_pushes_cancelled_over_and_over_end_the_stream_instead_of_piling_up(ms_model, audio_clips, monkeypatch):
    """Each push cancelled while an earlier push's audio waits for room takes its audio behind it; past a
    whole buffer of such audio the stream ends with Error('overloaded') (memory stays bounded, and
    nothing is dropped in silence), and the next push says the stream is closed."""
    model = ms_model("nemotron_rnnt")
    half = audio_clips["jfk.wav"][:8000]

    async def main():
        async with Engine(model, EngineConfig(max_buffered_seconds=1.0, **QUIET)) as engine:
            stream = await engine.open_stream(latency_ms=160)
            # A full buffer: no room, though a closed stream is still refused, as core.write does.
            monkeypatch.setattr(engine.core, "write", lambda handle, samples: engine.core.check_open(handle) or 0)
            cancelled = 0
            while True:
                try:
                    await asyncio.wait_for(stream.push(half), 0.02)
                except asyncio.TimeoutError:
                    cancelled += 1
                    assert cancelled < 100 and stream._pending.size <= engine.core.capacity + len(half)
                    continue
                except monosemantic.StreamError as exc:
                    refused = exc
                    break
            events = [event async for event in stream]
            return cancelled, refused, events, engine.core.capacity

    cancelled, refused, events, capacity = asyncio.run(main())
    assert cancelled == capacity // 8000 + 1  # every cancelled push took its audio until it was too much
    assert "closed" in str(refused)
    assert [(e.code, "overloaded" in e.message) for e in events if isinstance(e, monosemantic.Error)] == [("overloaded", True)]


def test_an_engine_does_not_keep_the_event_loops_that_used_it(ms_model):
    """A shared engine outlives the event loops that use it (one asyncio.run per session, say). Its
    mailboxes are kept in a WeakKeyDictionary keyed by loop, and a mailbox holds its loop weakly: a
    strong reference kept every loop that ever opened a stream alive while the engine lived."""
    import gc
    import weakref

    model = ms_model("nemotron_rnnt")
    engine = Engine(model, EngineConfig(**QUIET))
    loops = []

    async def session():
        loops.append(weakref.ref(asyncio.get_running_loop()))
        stream = await engine.open_stream(latency_ms=160)
        await stream.close()

    try:
        for _ in range(3):
            asyncio.run(session())
        gc.collect()
        assert [loop() for loop in loops] == [None, None, None], "closed event loops are kept alive"
        assert len(engine._mailboxes) == 0
    finally:
        engine.core.stop()


def test_callers_buffers_changed_after_a_push_do_not_change_the_audio(ms_model, audio_clips):
    """Torch tensors and float memoryviews of a bytearray are read without a copy; the pushes held
    for coalescing must still own their audio when the caller changes its buffer afterwards."""
    import torch

    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"][:48000]
    expected = model.transcribe(audio, latency_ms=160).token_ids

    async def main():
        finals = []
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            for pcm in (torch.from_numpy(audio.copy()), memoryview(bytearray(audio.tobytes())).cast("f")):
                stream = await engine.open_stream(latency_ms=160)
                for a in range(0, len(audio), 333):
                    await stream.push(pcm[a : a + 333])
                if isinstance(pcm, memoryview):
                    pcm.obj[:] = bytes(len(pcm.obj))
                else:
                    pcm.zero_()
                await stream.flush()
                finals.append(await final_of(stream))
                await stream.close()
        return finals

    for final in asyncio.run(main()):
        assert final.end == len(audio) and [t.id for t in final.tokens] == expected


def test_aclose_while_pushes_and_a_flush_wait_for_room_ends_them_with_stream_errors(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = np.tile(audio_clips["jfk.wav"], 3)

    async def main():
        engine = Engine(model, EngineConfig(max_buffered_seconds=1.0, **QUIET))
        one = await engine.open_stream(latency_ms=160)
        two = await engine.open_stream(latency_ms=160, sample_rate=48000)
        calls = [asyncio.create_task(one.push(audio)), asyncio.create_task(two.push(resample(audio, 16000, 48000))),
                 asyncio.create_task(two.flush())]
        await asyncio.sleep(0.3)
        assert not any(call.done() for call in calls)
        await asyncio.wait_for(engine.aclose(), 10)
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

        async def events(stream):
            return [event async for event in stream]

        ends = await asyncio.wait_for(asyncio.gather(events(one), events(two)), 5)
        return results, ends

    results, ends = asyncio.run(main())
    assert all(isinstance(r, monosemantic.StreamError) for r in results), results
    assert all(isinstance(e[-1], monosemantic.Error) and e[-1].code == "closed" for e in ends)


def test_sync_stream_closed_while_threads_push_flush_and_read(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = resample(np.tile(audio_clips["jfk.wav"], 3), 16000, 44100)
    outcomes = []
    with SyncEngine(model, EngineConfig(max_buffered_seconds=1.0, max_streams=2, **QUIET)) as engine:
        stream = engine.open_stream(latency_ms=160, sample_rate=44100)

        def guarded(work):
            try:
                work()
            except monosemantic.StreamError:
                outcomes.append("closed")
            except Exception as e:  # anything else is a failure
                outcomes.append(e)

        def push(offset):
            for i in range(offset, len(audio), 4 * 4410):
                stream.push(audio[i : i + 4410])

        def flush():
            for _ in range(5):
                stream.flush()
                time.sleep(0.05)

        def read():
            while stream.get(timeout=20) is not None:
                pass
            outcomes.append("end")

        threads = [threading.Thread(target=guarded, args=(lambda k=k: push(k * 4410),)) for k in range(4)]
        threads += [threading.Thread(target=guarded, args=(flush,))]
        threads += [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        stream.close()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
        engine.open_stream(), engine.open_stream()  # both slots free
    assert all(o in ("closed", "end") for o in outcomes), outcomes
    assert outcomes.count("end") == 2


@pytest.mark.parametrize("front", ["async", "sync"])
def test_a_flush_that_timed_out_leaves_the_pushes_step_points_where_they_were(ms_model, audio_clips, monkeypatch, front):
    """A flush whose audio could not be written in time did not end the utterance, so the pushes after
    it (before the flush is made again, as the error asks) belong to the same utterance; the coalescer
    had already moved its step points to the flush's end, and held those pushes to the wrong points."""
    from monosemantic import PushTimeoutError

    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    config = EngineConfig(push_timeout_seconds=0.2, coalesce_pushes=True, **QUIET)
    # 20 ms pushes: the coalescer holds those after the last step point, so the flush has audio to write.
    first, rest = audio[: 16000 + 320], audio[16000 + 320 :]

    def state(stream):
        return stream._coalescer.utterance_start, stream._coalescer.next_point

    def full_buffer(core):
        write = core.write
        monkeypatch.setattr(core, "write", lambda handle, samples: 0)
        return lambda: monkeypatch.setattr(core, "write", write)

    if front == "async":

        async def main():
            async with Engine(model, config) as engine:
                stream = await engine.open_stream(latency_ms=160)
                for i in range(0, len(first), 320):
                    await stream.push(first[i : i + 320])
                before, restore = state(stream), full_buffer(engine.core)
                with pytest.raises(PushTimeoutError):
                    await stream.flush()
                restore()
                after = state(stream)
                for i in range(0, len(rest), 320):
                    await stream.push(rest[i : i + 320])
                await stream.flush()
                return before, after, await final_of(stream)

        before, after, final = asyncio.run(main())
    else:
        with SyncEngine(model, config) as engine:
            stream = engine.open_stream(latency_ms=160)
            for i in range(0, len(first), 320):
                stream.push(first[i : i + 320])
            before, restore = state(stream), full_buffer(engine.core)
            with pytest.raises(PushTimeoutError):
                stream.flush()
            restore()
            after = state(stream)
            for i in range(0, len(rest), 320):
                stream.push(rest[i : i + 320])
            stream.flush()
            final = next(e for e in iter(lambda: stream.get(timeout=30), None) if isinstance(e, Final))
    assert after == before
    assert final.end == len(audio)
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


@pytest.mark.parametrize("front", ["async", "sync"])
def test_a_flush_that_timed_out_at_48k_leaves_the_utterance_resampled_as_one_signal(ms_model, audio_clips, monkeypatch, front):
    """A flush that times out waiting for room for the resampler's tail has not flushed the resampler:
    the pushes before the retried flush go on where the utterance's signal was (they used to start a
    fresh resampler's signal after the first tail), so the engine gets exactly the audio, and the tokens,
    of the same pushes with one successful flush."""
    from monosemantic import PushTimeoutError
    from monosemantic.audio import StreamResampler

    model = ms_model("nemotron_rnnt")
    audio48 = resample(audio_clips["jfk.wav"], 16000, 48000)
    # Small pieces while the buffer fills (its room ends below the tail), 20 ms ones after.
    pieces = [audio48[i : i + 96] for i in range(0, 72000, 96)]
    pieces += [audio48[i : i + 960] for i in range(72000, len(audio48), 960)]
    config = EngineConfig(max_buffered_seconds=1.0, push_timeout_seconds=0.2, coalesce_pushes=False, **QUIET)
    busy = threading.Event()
    written = []

    def hold(core):
        """The engine is busy (its step waits for `busy`); the runner's writes are recorded."""
        step, write = core.runner.step, core.runner.write
        monkeypatch.setattr(core.runner, "step", lambda batch: busy.wait() and step(batch))
        monkeypatch.setattr(core.runner, "write", lambda slot, at, samples: (written.append(samples.copy()), write(slot, at, samples))[1])

    def fill(core, stream):
        """How many pieces fill the buffer to less room than the resampler's tail, no push waiting."""
        record, counter = core.scheduler.streams[stream.handle], StreamResampler(48000, 16000)
        room = core.capacity - core.scheduler.buffered(record)  # shrinks only by writes: nothing is processed
        for k, piece in enumerate(pieces):
            tail = round(counter._stream.delay())  # what a flush before this piece would give
            made = len(counter.push(piece))
            if made > room:
                assert room < tail, (room, tail)
                return k
            room -= made
        raise AssertionError("the buffer never filled")

    if front == "async":

        async def main():
            async with Engine(model, config) as engine:
                hold(engine.core)
                try:
                    stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
                    full = fill(engine.core, stream)
                    for piece in pieces[:full]:
                        await stream.push(piece)
                    with pytest.raises(PushTimeoutError):
                        await stream.flush()
                finally:
                    busy.set()
                for piece in pieces[full:]:
                    await stream.push(piece)
                await stream.flush()
                return await final_of(stream)

        final = asyncio.run(main())
    else:
        with SyncEngine(model, config) as engine:
            hold(engine.core)
            try:
                stream = engine.open_stream(latency_ms=160, sample_rate=48000)
                full = fill(engine.core, stream)
                for piece in pieces[:full]:
                    stream.push(piece)
                with pytest.raises(PushTimeoutError):
                    stream.flush()
            finally:
                busy.set()
            for piece in pieces[full:]:
                stream.push(piece)
            stream.flush()
            final = next(e for e in iter(lambda: stream.get(timeout=30), None) if isinstance(e, Final))
    reference, continuous = model.new_stream(latency_ms=160, sample_rate=48000), StreamResampler(48000, 16000)
    for piece in pieces:
        reference.feed(piece)
    expected = np.concatenate([continuous.push(piece) for piece in pieces] + [continuous.flush()])
    assert np.array_equal(np.concatenate(written), expected)
    assert final.end == len(expected)
    assert [t.id for t in final.tokens] == reference.finalize().token_ids
