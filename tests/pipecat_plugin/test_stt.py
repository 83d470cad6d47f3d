"""MonosemanticSTTService in real Pipecat pipelines, on the real engine, with real speech: finals equal the
model's offline transcription, one per utterance; clean cancel and stop; one shared engine; settings at
run time; engine errors become ErrorFrames."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import numpy as np
import pytest
import soxr
from pipecat.frames.frames import (
    InterimTranscriptionFrame,
    MetricsFrame,
    STTUpdateSettingsFrame,
    TranscriptionFrame,
)
from pipecat.metrics.metrics import STTUsageMetricsData, TTFBMetricsData

import monosemantic
from monosemantic import EngineConfig
from monosemantic.audio import resample
from monosemantic.engine.shared import shared_engines
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(180)

NO_VAD = EngineConfig(vad=None)  # pipecat's VAD drives the turns; the engine's would only cost time here


@pytest.fixture
def ckpt(nemo_checkpoint):
    return nemo_checkpoint("nemotron_rnnt")


def service(ckpt, **kwargs) -> MonosemanticSTTService:
    kwargs.setdefault("engine_config", NO_VAD)
    return MonosemanticSTTService(model=ckpt, device="cpu", **kwargs)


def split_by_utterance(frames) -> list[list]:
    """Transcription frames grouped into utterances, each ending at its TranscriptionFrame."""
    groups, current = [], []
    for frame in frames:
        current.append(frame)
        if isinstance(frame, TranscriptionFrame):
            groups.append(current)
            current = []
    assert not current, "transcription frames after the last final"
    return groups


def check_utterances(h, expected: list[str], spoke_on: bool = False) -> None:
    """`spoke_on`: the audio came faster than the finals, so a final may come while the user speaks again
    (the next VADUserStartedSpeakingFrame already in): that one is not finalized (more is to come)."""
    groups = split_by_utterance(h.transcripts())
    assert [g[-1].text for g in groups] == expected
    assert spoke_on or all(g[-1].finalized for g in groups)
    for group in groups:
        final, interims = group[-1], group[:-1]
        assert interims and all(isinstance(f, InterimTranscriptionFrame) for f in interims)
        for interim in interims:  # greedy decoding never retracts: every interim is a prefix of the final
            assert final.text.startswith(interim.text.rstrip())
        assert isinstance(final.result, monosemantic.Final) and final.result.text == final.text
        assert final.language == "en" and final.user_id == "" and final.timestamp
    assert not h.errors()


def test_finals_equal_offline_transcription_one_per_utterance(fresh_engines, harness, ckpt, model, speech):
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech]
    assert all(expected) and len(set(expected)) == len(expected)

    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            for n, pcm in enumerate(speech, 1):
                await h.say(pcm)  # as a user does: the next turn starts after the transcript of this one
                await h.wait_for(lambda: len(h.finals()) == n)
            await h.end()
            return h

    h = asyncio.run(main())
    check_utterances(h, expected)
    metrics = [d for m in h.down.of(MetricsFrame) for d in m.data]
    ttfb = [d for d in metrics if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d.value.audio_seconds for d in metrics if isinstance(d, STTUsageMetricsData)]
    assert len(ttfb) == len(speech)  # end of speech -> final, once per utterance (the finalize handshake)
    assert sum(usage) == pytest.approx(sum(len(p) for p in speech) / 16000, abs=1e-6)


@pytest.mark.parametrize("rate", [24000, 48000])
def test_other_pipeline_rates_are_resampled_by_the_engine(fresh_engines, harness, ckpt, model, speech, rate):
    resampled = [soxr.resample(pcm.astype(np.float32), 16000, rate) for pcm in speech[:2]]
    audio = [np.round(x).clip(-32768, 32767).astype(np.int16) for x in resampled]
    # The engine resamples each utterance as one piece, exactly as offline transcription at that rate does.
    expected = [model.transcribe(pcm, sample_rate=rate, latency_ms=160).text for pcm in audio]

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=rate) as h:
            assert stt.sample_rate == rate
            for pcm in audio:
                await h.say(pcm)
            await h.wait_for(lambda: len(h.finals()) == len(audio))
            await h.end()
            return h

    check_utterances(asyncio.run(main()), expected, spoke_on=True)


class RecordingService(MonosemanticSTTService):
    """The service, noting the time of every frame it pushes (to see what comes after a cancel)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pushed: list[tuple[float, object]] = []

    async def push_frame(self, frame, direction=None):
        self.pushed.append((time.monotonic(), frame))
        await super().push_frame(frame, *(() if direction is None else (direction,)))


