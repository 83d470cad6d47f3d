"""Lifecycle and concurrency of the engine: a failure outside a tick's guarded calls, a
forked child's inherited streams whose locks were held at the fork, the shared registry closed while an
engine loads."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

import monosemantic
from monosemantic import Engine, EngineConfig, StreamError

from _support.events import final_of

QUIET = dict(vad=None, freeze_gc=False, keep_freed_memory=False)


@pytest.mark.timeout(120)
def test_a_failure_while_planning_ends_the_streams_instead_of_the_loop_thread(ms_model, audio_clips, monkeypatch):
    """Planning ran outside the tick's guard: a bug there (here simulated once) ended the loop thread,
    and every stream then waited forever (its events never ended, no Final came, while new streams were
    still admitted). Now the open streams end with Error('internal') and the engine serves new ones."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]

    async def main():
        async with Engine(model, EngineConfig(**QUIET)) as engine:
            scheduler = engine.core.scheduler
            real_plan, failed = scheduler.plan, []

            def failing_once():
                if not failed and any(r.written for r in scheduler.streams.values()):
                    failed.append(True)
                    raise RuntimeError("planning bug (simulated)")
                return real_plan()

            monkeypatch.setattr(scheduler, "plan", failing_once)
            doomed = await engine.open_stream(latency_ms=160)
            try:
                await doomed.push(audio[:16000])
            except StreamError:  # the engine may close it while the push still writes
                pass

            async def read():
                return [event async for event in doomed]

            events = await asyncio.wait_for(read(), 30)  # TimeoutError: the stream never ended
            fresh = await engine.open_stream(latency_ms=160)
            await fresh.push(audio)
            await fresh.flush()
            final = await asyncio.wait_for(final_of(fresh), 60)
            return failed, events, final

    failed, events, final = asyncio.run(main())
    assert failed
    errors = [e for e in events if isinstance(e, monosemantic.Error)]
    assert [e.code for e in errors] == ["internal"] and "planning bug" in errors[0].message
    assert [t.id for t in final.tokens] == model.transcribe(audio, latency_ms=160).token_ids


@pytest.mark.timeout(300)
def test_a_child_forked_while_a_sync_push_waited_gets_errors_not_a_hang(nemo_checkpoint):
    """A fork copies a SyncStream's lock as it was: held, when another thread of the parent was inside a
    throttled push. The child's push and flush of that stream took the lock before checking for the
    fork, and waited forever; they must raise the fork's StreamError, as get() does."""
    code = f"""
import faulthandler, os, threading, time
import numpy as np
import monosemantic
from monosemantic import EngineConfig, StreamError
model = monosemantic.load_model({str(nemo_checkpoint("nemotron_rnnt"))!r}, device="cpu")
engine = monosemantic.SyncEngine(model, EngineConfig(vad=None, max_buffered_seconds=1.0))
stream = engine.open_stream(latency_ms=160)
engine.core.write = lambda handle, samples: 0  # a full buffer: the push below waits, holding the stream's lock

def push():
    try:
        stream.push(np.zeros(16000, np.float32))
    except StreamError:
        pass

pusher = threading.Thread(target=push, daemon=True)
pusher.start()
while not stream._lock.locked():
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(30, exit=True)  # a hang fails the child, with its traceback
    for name, call in (("push", lambda: stream.push(np.zeros(320, np.float32))), ("flush", stream.flush)):
        try:
            call()
            print("child: no error from", name, flush=True)
        except StreamError as e:
            print("child:", name, "forked" in str(e), flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
del engine.core.write
engine.close()
pusher.join(30)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert "child: push True" in done.stdout and "child: flush True" in done.stdout, out
    assert "child exit 0" in done.stdout, out


@pytest.mark.timeout(120)
def test_closing_the_shared_engines_while_one_loads_does_not_load_it_twice(ms_model, monkeypatch):
    """close_shared_engines() forgot the per-key locks while a first get_engine still loaded under its
    own: a get_engine for the same key then loaded the model a second time beside it, and one of the two
    engines was left out of the registry (running, never stopped by close_shared_engines)."""
    from monosemantic.engine import shared

    model = ms_model("nemotron_rnnt")
    loading, release, loads = threading.Event(), threading.Event(), []

    def slow_load(source, device=None, dtype=None):
        loads.append(source)
        if len(loads) == 1:
            loading.set()
            release.wait(30)
        return model

    monkeypatch.setattr(shared, "load_model", slow_load)
    config = EngineConfig(**QUIET)
    shared.close_shared_engines()
    got = []

    def get():
        got.append(shared.get_engine("a-model-being-loaded", device="cpu", config=config))

    first = threading.Thread(target=get)
    first.start()
    try:
        assert loading.wait(30)
        shared.close_shared_engines()  # a test's teardown, or a component shutting down, meanwhile
        second = threading.Thread(target=get)
        second.start()
        second.join(2)  # it loads its own model now (the bug), or waits for the first load
        release.set()
        first.join(60)
        second.join(60)
        assert len(got) == 2
        assert len(loads) == 1, "the model was loaded twice"
        assert got[0] is got[1]
    finally:
        release.set()
        shared.close_shared_engines()
        for engine in got:
            engine.core.stop()


@pytest.mark.timeout(120)
def test_a_closed_shared_engine_is_let_go_before_its_replacement_allocates(ms_model, monkeypatch):
    """get_engine replaced a shared engine one of its users had closed while still holding it (in the
    registry and its own frame): the closed engine's slots (max_streams sized to the memory, say) still
    counted as taken in the new engine's memory check, and the replacement failed with CapacityError.
    Here the memory check sees no room while the closed engine's runner is still alive."""
    import gc
    import weakref

    from monosemantic.engine import runner as runner_module
    from monosemantic.engine import shared

    model = ms_model("nemotron_rnnt")
    monkeypatch.setattr(shared, "load_model", lambda *args, **kwargs: model)
    config = EngineConfig(**QUIET)
    shared.close_shared_engines()
    try:
        first = shared.get_engine("a-model-closed-by-a-user", device="cpu", config=config)
        first.core.stop()  # one user's `async with await aget_engine(...)` ended
        old = weakref.ref(first.core.runner)
        del first  # nobody else holds it
        real = runner_module.available_host_memory

        def available():
            gc.collect()
            return 0 if old() is not None else real()

        monkeypatch.setattr(runner_module, "available_host_memory", available)
        second = shared.get_engine("a-model-closed-by-a-user", device="cpu", config=config)
        assert not second.core.shut_down and second.model is model
    finally:
        shared.close_shared_engines()


