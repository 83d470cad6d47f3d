"""One engine per (model, device, dtype, config) per process, shared by every adapter instance.

The LiveKit and Pipecat adapters create an STT object per agent session; batching only pays off when all
of a process's sessions land in the same engine, and loading a 0.6b checkpoint per session would take
seconds each time. So adapters never build an Engine themselves: they ask this registry, which loads the
model once (in the caller's thread, or a worker thread for `aget_engine`) and keeps the engine for the
life of the process. `close_shared_engines()` frees them (tests, or a process that wants its GPU back);
it also runs at interpreter exit. A shared engine that one of its users closed is replaced by a new one
(on the same loaded model) at the next `get_engine` for its key; that user's streams had ended with it.
So is one inherited by a forked child (multiprocessing's default on Linux before Python 3.14): the
engine's loop thread runs only in the parent.

Engines of one checkpoint, device and dtype with different EngineConfigs share one loaded model. That
is safe because an engine only reads its model: the runner keeps every stream's state in tensors of its
own, casts no weights (load_model sets the encoder's dtype once), changes none in place, and its CUDA
graphs, captured per engine into a memory pool of its own with thread-local capture checks, read the
weights another engine's thread may be reading at the same time. The latency modes' plans are built
from the model and cached on it, and are only read as well.

    engine = await monosemantic.aget_engine("nvidia/nemotron-speech-streaming-en-0.6b", device="auto")
    stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from dataclasses import dataclass

from ..asr import DEFAULT_MODEL, ASRModel, load_model, resolve_device, resolve_dtype
from .config import EngineConfig
from .frontdoor import Engine, engine_config

_log = logging.getLogger("monosemantic.engine")


@dataclass(frozen=True)
class EngineKey:
    """What makes two requests share an engine: the same checkpoint on the same device at the same
    precision, served with the same engine configuration."""

    model: str
    device: str
    dtype: str
    config: EngineConfig


_engines: dict[EngineKey, Engine] = {}
_registry_lock = threading.Lock()
_key_locks: dict[EngineKey, threading.Lock] = {}
# The models the registry's engines run, by (model, device, dtype): weak, so a model is held by the
# engines that use it and no longer.
_models: weakref.WeakValueDictionary[tuple[str, str, str], ASRModel] = weakref.WeakValueDictionary()
_model_locks: dict[tuple[str, str, str], threading.Lock] = {}


def _key(model, device, dtype, config) -> EngineKey:
    # Checked first, as Engine checks it: a dict is unhashable in the registry, and anything else would
    # fail only once the model had loaded (seconds).
    config = engine_config(config)
    source = os.fspath(model)
    local = os.path.expanduser(source)  # as load_model reads it
    if os.path.exists(local):  # the same file reached by two spellings is one engine
        source = os.path.realpath(local)
    # The device and precision as loaded, not as spelled: 'auto' and 'cpu' on a machine without CUDA, or
    # 'fp32' and torch.float32, would otherwise load the model again into a second engine. Plain 'cuda'
    # is the current GPU, as the model's placement is. A bad spelling is a ValueError here, before a load.
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        import torch

        dev = torch.device("cuda", torch.cuda.current_device())
    return EngineKey(source, str(dev), str(resolve_dtype(dtype)).removeprefix("torch."), config)


def get_engine(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    config: EngineConfig | None = None,
) -> Engine:
    """The process's engine for this model, loading it on first use (blocking; see `aget_engine`).
    Concurrent first calls for the same key load the model once; calls for other keys are not held up."""
    key = _key(model, device, dtype, config)
    with _registry_lock:
        engine = _engines.get(key)
        if engine is not None and not engine.core.shut_down:
            return engine
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _registry_lock:
            engine = _engines.get(key)
        if engine is None or engine.core.shut_down:
            # A shared engine closed by one of its users (`aclose()`, `async with`) would refuse every
            # later stream of the process: it is replaced, on the model already loaded.
            if engine is None:
                model_ = _shared_model(key)
            else:
                model_ = engine.model
                # Let go of the closed engine before its replacement allocates: its slots (max_streams may
                # be sized to the memory) would still count as taken in the new engine's memory check.
                with _registry_lock:
                    if _engines.get(key) is engine:
                        del _engines[key]
                engine = None
            engine = Engine(model_, key.config)
            engine.core.start()
            with _registry_lock:
                _engines[key] = engine
    return engine


def _shared_model(key: EngineKey) -> ASRModel:
    """The model of the key's checkpoint, device and dtype, loaded once for every configuration served
    from it. Loads of other models are not held up; a failed load is not remembered."""
    which = (key.model, key.device, key.dtype)
    with _registry_lock:
        lock = _model_locks.setdefault(which, threading.Lock())
    with lock:
        model = _models.get(which)
        if model is None:
            model = _models[which] = load_model(key.model, device=key.device, dtype=key.dtype)
    return model


async def aget_engine(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    config: EngineConfig | None = None,
) -> Engine:
    """`get_engine` without blocking the event loop while a model loads."""
    return await asyncio.to_thread(get_engine, model, device=device, dtype=dtype, config=config)


def shared_engines() -> dict[EngineKey, Engine]:
    """A snapshot of the engines this process holds."""
    with _registry_lock:
        return dict(_engines)


def close_shared_engines() -> None:
    """Stop every shared engine (their open streams receive Error('closed')) and forget them."""
    with _registry_lock:
        engines = list(_engines.values())
        _engines.clear()
        _models.clear()  # the next get_engine loads again, as after a first start
        # The per-key locks stay (one per key ever asked for): a get_engine loading under one now would
        # otherwise be joined by a second load of the same model under a new lock, and one of the two
        # engines left out of the registry, never stopped here.
    for engine in engines:
        try:
            engine.core.stop()
        except Exception:  # the others are stopped all the same: out of the registry, nothing else would
            _log.exception("stopping a shared engine failed")


atexit.register(close_shared_engines)


def _fresh_locks_after_fork() -> None:
    """A fork copies these locks in whatever state another thread held them. The engines inherited are
    shut down in the child (engine.process), so get_engine replaces each with a new one on
    the model already loaded."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _key_locks.clear()
    _model_locks.clear()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)