def test_cancel_mid_utterance_is_clean_and_frees_the_slot(fresh_engines, harness, ckpt, speech):
    async def main():
        stt = RecordingService(model=ckpt, device="cpu", engine_config=NO_VAD)
        async with harness(stt, sample_rate=16000) as h:
            (engine,) = shared_engines().values()
            await h.speech_starts()
            await h.audio(speech[1])  # the user is still speaking when the pipeline is cancelled
            await h.wait_for(lambda: h.down.of(InterimTranscriptionFrame))
            assert len(engine.core.streams) == 1
            cancelled_at = time.monotonic()
            await h.cancel(timeout=10)
            await asyncio.sleep(0.5)  # anything still in flight would arrive now
            return stt, h, engine, cancelled_at

    stt, h, engine, cancelled_at = asyncio.run(main())
    transcripts = (InterimTranscriptionFrame, TranscriptionFrame)
    late = [f for t, f in stt.pushed if t > cancelled_at and isinstance(f, transcripts)]
    assert late == []
    assert engine.core.streams == {}
    assert len(engine.core.scheduler.free_slots) == engine.config.max_streams
    assert not stt._sessions and not h.errors()


def test_end_frame_flushes_audio_not_yet_finalized(fresh_engines, harness, ckpt, model, speech):
    """Audio pushed without a VAD stop is still transcribed when the pipeline ends."""
    pcm = speech[0]

    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            await h.speech_starts()
            await h.audio(pcm)  # and no VADUserStoppedSpeakingFrame: the EndFrame ends the utterance
            await h.end()
            (engine,) = shared_engines().values()
            return h, engine

    h, engine = asyncio.run(main())
    assert [f.text for f in h.finals()] == [model.transcribe(pcm, latency_ms=160).text]
    assert engine.core.streams == {} and not h.errors()


def test_services_in_one_process_share_one_engine(fresh_engines, harness, ckpt, model, speech):
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]

    async def main():
        async with contextlib.AsyncExitStack() as stack:
            harnesses = [await stack.enter_async_context(harness(service(ckpt), sample_rate=16000)) for _ in range(2)]
            assert len(shared_engines()) == 1
            (engine,) = shared_engines().values()
            assert len(engine.core.streams) == 2  # one stream per service, in the same engine
            for h, pcm in zip(harnesses, speech):
                await h.say(pcm)
            for h in harnesses:
                await h.wait_for(lambda: len(h.finals()) == 1)
                await h.end()
            return harnesses

    harnesses = asyncio.run(main())
    for h, text in zip(harnesses, expected):
        check_utterances(h, [text])


def test_latency_change_waits_for_the_utterance_boundary(fresh_engines, harness, ckpt, model, speech):
    first, second = speech[0], speech[1]
    expected = [model.transcribe(first, latency_ms=160).text, model.transcribe(second, latency_ms=80).text]
    assert expected[1] != model.transcribe(second, latency_ms=160).text  # the modes are told apart

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            half = len(first) // 2 // 320 * 320
            await h.speech_starts()
            await h.audio(first[:half])
            # The change arrives mid-utterance: this utterance finishes at 160 ms, the next one runs at 80 ms.
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(latency_ms=80)))
            await h.wait_for(lambda: stt.settings.latency_ms == 80)
            assert stt._session.latency_ms == 160
            await h.audio(first[half:])
            await h.speech_stops()
            await h.say(second)
            await h.wait_for(lambda: len(h.finals()) == 2)
            assert stt._session.latency_ms == 80
            await h.end()
            (engine,) = shared_engines().values()
            return h, engine

    h, engine = asyncio.run(main())
    check_utterances(h, expected, spoke_on=True)
    assert engine.core.streams == {}  # the retired 160 ms stream closed after its final, the other at the end


