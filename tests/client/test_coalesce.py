"""Remote streams gather small pushes up to the server's step points (engine/coalesce.py, whose points
tests/engine/test_coalesce.py checks): the same events as sending every push, in fewer messages, and at
rates the server resamples, model-rate counts equal to what the engine itself holds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from monosemantic import Engine, EngineConfig, Final
from monosemantic.client import RemoteEngine
from monosemantic.engine.coalesce import MAX_HOLD_SECONDS, Coalescer

from _support.events import by_kind, utterances_in_frames
from _support.fake_server import READY, FakeServer, fake_server
from _support.server import RunningServer, pcm16

pytestmark = pytest.mark.timeout(240)

@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_counts_what_the_engine_holds_at_other_rates(ms_model, rate):
    """At a rate the server resamples, the shadow resampler's count equals the model-rate samples the
    engine's own stream holds after each push, and the utterance start after each flush is the
    engine's flush point (resampler tail included)."""
    model = ms_model("nemotron_rnnt")
    rng = np.random.default_rng(rate)

    async def main():
        async with Engine(model, EngineConfig(max_streams=1, vad=None, max_buffered_seconds=30.0, coalesce_pushes=False)) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=rate)
            record = engine.core.scheduler.streams[stream.handle]
            c = Coalescer(stream.timing, rate, model.sample_rate)
            for i in range(120):
                if i % 40 == 39:
                    await stream.flush()
                    c.flushed()
                    assert record.flushes[-1] == c.utterance_start == c.written
                    continue
                n = int(rng.integers(1, 2 * rate // 50))
                await stream.push(rng.uniform(-0.3, 0.3, n).astype(np.float32))
                c.add(n, 0.0)
                assert record.written == c.written, i
            await stream.close()

    asyncio.run(main())


@pytest.fixture(scope="module", params=[True, False], ids=["vad", "no_vad"])
def server(request, model):
    with RunningServer(model, max_streams=4, vad=request.param) as running:
        yield running


def count_messages(stream) -> list[int]:
    """Byte counts of the binary messages the stream sends from now on."""
    sizes: list[int] = []
    send = stream._ws.send_bytes

    async def counted(data, *args, **kwargs):
        sizes.append(len(data))
        return await send(data, *args, **kwargs)

    stream._ws.send_bytes = counted
    return sizes


@pytest.mark.parametrize("rate", [16000, 48000])
def test_same_events_in_fewer_messages(server, audio_clips, rate):
    """Two utterances in 20 ms frames, gathered and not: the same events (partials, VAD, finals with
    their times), with the server told about a third (VAD on) or a sixth (VAD off) as many messages."""
    from monosemantic.audio import resample

    clip = audio_clips["61-70968-0000.flac"]
    audio = np.concatenate([np.zeros(4000, np.float32), clip, np.zeros(8000, np.float32)])
    pcm = np.frombuffer(pcm16(resample(audio, 16000, rate) if rate != 16000 else audio), "<i2")
    frame = rate // 50

    async def run(coalesce: bool):
        async with RemoteEngine(server.http, coalesce=coalesce) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=rate)
            assert (stream._coalescer is not None) == coalesce
            sizes = count_messages(stream)
            return await utterances_in_frames(stream, pcm, frame), sizes

    plain, plain_sizes = asyncio.run(run(False))
    gathered, gathered_sizes = asyncio.run(run(True))
    assert sum(gathered_sizes) == sum(plain_sizes) == 2 * len(pcm)
    assert by_kind(gathered) == by_kind(plain)
    assert any(isinstance(e, Final) and e.text for e in gathered)
    ratio = len(gathered_sizes) / len(plain_sizes)
    assert ratio < (0.7 if server.config.vad else 0.25), ratio


def test_a_push_after_a_pause_goes_at_once(server):
    """Audio is not held across a pause in the pushes (a keepalive every few seconds, a producer that
    stopped): the push after the pause sends what was held with it."""

    async def main():
        async with RemoteEngine(server.http) as engine:
            stream = await engine.open_stream(latency_ms=160, sample_rate=16000)
            sizes = count_messages(stream)
            frame = np.full(160, 100, np.int16)  # 10 ms: the first push goes (nothing came before it)
            await stream.push(frame)
            await stream.push(frame)  # held: no point reached
            assert sizes == [320]
            await asyncio.sleep(MAX_HOLD_SECONDS + 0.1)
            await stream.push(frame)
            assert sizes == [320, 640]
            await stream.close()

    asyncio.run(main())


def test_a_server_without_step_timing_gets_every_push():
    """A server before the ready message's `steps` (or one sending a malformed one): every push is a
    message, as before."""
    server = FakeServer(ready={**READY, "steps": {"first": 0, "every": 2560}})  # malformed: not positive

    async def main():
        async with fake_server(server) as url:
            async with RemoteEngine(url) as engine:
                stream = await engine.open_stream()
                assert stream._coalescer is None
                for _ in range(10):
                    await stream.push(np.zeros(320, np.int16))
                await stream.flush()
                async for event in stream:  # its Final: the server has read everything before the flush
                    if isinstance(event, Final):
                        break
                await stream.close()

    asyncio.run(main())
    assert server.connections[0].received == [640] * 10 + ["flush"]