@pytest.mark.timeout(120)
def test_a_closed_engine_lets_go_of_its_slot_state_while_still_referenced(ms_model, monkeypatch):
    """close_shared_engines() left a stopped engine's slot state (audio rings, encoder caches, decoder and
    VAD state: max_streams of each) to the engine object, freed only once nothing referred to it: with a
    user's variable still holding the engine, a new engine for the same model needed the memory twice.
    The stopped engine's streams and calls still fail with StreamError, not on a freed buffer."""
    import gc
    import weakref

    from monosemantic.engine import runner as runner_module
    from monosemantic.engine import shared

    model = ms_model("nemotron_rnnt")
    monkeypatch.setattr(shared, "load_model", lambda *args, **kwargs: model)
    config = EngineConfig(**{**QUIET, "vad": monosemantic.VADConfig()})
    shared.close_shared_engines()

    async def main():
        first = await shared.aget_engine("a-model-closed-while-held", device="cpu", config=config)
        stream = await first.open_stream()
        await stream.push(np.zeros(1600, np.float32))
        runner = first.core.runner
        state = [runner.ring, runner.cache.keys[0], runner.decoder.h, runner.vad_state.h]
        held = [weakref.ref(buffer) for buffer in state]
        del state, runner
        shared.close_shared_engines()
        events = [event async for event in stream]
        assert events[-1].code == "closed"
        gc.collect()
        assert [ref() is None for ref in held] == [True] * len(held)  # while `first` and `stream` are still held
        real = runner_module.available_host_memory

        def available():
            gc.collect()
            return 0 if any(ref() is not None for ref in held) else real()

        monkeypatch.setattr(runner_module, "available_host_memory", available)
        second = await shared.aget_engine("a-model-closed-while-held", device="cpu", config=config)
        assert second is not first and not second.core.shut_down
        with pytest.raises(StreamError):
            await stream.push(np.zeros(1600, np.float32))
        with pytest.raises(StreamError):
            await stream.flush()
        with pytest.raises(StreamError):
            await first.open_stream()
        await stream.close()
        await first.aclose()  # closing it again is harmless

    try:
        asyncio.run(main())
    finally:
        shared.close_shared_engines()


def _autograd_nodes(*tensors) -> int:
    """Autograd graph nodes reachable from these tensors (0 for tensors that record no graph)."""
    seen, stack = set(), [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.timeout(120)
def test_the_decoder_state_holds_no_autograd_graph_growing_with_every_utterance(ms_model):
    """The loaded model's parameters required gradients, so the fresh decoder state (one prediction step
    on them) carried an autograd graph, and every utterance's reset (outside no_grad) chained another
    index_copy onto the slots' state: a graph, and the fresh states it kept, growing for the engine's
    life (on a GPU, in device memory) with every utterance served."""
    model = ms_model("nemotron_rnnt")
    silence = np.zeros(8000, dtype=np.float32)

    async def utterances(engine, n):
        for _ in range(n):
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(silence)
            await stream.flush()
            await asyncio.wait_for(final_of(stream), 30)
            await stream.close()
        await asyncio.sleep(0.1)  # the last reset runs before the loop's next plan

    async def main():
        async with Engine(model, EngineConfig(max_streams=2, **QUIET)) as engine:
            state = engine.core.runner.decoder
            tensors = lambda: (state.h, state.c, state.pred_out)
            await utterances(engine, 3)
            few = _autograd_nodes(*tensors())
            await utterances(engine, 20)
            return few, _autograd_nodes(*tensors()), [t.requires_grad for t in tensors()]

    few, many, requires_grad = asyncio.run(main())
    assert many == few, f"{few} autograd nodes after 3 utterances, {many} after 23"
    assert requires_grad == [False, False, False]
