"""examples/pipecat_bot.py: it imports without a microphone library, and its transcription pipeline (pipecat's
Silero VAD driving our service, no hand-made VAD frames) turns speech separated by silences into one
printed final per utterance."""

from __future__ import annotations

import asyncio
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from pipecat.frames.frames import VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
from pipecat.processors.filters.identity_filter import IdentityFilter

from monosemantic import EngineConfig
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(180)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipecat_bot.py"


@pytest.fixture(scope="module")
def bot():
    spec = importlib.util.spec_from_file_location("pipecat_bot", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no pyaudio needed to import: the transport is imported when run
    return module


def test_defaults_transcribe_only(bot):
    args = bot.parse_args([])
    assert args.agent is None and args.latency_ms == 160


def test_the_agent_mode_says_what_it_needs(bot, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="OPENAI_API_KEY|pipecat-ai\\[openai\\]"):
        bot.agent_processors("openai")


def test_transcription_pipeline_on_speech_with_silences(bot, fresh_engines, harness, nemo_checkpoint, speech):
    silence = np.zeros(16000, dtype=np.int16)
    audio = np.concatenate([silence] + [part for pcm in speech for part in (pcm, silence)])
    out = io.StringIO()

    async def main():
        ckpt = nemo_checkpoint("nemotron_rnnt")
        stt = MonosemanticSTTService(model=ckpt, device="cpu", engine_config=EngineConfig(vad=None))
        async with harness(*bot.build_processors(IdentityFilter(), stt, out=out), sample_rate=16000) as h:
            await h.audio(audio)
            await h.wait_for(lambda: len(h.down.of(VADUserStoppedSpeakingFrame)) >= len(speech))
            await h.wait_for(lambda: len(h.finals()) >= len(h.down.of(VADUserStoppedSpeakingFrame)))
            await asyncio.sleep(0.3)  # a second final for one turn would arrive now
            per_turn = [f.text for f in h.finals()]
            await h.end()  # flushes the trailing silence too (nothing pushed goes untranscribed)
            return h, per_turn

    h, per_turn = asyncio.run(main())
    turns = len(h.down.of(VADUserStartedSpeakingFrame))
    assert turns == len(h.down.of(VADUserStoppedSpeakingFrame)) >= len(speech)  # Silero may split a clip
    assert len(per_turn) == turns and all(per_turn)
    lines = out.getvalue().replace("\r", "\n").splitlines()
    printed = [line[2:].removesuffix("\033[K") for line in lines if line.startswith("> ")]
    assert printed == [f.text for f in h.finals()] and not h.errors()


def test_the_bot_reaches_a_server_that_wants_a_key(bot, harness, ms_model, speech, monkeypatch):
    """`--url` with `--api-key`: the bot's service opens its stream on a server started with a key (the
    README points every example at a `monosemantic serve`; the bot had no way to pass the key but the
    environment, and `--api-key` was an unrecognized argument)."""
    from _support.server import RunningServer

    monkeypatch.delenv("MONOSEMANTIC_API_KEY", raising=False)
    with RunningServer(ms_model("nemotron_rnnt"), api_key="k3y") as server:
        args = bot.parse_args(["--url", f"ws://127.0.0.1:{server.port}", "--api-key", "k3y"])

        async def main():
            async with harness(*bot.build_processors(IdentityFilter(), bot.build_stt(args), out=io.StringIO())) as h:
                await h.say(speech[0])
                await h.wait_for(lambda: h.finals() or h.errors())
                await h.end()
                return h

        h = asyncio.run(main())
    assert h.finals() and not h.errors(), [e.error for e in h.errors()]