def test_latency_change_between_utterances_applies_at_once(fresh_engines, harness, ckpt, model, speech):
    expected = [model.transcribe(speech[0], latency_ms=160).text, model.transcribe(speech[1], latency_ms=80).text]

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(latency_ms=80)))
            await h.wait_for(lambda: stt._session is not None and stt._session.latency_ms == 80)
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            await h.end()
            return h

    check_utterances(asyncio.run(main()), expected)


def test_unknown_latency_mode_is_refused_and_the_old_one_kept(fresh_engines, harness, ckpt, model, speech):
    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            delta = MonosemanticSTTService.Settings(latency_ms=123)
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=delta))
            await h.wait_for(lambda: h.errors())
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.end()
            return stt, h

    stt, h = asyncio.run(main())
    (error,) = h.errors()
    assert "latency_ms=123" in error.error and "keeping latency_ms=160" in error.error
    assert stt.settings.latency_ms == 160 and stt.is_usable
    assert [f.text for f in h.finals()] == [model.transcribe(speech[0], latency_ms=160).text]


def test_interim_results_can_be_switched_off_at_run_time(fresh_engines, harness, ckpt, model, speech):
    async def main():
        stt = service(ckpt, settings=MonosemanticSTTService.Settings(interim_results=False))
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            delta = MonosemanticSTTService.Settings(interim_results=True)
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=delta))
            await h.wait_for(lambda: stt.settings.interim_results)
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            await h.end()
            return h

    first, second = split_by_utterance(asyncio.run(main()).transcripts())
    assert len(first) == 1 and len(second) > 1  # no interims, then interims


def test_engine_shutdown_becomes_an_error_frame_and_the_service_recovers(fresh_engines, harness, ckpt, model, speech):
    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            await h.speech_starts()
            await h.audio(speech[0][:16000])
            await h.wait_for(lambda: h.down.of(InterimTranscriptionFrame))
            await asyncio.to_thread(monosemantic.close_shared_engines)  # the engine goes away mid-utterance
            await h.wait_for(lambda: h.errors())
            await h.speech_stops()
            await h.say(speech[1])  # the next audio opens a stream on a fresh engine
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.end()
            return h

    h = asyncio.run(main())
    (error,) = h.errors()
    assert "closed" in error.error and "not transcribed" in error.error and not error.fatal
    assert [f.text for f in h.finals()] == [model.transcribe(speech[1], latency_ms=160).text]


def test_a_checkpoint_that_cannot_load_is_an_error_frame_not_a_hang(fresh_engines, harness, tmp_path):
    async def main():
        stt = MonosemanticSTTService(model=tmp_path / "missing.nemo", device="cpu")
        async with harness(stt, sample_rate=16000) as h:
            await h.say(np.zeros(3200, dtype=np.int16))
            await h.end(timeout=30)
            return stt, h

    stt, h = asyncio.run(main())
    (error,) = h.errors()
    assert "missing.nemo" in error.error and not stt.is_usable
    assert h.finals() == []


def gate_model_load(monkeypatch, path: str, wait_s: float):
    """Loads of the checkpoint at `path` start, then wait until the returned `release` event is set (at
    most `wait_s`), as a large checkpoint takes seconds to load. Returns (loading, release) events."""
    import threading

    import monosemantic.engine.shared as shared

    loading, release = threading.Event(), threading.Event()
    load = shared.load_model

    def gated_load(p, **kwargs):
        if os.fspath(p) == path:
            loading.set()
            release.wait(wait_s)
        return load(p, **kwargs)

    monkeypatch.setattr(shared, "load_model", gated_load)
    return loading, release


