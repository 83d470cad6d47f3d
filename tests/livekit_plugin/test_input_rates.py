"""The LiveKit plugin: 8/24/44.1 kHz input with odd frame sizes
(stereo included), STT usage metrics when a stream is closed with aclose(), and a latency change on a
stream whose turns come from the engine's VAD."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.stt import SpeechEventType as T

import monosemantic
from livekit.plugins import monosemantic as lk_monosemantic

pytestmark = pytest.mark.timeout(120)
NO_VAD = monosemantic.EngineConfig(vad=None)


def finals(events):
    return [e.alternatives[0] for e in events if e.type == T.FINAL_TRANSCRIPT]


def recorded_stream(stt):
    """A stream of `stt` whose pushes into the engine are counted (samples per push) in the list returned."""
    stream = stt.stream()
    pushed, push = [], stream._push

    async def recording(pcm):
        pushed.append(len(pcm))
        await push(pcm)

    stream._push = recording
    return stream, pushed


@pytest.mark.parametrize("rate,step,channels", [(8000, 333, 1), (24000, 241, 2), (44100, 441, 1)])
def test_odd_sized_frames_at_other_rates_lose_no_audio(checkpoint, audio_clips, lk, rate, step, channels):
    from monosemantic.audio import resample
    audio = audio_clips["jfk.wav"]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        stream, pushed = recorded_stream(stt)
        events = []
        reader = lk.start_reader(stream, events)
        pcm = lk.to_int16(resample(audio, 16000, rate))
        for i in range(0, len(pcm), step):
            piece = pcm[i:i + step]
            data = np.repeat(piece, channels)
            stream.push_frame(rtc.AudioFrame(data.tobytes(), rate, channels, len(piece)))
            if i % (step * 5) == 0:
                await asyncio.sleep(0.002)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        usage = sum(e.recognition_usage.audio_duration for e in events if e.type == T.RECOGNITION_USAGE)
        return events, sum(pushed), usage

    events, n, usage = asyncio.run(main())
    assert abs(n - len(audio)) <= 16
    [f] = finals(events)
    assert f.text and f.end_time == pytest.approx(len(audio) / 16000, abs=0.03)


def test_usage_metrics_cover_the_audio_when_the_stream_is_aclosed(checkpoint, audio_clips, lk):
    audio = audio_clips["jfk.wav"][: 16000 * 3]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu", engine_config=NO_VAD)
        metrics = []
        stt.on("metrics_collected", metrics.append)
        stream = stt.stream()
        events = []
        lk.start_reader(stream, events)
        await lk.feed(stream, audio)
        stream.flush()
        await lk.wait_for(lambda: finals(events))
        await stream.aclose()
        await asyncio.sleep(0.5)
        usage_ev = sum(e.recognition_usage.audio_duration for e in events if e.type == T.RECOGNITION_USAGE)
        return metrics, usage_ev

    metrics, usage_ev = asyncio.run(main())
    total = sum(m.audio_duration for m in metrics)
    assert total == pytest.approx(3.0, abs=1e-3)


def test_latency_change_with_engine_vad_applies_between_turns_and_loses_no_audio(checkpoint, audio_clips, lk, ms_model):
    audio = lk.speech_with_silences(audio_clips)[: 16000 * 12]
    other = [m for m in ms_model("nemotron_rnnt").latency_modes if m != 160][0]

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        stream, pushed = recorded_stream(stt)
        events = []
        reader = lk.start_reader(stream, events)
        fr = list(lk.frames(audio))
        for i, f in enumerate(fr):
            stream.push_frame(f)
            if i == 100:
                stt.update_options(latency_ms=other)
            if i % 5 == 4:
                await asyncio.sleep(0.1 / 4)
        stream.end_input()
        await asyncio.wait_for(reader, 60)
        return events, stream, sum(pushed)

    events, stream, n = asyncio.run(main())
    lk.check_invariants(events, len(audio) / 16000)
    assert stream._latency == other and n == len(audio)
    fs = finals(events)
    assert fs[-1].end_time == pytest.approx(len(audio) / 16000, abs=0.05)
