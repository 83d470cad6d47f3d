"""The Pipecat service: an 8 kHz pipeline with odd-sized frames, and
a language update reaching the next final's language field."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import soxr
from pipecat.frames.frames import InputAudioRawFrame, STTUpdateSettingsFrame
from pipecat.transcriptions.language import Language

from monosemantic import EngineConfig
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(120)
NO_VAD = EngineConfig(vad=None)


@pytest.fixture
def ckpt(nemo_checkpoint):
    return nemo_checkpoint("nemotron_rnnt")


def test_8k_pipeline_with_odd_sized_frames_and_a_language_update(fresh_engines, harness, ckpt, model, speech):
    rate = 8000
    audio = [np.round(soxr.resample(p.astype(np.float32), 16000, rate)).clip(-32768, 32767).astype(np.int16) for p in speech[:2]]
    expected = [model.transcribe(p, sample_rate=rate, latency_ms=160).text for p in audio]

    async def main():
        stt = MonosemanticSTTService(model=ckpt, device="cpu", engine_config=NO_VAD)
        async with harness(stt, sample_rate=rate) as h:
            for pcm in audio:
                await h.speech_starts()
                for i in range(0, len(pcm), 333):
                    await h.worker.queue_frame(InputAudioRawFrame(audio=pcm[i:i+333].tobytes(), sample_rate=rate, num_channels=1))
                await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == len(audio))
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=MonosemanticSTTService.Settings(language=Language.FR)))
            await h.say(audio[0])
            await h.wait_for(lambda: len(h.finals()) == 3)
            await h.end()
            return h

    h = asyncio.run(main())
    assert [f.text for f in h.finals()][:2] == expected
    assert h.finals()[2].language == Language.FR
