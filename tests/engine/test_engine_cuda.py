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
