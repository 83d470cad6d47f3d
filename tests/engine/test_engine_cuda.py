"""The engine on a GPU with CUDA graphs: finals equal offline transcription (fp32). Skipped without a
GPU (CI has none; the device machine runs it)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import monosemantic
from monosemantic import Engine, EngineConfig, Final

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphed_engine_equals_offline(nemo_checkpoint, audio_clips):
    model = monosemantic.load_model(nemo_checkpoint("nemotron_tdt"), device="cuda")
    clips = list(audio_clips.values())

    async def one(engine, i):
        stream = await engine.open_stream(latency_ms=160)
        audio = clips[i % len(clips)]
        rng = np.random.default_rng(i)
        start = 0
        while start < len(audio):
            n = int(rng.integers(100, 3000))
            await stream.push(audio[start : start + n])
            start += n
        await stream.flush()
        async for event in stream:
            if isinstance(event, Final):
                await stream.close()
                return [t.id for t in event.tokens]

    async def main():
        config = EngineConfig(max_streams=16, max_batch=16, warmup_latencies=(160,))
        async with Engine(model, config) as engine:
            assert engine.core.runner.graphs  # captured at start
            return await asyncio.gather(*(one(engine, i) for i in range(12)))

    results = asyncio.run(main())
    for i, tokens in enumerate(results):
        assert tokens == model.transcribe(clips[i % len(clips)], latency_ms=160).token_ids


def test_slots_beyond_free_gpu_memory_are_refused_with_the_sizes(nemo_checkpoint):
    model = monosemantic.load_model(nemo_checkpoint("nemotron_rnnt"), device="cuda")
    free = torch.cuda.mem_get_info(model.device)[0]
    probe = Engine(model, EngineConfig(max_streams=1, vad=None, max_buffered_seconds=1.0))
    streams = 2 * free // probe.core.runner.slot_bytes.device + 1  # twice what the GPU holds
    with pytest.raises(monosemantic.CapacityError, match=rf"max_streams={streams}\) needs .* GiB of cuda:0 memory"):
        Engine(model, EngineConfig(max_streams=streams, vad=None, max_buffered_seconds=1.0))


def test_a_closed_engine_lets_go_of_its_slot_state_and_graphs_while_still_referenced(nemo_checkpoint):
    """A stopped engine kept its slot caches and the CUDA graphs that write them (with their memory
    pool) until nothing referred to it any more."""
    import gc
    import weakref

    model = monosemantic.load_model(nemo_checkpoint("nemotron_rnnt"), device="cuda")

    async def main():
        engine = Engine(model, EngineConfig(max_streams=4, max_batch=4, vad=None, warmup_latencies=(160,)))
        async with engine:
            runner = engine.core.runner
            graph = next(iter(runner.graphs.values()))
            held = [weakref.ref(t) for t in (runner.cache.keys[0], runner.decoder.h, graph.out)]
            del runner, graph
        return engine, held

    engine, held = asyncio.run(main())
    gc.collect()
    assert [ref() is None for ref in held] == [True] * len(held)
    assert not engine.core.runner.graphs
