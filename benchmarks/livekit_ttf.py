"""Time to final through the LiveKit plugin, beside the raw engine, in one run.

Each of --streams concurrent streams speaks --utterances utterances (clips of tests/data, cut to
--seconds) as 20 ms frames at real-time pace, and flushes after each. Time to final is the time from the
flush call to the FINAL: `stream.flush()` -> FINAL_TRANSCRIPT through the plugin's RecognizeStream, and
`engine_stream.flush()` -> Final on the raw engine stream. Both phases use the same shared engine, so
the difference is what the adapter adds (channels, event mapping, tasks).

    python benchmarks/livekit_ttf.py --model path/to/model.nemo --streams 4 --utterances 5

The engine runs without VAD here (--vad turns it on), so the flush is the only utterance boundary in
both phases.

With --url the same runs against a `monosemantic serve` (remote mode): the plugin phase uses
`STT(base_url=URL)`, the raw phase `monosemantic.client.RemoteEngine(URL)`; the server's engine settings
(VAD included) are the server's.

    python benchmarks/livekit_ttf.py --url ws://127.0.0.1:8080 --streams 16 --utterances 5

--turns measures the end of a turn the engine's VAD finds instead (VAD on, no flush call): after each
utterance --gap seconds of silence follow, and the time is from the push of the utterance's last frame to
the first FINAL after it (so it includes the VAD's wait for `min_silence_ms`). Only the plugin runs
(the raw engine has no turns).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

import monosemantic
from monosemantic.audio import resample

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
FRAME = 320  # 20 ms at 16 kHz


def clips(seconds: float) -> list[np.ndarray]:
    import soundfile as sf

    out = []
    for path in sorted(DATA.glob("*.wav")) + sorted(DATA.glob("*.flac")):
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        audio = resample(audio.mean(axis=1), rate, 16000)
        out.append(audio[: int(seconds * 16000)])
    return out


def pcm16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio, -1, 1) * 32767).astype(np.int16)


async def paced(audio: np.ndarray, push, pace: float) -> None:
    """push(frame) every 20 ms of audio, at `pace` x real time."""
    start = time.perf_counter()
    for i in range(0, len(audio), FRAME):
        await push(audio[i : i + FRAME])
        due = start + (i + FRAME) / 16000 / pace
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


async def raw_stream(engine, utterances, latency_ms, pace) -> list[float]:
    stream = await engine.open_stream(latency_ms=latency_ms)
    times, finals = [], asyncio.Queue()

    async def read():
        async for event in stream:
            if isinstance(event, monosemantic.Final):
                finals.put_nowait(time.perf_counter())

    reader = asyncio.create_task(read())
    for audio in utterances:
        await paced(pcm16(audio), stream.push, pace)
        t0 = time.perf_counter()
        await stream.flush()
        times.append(await asyncio.wait_for(finals.get(), 60) - t0)  # a lost final fails the run
    await stream.close()
    await reader
    return times


def plugin_session(stt, on_final):
    """A plugin stream, a task calling on_final(arrival time) at each FINAL_TRANSCRIPT, and a push of
    int16 16 kHz audio as one frame."""
    from livekit import rtc
    from livekit.agents.stt import SpeechEventType

    stream = stt.stream()

    async def read():
        async for event in stream:
            if event.type == SpeechEventType.FINAL_TRANSCRIPT:
                on_final(time.perf_counter())

    async def push(piece):
        stream.push_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, len(piece)))

    return stream, asyncio.create_task(read()), push


async def plugin_stream(stt, utterances, pace) -> list[float]:
    times, finals = [], asyncio.Queue()
    stream, reader, push = plugin_session(stt, finals.put_nowait)
    for audio in utterances:
        await paced(pcm16(audio), push, pace)
        t0 = time.perf_counter()
        stream.flush()
        times.append(await asyncio.wait_for(finals.get(), 60) - t0)  # a lost final fails the run
    await stream.aclose()
    await reader
    return times


async def plugin_turns(stt, utterances, pace, gap) -> list[float]:
    """Per utterance: from its last frame's push to the first FINAL after it, with the VAD ending the turn
    in the `gap` seconds of silence that follow."""
    finals: list[float] = []  # arrival times
    stream, reader, push = plugin_session(stt, finals.append)
    silence = np.zeros(int(gap * 16000), dtype=np.int16)
    times = []
    for audio in utterances:
        await paced(pcm16(audio), push, pace)
        pushed = time.perf_counter()
        await paced(silence, push, pace)
        # the turn's FINAL: the first to come after the utterance's last frame (where exactly it cuts
        # is the version's business: not part of the criterion)
        arrivals = [t for t in finals if t >= pushed]
        if arrivals:
            times.append(min(arrivals) - pushed)
        finals.clear()
    await stream.aclose()
    await reader
    return times


def summary(times: list[float]) -> dict:
    ms = np.array(times) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}


async def main(args) -> dict:
    from livekit.plugins import monosemantic as lk_monosemantic

    config = monosemantic.EngineConfig(vad=monosemantic.VADConfig() if args.vad else None)
    if args.url:
        from monosemantic.client import RemoteEngine

        engine = RemoteEngine(args.url)
    else:
        engine = await monosemantic.aget_engine(args.model, device=args.device, config=config)
    pool = clips(args.seconds)
    plan = [[pool[(s + u) % len(pool)] for u in range(args.utterances)] for s in range(args.streams)]
    await raw_stream(engine, [pool[0][:16000]], args.latency_ms, 4.0)  # warm-up, not measured
    raw = [] if args.turns else await asyncio.gather(*(raw_stream(engine, p, args.latency_ms, args.pace) for p in plan))
    if args.url:
        stt = lk_monosemantic.STT(base_url=args.url, latency_ms=args.latency_ms)
    else:
        stt = lk_monosemantic.STT(model=args.model, device=args.device, latency_ms=args.latency_ms, engine_config=config)
    if args.turns:
        plugin = await asyncio.gather(*(plugin_turns(stt, p, args.pace, args.gap) for p in plan))
    else:
        plugin = await asyncio.gather(*(plugin_stream(stt, p, args.pace) for p in plan))
    await stt.aclose()
    if args.url:
        await engine.aclose()
    else:
        assert len(monosemantic.engine.shared.shared_engines()) == 1  # both phases ran on the same engine
    return {
        "model": args.url or str(args.model), "device": "server" if args.url else args.device, "streams": args.streams, "utterances": args.utterances,
        "utterance_seconds": args.seconds, "latency_ms": args.latency_ms, "vad": args.vad, "pace": args.pace,
        "turns": args.turns, "gap": args.gap if args.turns else None,
        "utterances_ended": sum(len(ts) for ts in plugin) if args.turns else None,
        "engine": summary([t for ts in raw for t in ts]) if raw else None,
        "plugin": summary([t for ts in plugin for t in ts]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face id or .nemo path (default: monosemantic.DEFAULT_MODEL)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=5, help="per stream")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each utterance")
    parser.add_argument("--latency-ms", type=int, default=160)
    parser.add_argument("--pace", type=float, default=1.0, help="audio speed, x real time")
    parser.add_argument("--vad", action="store_true", help="run the engine's VAD too")
    parser.add_argument("--url", default=None, help="a `monosemantic serve` URL: measure remote mode")
    parser.add_argument("--turns", action="store_true", help="VAD-ended turns (implies --vad), plugin only")
    parser.add_argument("--gap", type=float, default=1.0, help="--turns: seconds of silence after each utterance")
    args = parser.parse_args()
    args.vad = args.vad or args.turns
    args.model = args.model or monosemantic.DEFAULT_MODEL
    result = asyncio.run(main(args))
    monosemantic.close_shared_engines()
    print(json.dumps(result, indent=2))
