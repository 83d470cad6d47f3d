"""The process-wide engine registry the adapters use: one engine per model, device, dtype and config."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import monosemantic
from monosemantic import EngineConfig, Final

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def registry():
    monosemantic.close_shared_engines()
    yield
    monosemantic.close_shared_engines()


def test_same_key_shares_one_engine_and_loads_once(registry, nemo_checkpoint):
    path = nemo_checkpoint("nemotron_rnnt")
    config = EngineConfig(max_streams=4, vad=None)
    engines = []

    def get(source):
        engines.append(monosemantic.get_engine(source, device="cpu", config=config))

    # the same file, spelled two ways, from several threads at once
    spellings = [str(path), os.path.relpath(path)] * 3
    threads = [threading.Thread(target=get, args=(s,)) for s in spellings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in engines}) == 1
    assert len(monosemantic.engine.shared.shared_engines()) == 1

    other = monosemantic.get_engine(path, device="cpu", config=EngineConfig(max_streams=8, vad=None))
    assert other is not engines[0]  # a different configuration is a different engine


def test_engines_of_one_model_with_different_configs_share_the_loaded_model(registry, nemo_checkpoint, audio_clips, monkeypatch):
    """Each EngineConfig of one checkpoint, device and dtype loaded the checkpoint again (its seconds, and
    the weights' memory once per configuration). The runner only reads the model, so one loaded model
    backs both engines, and both serve streams at the same time as the model transcribes alone."""
    shared = monosemantic.engine.shared
    path = nemo_checkpoint("nemotron_rnnt")
    real_load, loads = shared.load_model, []
    monkeypatch.setattr(shared, "load_model", lambda *args, **kwargs: loads.append(args) or real_load(*args, **kwargs))
    small = monosemantic.get_engine(path, device="cpu", config=EngineConfig(max_streams=2, vad=None))
    large = monosemantic.get_engine(path, device="cpu", config=EngineConfig(max_streams=4, max_batch=2, vad=None))
    assert large is not small and large.model is small.model and len(loads) == 1
    audio = next(iter(audio_clips.values()))
    expected = small.model.transcribe(audio, latency_ms=160).text

    async def one(engine):
        stream = await engine.open_stream(latency_ms=160)
        await stream.push(audio)
        await stream.flush()
        async for event in stream:
            if isinstance(event, Final):
                await stream.close()
                return event.text

    async def main():
        return await asyncio.gather(one(small), one(large), one(small), one(large))

    assert asyncio.run(main()) == [expected] * 4


def test_shared_engine_serves_streams_from_different_event_loops(registry, nemo_checkpoint, ms_model, audio_clips):
    """Each adapter may run its own event loop (a thread per bot): one engine serves them all."""
    path = nemo_checkpoint("nemotron_rnnt")
    audio = next(iter(audio_clips.values()))
    expected = ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160).text
    results = []

    def run_in_own_loop():
        async def main():
            engine = await monosemantic.aget_engine(path, device="cpu", config=EngineConfig(vad=None))
            stream = await engine.open_stream(latency_ms=160)
            await stream.push(audio)
            await stream.flush()
            async for event in stream:
                if isinstance(event, Final):
                    results.append(event.text)
                    break
            await stream.close()

        asyncio.run(main())

    threads = [threading.Thread(target=run_in_own_loop) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_close_shared_engines_ends_open_streams(registry, nemo_checkpoint):
    async def main():
        engine = await monosemantic.aget_engine(nemo_checkpoint("nemotron_rnnt"), device="cpu")
        stream = await engine.open_stream()
        monosemantic.close_shared_engines()
        events = [event async for event in stream]
        assert [type(e).__name__ for e in events] == ["Error"] and events[0].code == "closed"
        assert monosemantic.engine.shared.shared_engines() == {}

    asyncio.run(main())


def test_bad_model_path_is_a_clear_error_and_not_cached(registry, tmp_path):
    with pytest.raises(monosemantic.ModelLoadError):
        monosemantic.get_engine(tmp_path / "missing.nemo", device="cpu")
    assert monosemantic.engine.shared.shared_engines() == {}


def test_a_shared_engine_closed_by_one_user_is_replaced_on_the_same_model(registry, nemo_checkpoint, monkeypatch):
    """`async with await aget_engine(...)` closes the shared engine at its end: the registry used to keep
    handing out the closed engine, and every later stream of the process was refused."""
    path = nemo_checkpoint("nemotron_rnnt")
    config = EngineConfig(max_streams=2, vad=None)

    async def main():
        first = await monosemantic.aget_engine(path, device="cpu", config=config)
        async with first:
            pass
        loads = []
        monkeypatch.setattr(monosemantic.engine.shared, "load_model", lambda *a, **k: loads.append(a))
        second = await monosemantic.aget_engine(path, device="cpu", config=config)
        assert second is not first and second.model is first.model and loads == []
        assert monosemantic.get_engine(path, device="cpu", config=config) is second
        stream = await second.open_stream()
        await stream.close()

    asyncio.run(main())


def test_spellings_of_one_device_and_dtype_share_one_engine(registry, nemo_checkpoint, monkeypatch):
    """The key held the device and dtype as spelled: 'auto' and 'cpu' on a machine without CUDA (an
    adapter's default and a user's explicit device), or 'float32' and torch.float32, loaded the model
    again and served it from a second engine, with its own slots and batches."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = nemo_checkpoint("nemotron_rnnt")
    config = EngineConfig(max_streams=2, vad=None)
    first = monosemantic.get_engine(path, device="auto", dtype="auto", config=config)
    for device in ("cpu", torch.device("cpu")):
        for dtype in ("float32", "fp32", torch.float32):
            assert monosemantic.get_engine(path, device=device, dtype=dtype, config=config) is first
    assert monosemantic.get_engine(path, device="cpu", config=EngineConfig(max_streams=2, vad=None)) is first
    assert len(monosemantic.engine.shared.shared_engines()) == 1


def test_a_bad_device_or_dtype_is_a_clear_error_and_not_cached(registry, nemo_checkpoint):
    path = nemo_checkpoint("nemotron_rnnt")
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        monosemantic.get_engine(path, device="gpu")
    with pytest.raises(ValueError, match="invalid dtype 'float64'"):
        monosemantic.get_engine(path, device="cpu", dtype="float64")
    assert monosemantic.engine.shared.shared_engines() == {}


@pytest.mark.parametrize("config", [{"max_streams": 4}, "max_streams=4", 4])
def test_a_config_that_is_not_an_engine_config_is_refused_before_loading(registry, nemo_checkpoint, monkeypatch, config):
    """A dict was an 'unhashable type' TypeError from the registry's dict; a str or int loaded the model
    (seconds, a 0.6b checkpoint) and then failed with "'str' object has no attribute 'vad'"."""
    path = nemo_checkpoint("nemotron_rnnt")
    loads = []
    monkeypatch.setattr(monosemantic.engine.shared, "load_model", lambda *a, **k: loads.append(a))
    with pytest.raises(TypeError, match="config must be a monosemantic.EngineConfig or None, got"):
        monosemantic.get_engine(path, device="cpu", config=config)
    assert loads == [] and monosemantic.engine.shared.shared_engines() == {}


def test_a_slow_load_holds_up_only_its_own_key_and_a_failed_load_is_retried(registry, nemo_checkpoint, monkeypatch):
    """While one model loads (seconds), another model's engine is served; a load that fails (a bad or
    half-copied checkpoint) is not remembered: the next call for the key loads again. (Another
    configuration of the same model waits for that load: it is served from the same loaded model.)"""
    path, other_path = nemo_checkpoint("nemotron_rnnt"), nemo_checkpoint("nemotron_tdt")
    shared = monosemantic.engine.shared
    real_load = shared.load_model
    release, entered, calls = threading.Event(), threading.Event(), []

    def load(source, **kwargs):
        calls.append(source)
        if len(calls) == 1:  # the first load of the slow key waits, then fails
            entered.set()
            assert release.wait(60)
            raise monosemantic.ModelLoadError("a half-copied checkpoint")
        return real_load(source, **kwargs)

    monkeypatch.setattr(shared, "load_model", load)
    slow, fast = EngineConfig(max_streams=2, vad=None), EngineConfig(max_streams=3, vad=None)
    errors = []

    def first():
        try:
            shared.get_engine(path, device="cpu", config=slow)
        except monosemantic.ModelLoadError as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(60)
    other = shared.get_engine(other_path, device="cpu", config=fast)  # not held up by the slow key's load
    release.set()
    thread.join()
    assert len(errors) == 1 and list(shared.shared_engines().values()) == [other]
    engine = shared.get_engine(path, device="cpu", config=slow)
    assert engine is not other and len(calls) == 3 and len(shared.shared_engines()) == 2


def test_a_path_under_the_home_directory_is_one_engine_however_spelled(registry, nemo_checkpoint, monkeypatch):
    """load_model expands '~', the key did not: '~/model.nemo' and the same file's absolute path loaded
    the model twice, into two engines."""
    path = nemo_checkpoint("nemotron_rnnt")
    monkeypatch.setenv("HOME", str(path.parent))
    config = EngineConfig(max_streams=2, vad=None)
    engine = monosemantic.get_engine(f"~/{path.name}", device="cpu", config=config)
    assert monosemantic.get_engine(path, device="cpu", config=config) is engine
    assert len(monosemantic.engine.shared.shared_engines()) == 1


def test_plain_cuda_auto_and_the_current_gpu_are_one_key(nemo_checkpoint, monkeypatch):
    """load_model(device='cuda') places the model on the current GPU: 'auto', 'cuda' and 'cuda:0' (the
    current one) are one engine; another GPU is another."""
    import torch

    from monosemantic.engine.shared import _key as key

    path = nemo_checkpoint("nemotron_rnnt")  # built before CUDA is faked: NeMo looks for the driver
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    keys = {key(path, device, "auto", None) for device in ("auto", "cuda", "cuda:0", torch.device("cuda", 0))}
    assert len(keys) == 1 and next(iter(keys)).device == "cuda:0"
    assert key(path, "cuda:1", "auto", None) not in keys


def test_close_shared_engines_stops_every_engine_when_one_stop_fails(registry, nemo_checkpoint, monkeypatch, caplog):
    """The engines were stopped one after the other and the first stop() that raised ended the call: the
    ones after it kept running, already out of the registry, until the interpreter's exit."""
    from monosemantic.engine.core import EngineCore

    first = monosemantic.get_engine(nemo_checkpoint("nemotron_rnnt"), device="cpu", config=EngineConfig(max_streams=1))
    second = monosemantic.get_engine(nemo_checkpoint("nemotron_rnnt"), device="cpu", config=EngineConfig(max_streams=2))
    stop = EngineCore.stop

    def failing_once(core):
        stop(core)
        if core is first.core:
            raise RuntimeError("a stop that failed")

    monkeypatch.setattr(EngineCore, "stop", failing_once)
    monosemantic.close_shared_engines()
    assert first.core._stopping and second.core._stopping
    assert any("a stop that failed" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


@pytest.mark.parametrize("config", [{"vad": None}, "EngineConfig()", 3])
def test_an_engine_config_of_the_wrong_type_is_a_clear_error(ms_model, config):
    """Engine(model, {...}) failed with an AttributeError about `vad` deep in the engine."""
    with pytest.raises(TypeError, match="config must be a monosemantic.EngineConfig"):
        monosemantic.Engine(ms_model("nemotron_rnnt"), config)
    with pytest.raises(TypeError, match="config must be a monosemantic.EngineConfig"):
        monosemantic.SyncEngine(ms_model("nemotron_rnnt"), config)