async def switch_model_in_an_utterance(h, path: str, loading, audio) -> None:
    """Speech starts, its audio, a model update to `path` (once its load has begun), then the speech
    stops: the utterance ends while the new model still loads."""
    await h.speech_starts()
    await h.audio(audio)
    await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(model=path)))
    await h.wait_for(loading.is_set)  # settings frames and VAD frames take different paths
    await h.speech_stops()


def test_a_model_that_cannot_load_is_one_error_and_the_old_model_stays(
    fresh_engines, harness, ckpt, model, speech, tmp_path, monkeypatch
):
    """A model update arrives shortly before the utterance ends, and the model fails to load (after a
    while, as a large checkpoint would). The utterance ends on the current model without waiting for the
    load or trying it again: exactly one ErrorFrame, naming the model that failed, and the old model
    stays for the next utterance."""
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(b"not a checkpoint")
    # The failing load outlasts the utterance (released when the utterance is done).
    loading, utterance_done = gate_model_load(monkeypatch, os.fspath(bad), 5)
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]
    current = os.fspath(ckpt)

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            try:
                await switch_model_in_an_utterance(h, os.fspath(bad), loading, speech[0])
                await h.wait_for(lambda: len(h.finals()) == 1, timeout=30)
            finally:
                utterance_done.set()
            await h.wait_for(lambda: h.errors())
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            assert stt.settings.model == current and stt._session.model == current
            await h.end()
            return stt, h

    stt, h = asyncio.run(main())
    (error,) = h.errors()
    assert not error.fatal and stt.is_usable
    assert error.error.startswith(f"cannot switch to model {os.fspath(bad)!r}") and f"keeping {current!r}" in error.error
    assert [f.text for f in h.finals()] == expected


def test_a_model_switch_waits_for_the_load_and_never_holds_up_an_utterance(
    fresh_engines, harness, ckpt, model, speech, tmp_path, monkeypatch
):
    """The new model loads in the background. An utterance that ends while it loads is finished on the
    current model and its final comes at once; `settings.model` changes when the load is done, and the
    stream switches then (between utterances), so the next utterance runs on the new model."""
    import shutil

    other = os.fspath(tmp_path / "other.nemo")
    shutil.copy(ckpt, other)  # the same weights under another name: a second engine, the same transcripts
    # The test lets the load finish when it has seen what happens meanwhile.
    loading, loaded = gate_model_load(monkeypatch, other, 60)
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]
    current = os.fspath(ckpt)

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            try:
                await switch_model_in_an_utterance(h, other, loading, speech[0])
                await h.wait_for(lambda: len(h.finals()) == 1, timeout=20)  # while the new model still loads
                assert stt.settings.model == current and stt._session.model == current
            finally:
                loaded.set()
            await h.wait_for(lambda: stt._session is not None and stt._session.model == other)
            assert stt.settings.model == other
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            await h.end()
            return h

    h = asyncio.run(main())
    assert not h.errors()
    assert [f.text for f in h.finals()] == expected
    assert len({engine for engine in shared_engines().values()}) == 2


def pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in int16 units -> int16, as a transport delivers them."""
    return np.round(samples).clip(-32768, 32767).astype(np.int16)


def at_rate(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """int16 audio resampled in one piece (the service resamples in pieces; soxr gives the same samples)."""
    return pcm16(resample(pcm.astype(np.float32) / 32768.0, from_rate, to_rate) * 32768.0)


def usage_seconds(h) -> float:
    data = [d for m in h.down.of(MetricsFrame) for d in m.data]
    return sum(d.value.audio_seconds for d in data if isinstance(d, STTUsageMetricsData))


def test_multichannel_frames_are_downmixed_to_mono(fresh_engines, harness, ckpt, model, speech):
    """Interleaved channels are averaged; pushed as they were, they would be heard as audio 2-3x as long."""
    both = np.repeat(speech[0][:, None], 2, axis=1)  # a mono source on both channels of a stereo track
    three = np.stack([speech[1], speech[1] // 2, np.zeros_like(speech[1])], axis=1)
    heard = [speech[0], pcm16(three.astype(np.float32).mean(axis=1))]
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in heard]

    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            for n, pcm in enumerate([both, three], 1):
                await h.say(pcm)
                await h.wait_for(lambda: len(h.finals()) == n)
            await h.end()
            return h

    h = asyncio.run(main())
    check_utterances(h, expected)
    assert [f.result.end - f.result.start for f in h.finals()] == [len(pcm) for pcm in heard]
    assert usage_seconds(h) == pytest.approx(sum(len(pcm) for pcm in heard) / 16000, abs=1e-6)


@pytest.mark.parametrize("stream_rate, frame_rate", [(16000, 48000), (24000, 16000)])
def test_frames_at_another_rate_are_resampled_to_the_stream_rate(
    fresh_engines, harness, ckpt, model, speech, stream_rate, frame_rate
):
    frames = [at_rate(pcm, 16000, frame_rate) for pcm in speech[:2]]
    heard = [at_rate(pcm, frame_rate, stream_rate) for pcm in frames]  # the same audio, mono at the stream's rate
    expected = [model.transcribe(pcm, sample_rate=stream_rate, latency_ms=160).text for pcm in heard]
    assert all(expected)

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=stream_rate) as h:
            assert stt.sample_rate == stream_rate
            for n, pcm in enumerate(frames, 1):
                await h.say(pcm, rate=frame_rate)
                await h.wait_for(lambda: len(h.finals()) == n)
            await h.end()
            return h

    h = asyncio.run(main())
    check_utterances(h, expected)
    assert usage_seconds(h) == pytest.approx(sum(len(pcm) for pcm in heard) / stream_rate, abs=1e-6)


def test_a_rate_change_mid_utterance_loses_no_audio(fresh_engines, harness, ckpt, model, speech):
    """The resampler's lookahead is pushed when the rate changes back, ahead of the next frame's audio."""
    pcm = speech[1]
    cut1, cut2 = len(pcm) // 3 // 320 * 320, 2 * len(pcm) // 3 // 320 * 320
    middle = at_rate(pcm[cut1:cut2], 16000, 48000)
    heard = np.concatenate([pcm[:cut1], at_rate(middle, 48000, 16000), pcm[cut2:]])
    expected = model.transcribe(heard, latency_ms=160).text

    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            await h.speech_starts()
            await h.audio(pcm[:cut1])
            await h.audio(middle, rate=48000)
            await h.audio(pcm[cut2:])
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.end()
            return h

    h = asyncio.run(main())
    check_utterances(h, [expected])
    (final,) = h.finals()
    assert final.result.end - final.result.start == len(heard)


def test_frames_of_no_usable_format_are_error_frames_and_the_stream_carries_on(
    fresh_engines, harness, ckpt, model, speech
):
    from pipecat.frames.frames import InputAudioRawFrame

    bad = [
        InputAudioRawFrame(audio=b"\x00\x01\x02", sample_rate=16000, num_channels=1),
        InputAudioRawFrame(audio=b"\x00" * 6, sample_rate=16000, num_channels=2),  # 3 samples: not whole pairs
        InputAudioRawFrame(audio=b"\x00" * 640, sample_rate=-16000, num_channels=1),
        InputAudioRawFrame(audio=b"\x00" * 640, sample_rate=16000, num_channels=-1),
    ]

    async def main():
        async with harness(service(ckpt), sample_rate=16000) as h:
            await h.speech_starts()
            for frame in bad:
                await h.worker.queue_frame(frame)
            await h.audio(speech[0])
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.end()
            return h

    h = asyncio.run(main())
    errors = h.errors()
    assert len(errors) == 4 and not any(e.fatal for e in errors)
    assert all(e.error.startswith("audio frame rejected, not transcribed") for e in errors)
    assert "odd byte count" in errors[0].error
    assert "not whole 16-bit samples of 2 channels" in errors[1].error
    assert "unsupported sample rate -16000" in errors[2].error
    assert "unsupported channel count -1" in errors[3].error
    assert [f.text for f in h.finals()] == [model.transcribe(speech[0], latency_ms=160).text]


@pytest.mark.parametrize("config", [{"vad": None}, {}, "EngineConfig(vad=None)"], ids=["dict", "empty-dict", "str"])
def test_an_engine_config_of_the_wrong_type_is_refused_at_construction(ckpt, config):
    """Otherwise it fails on every reopen with an unrelated message, or (empty) passes for the default."""
    message = f"engine_config must be a monosemantic.EngineConfig, got {type(config).__name__}"
    with pytest.raises(TypeError, match=message):
        MonosemanticSTTService(model=ckpt, device="cpu", engine_config=config)


def frame_count(*pieces: np.ndarray) -> int:
    """Audio frames `Harness.audio` makes of these pieces (20 ms = 320 samples at 16 kHz each)."""
    return sum(-(-len(piece) // 320) for piece in pieces)


def test_audio_during_a_slow_latency_switch_reaches_the_new_stream_in_order(
    fresh_engines, harness, ckpt, model, speech, monkeypatch
):
    """In-process, a latency change's new stream opens in the background too. While it opens (held here
    by the test), the utterance that was in progress finishes on the old stream and its final comes
    without waiting; the next utterance (audio and end) and the start of the one after are kept, and
    once the stream opens they go to it in order, followed by the rest of the audio: every utterance
    after the change is transcribed in the new mode, exactly as offline, nothing lost."""
    from pipecat.frames.frames import InputAudioRawFrame

    first, second, third = speech
    expected = [
        model.transcribe(first, latency_ms=160).text,
        model.transcribe(second, latency_ms=80).text,
        model.transcribe(third, latency_ms=80).text,
    ]
    assert expected[1] != model.transcribe(second, latency_ms=160).text  # the modes are told apart
    half = len(first) // 2 // 320 * 320
    cut = len(third) // 3 // 320 * 320

    async def main():
        stt = service(ckpt)
        async with harness(stt, sample_rate=16000) as h:
            (engine,) = shared_engines().values()
            opening, release = asyncio.Event(), asyncio.Event()
            real_open = engine.open_stream

            async def held_open(latency_ms=None, sample_rate=16000):
                opening.set()
                await release.wait()  # an engine busy elsewhere, say: the test decides when it answers
                return await real_open(latency_ms=latency_ms, sample_rate=sample_rate)

            monkeypatch.setattr(engine, "open_stream", held_open)
            try:
                await h.speech_starts()
                await h.audio(first[:half])
                await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(latency_ms=80)))
                await h.wait_for(lambda: stt.settings.latency_ms == 80)
                await h.audio(first[half:])
                await h.speech_stops()  # the old stream finishes this utterance; the new one starts opening
                await h.wait_for(opening.is_set)
                await h.say(second)  # kept while the new stream opens, its end too
                await h.speech_starts()
                await h.audio(third[:cut])  # and this, not ended yet
                await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == frame_count(first, second, third[:cut]))
                await h.wait_for(lambda: len(h.finals()) == 1)  # the old stream's final does not wait for the open
                assert stt._opening is not None and stt._session is None
                assert stt._backlog_bytes == 2 * (len(second) + cut) and stt._backlog.count(None) == 1
            finally:
                release.set()
            await h.wait_for(lambda: stt._session is not None and stt._session.latency_ms == 80)
            await h.audio(third[cut:])  # after the kept audio, on the new stream
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 3)
            await h.end()
            return stt, h, engine

    stt, h, engine = asyncio.run(main())
    check_utterances(h, expected, spoke_on=True)
    assert not stt._backlog and engine.core.streams == {}


def test_a_model_switch_whose_stream_cannot_open_keeps_the_old_stream_and_the_audio(
    fresh_engines, harness, ckpt, model, speech, tmp_path, monkeypatch
):
    """The new model loads, but its engine refuses the stream (it is full: another user took its only
    slot while the open was held up). The audio kept during the open goes to the old stream, in order,
    then the rest: every utterance is transcribed on the old model, nothing lost; one non-fatal
    ErrorFrame, and `settings.model` goes back to the model still in use."""
    import shutil

    from pipecat.frames.frames import InputAudioRawFrame

    from monosemantic.engine.frontdoor import Engine
    from monosemantic.errors import CapacityError

    other = os.fspath(tmp_path / "other.nemo")
    shutil.copy(ckpt, other)  # the same weights under another name: a second engine
    current = os.fspath(ckpt)
    first, second, third = speech
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech]
    cut = len(third) // 3 // 320 * 320

    async def main():
        stt = service(ckpt, engine_config=EngineConfig(vad=None, max_streams=1))
        async with harness(stt, sample_rate=16000) as h:
            (old_engine,) = shared_engines().values()
            opening, release = asyncio.Event(), asyncio.Event()
            real_open = Engine.open_stream

            async def held_open(self, latency_ms=None, sample_rate=16000):
                if self is not old_engine:
                    opening.set()
                    await release.wait()
                return await real_open(self, latency_ms=latency_ms, sample_rate=sample_rate)

            monkeypatch.setattr(Engine, "open_stream", held_open)
            await h.say(first)
            await h.wait_for(lambda: len(h.finals()) == 1)
            try:
                await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(model=other)))
                await h.wait_for(opening.is_set)  # loaded; its stream opens between utterances
                assert stt.settings.model == other
                (new_engine,) = [e for e in shared_engines().values() if e is not old_engine]
                blocker = await real_open(new_engine)  # the new engine's only slot is taken
                await h.say(second)  # kept while the new stream opens
                await h.speech_starts()
                await h.audio(third[:cut])
                await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == frame_count(first, second, third[:cut]))
                assert stt._opening is not None and stt._backlog_bytes == 2 * (len(second) + cut)
                assert len(h.finals()) == 1 and not h.errors()
            finally:
                release.set()
            await h.wait_for(lambda: h.errors())
            await h.wait_for(lambda: stt._session is not None and stt._opening is None)
            assert stt._session.model == current and stt.settings.model == current
            await h.audio(third[cut:])  # after the kept audio, on the old stream
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 3)
            await blocker.close()
            await h.end()
            return stt, h, old_engine

    stt, h, old_engine = asyncio.run(main())
    (error,) = h.errors()
    assert not error.fatal and stt.is_usable
    assert error.error.startswith(f"cannot apply latency_ms=160, model={other}: ")
    assert f"keeping latency_ms=160, model={current}" in error.error
    assert isinstance(error.exception, CapacityError) and "maximum of 1 streams" in error.error
    assert [g[-1].text for g in split_by_utterance(h.transcripts())] == expected
    assert all(f.result.text == f.text for f in h.finals())
    assert old_engine.core.streams == {}


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "invalid device 'gpu'"), ({"device": "cpu:1"}, "invalid device 'cpu:1'"),
    ({"dtype": "fp32x"}, "invalid dtype 'fp32x'"),
])
def test_a_bad_device_or_dtype_is_refused_at_construction(ckpt, kwargs, message):
    """The model loads when the pipeline starts: a typo was reported only then, as an ErrorFrame that
    marks the service unusable in the middle of a call."""
    with pytest.raises(ValueError, match=message):
        MonosemanticSTTService(model=ckpt, **{"device": "cpu", **kwargs})
