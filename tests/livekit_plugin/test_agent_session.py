"""A real AgentSession (no room) hearing real speech through the plugin: the user's words reach the
session's transcription events and the (stub) LLM, with turn_detection "stt" (turns from the plugin's
START/END) and "vad" (turns from LiveKit's Silero VAD, which flushes the plugin)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import Agent, AgentSession, llm, tts
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.agents.voice.io import AudioInput

from livekit.plugins import monosemantic as lk_monosemantic

pytestmark = pytest.mark.timeout(240)


class FramesInput(AudioInput):
    """Audio input without a room: real-time 20 ms frames of a clip, then silence until closed."""

    def __init__(self, frames: list[rtc.AudioFrame]):
        super().__init__(label="test-frames")
        self._frames = frames
        self._i = 0
        self._silence = rtc.AudioFrame(bytes(640), 16000, 1, 320)

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02 / 2)  # twice real time: bounded test time, the engine keeps up
        frame = self._frames[self._i] if self._i < len(self._frames) else self._silence
        self._i += 1
        return frame


class StubLLM(llm.LLM):
    """Answers every turn with one fixed sentence and records what it was asked."""

    def __init__(self):
        super().__init__()
        self.requests: list[str] = []

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **_):
        user = [m.text_content for m in chat_ctx.messages() if m.role == "user"]
        self.requests.append(user[-1] if user else "")
        return _StubLLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _StubLLMStream(llm.LLMStream):
    async def _run(self) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id="stub", delta=llm.ChoiceDelta(role="assistant", content="Okay.")))


class StubTTS(tts.TTS):
    """100 ms of silence for any text."""

    def __init__(self):
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=16000, num_channels=1)

    def synthesize(self, text, *, conn_options=DEFAULT_API_CONNECT_OPTIONS):
        return _StubChunkedStream(tts=self, input_text=text, conn_options=conn_options)


class _StubChunkedStream(tts.ChunkedStream):
    async def _run(self, output_emitter) -> None:
        output_emitter.initialize(request_id="stub", sample_rate=16000, num_channels=1, mime_type="audio/pcm")
        output_emitter.push(bytes(3200))
        output_emitter.flush()


@pytest.mark.parametrize("turn_detection", ["stt", "vad"])
def test_session_transcribes_the_user(checkpoint, ms_model, audio_clips, lk, turn_detection):
    audio = np.concatenate([np.zeros(8000, np.float32), audio_clips["jfk.wav"]])
    model = ms_model("nemotron_rnnt")

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        stub_llm = StubLLM()
        vad = None
        if turn_detection == "vad":
            from livekit.plugins import silero

            vad = silero.VAD.load()
        session = AgentSession(
            stt=stt, llm=stub_llm, tts=StubTTS(), vad=vad, turn_handling={"turn_detection": turn_detection}
        )
        finals, interims, states, committed = [], [], [], []
        session.on("user_input_transcribed", lambda ev: (finals if ev.is_final else interims).append(ev.transcript))
        session.on("user_state_changed", lambda ev: states.append(ev.new_state))
        session.on(
            "conversation_item_added",
            lambda ev: committed.append(ev.item.text_content) if ev.item.role == "user" else None,
        )
        session.input.audio = FramesInput(list(lk.frames(audio)))
        await session.start(agent=Agent(instructions="Repeat after the user."))
        try:
            deadline = asyncio.get_running_loop().time() + 90
            while not committed and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
        finally:
            await session.aclose()
            await stt.aclose()
        return finals, interims, states, committed, stub_llm.requests

    finals, interims, states, committed, requests = asyncio.run(main())
    assert finals and all(f for f in finals), (finals, interims)
    heard = " ".join(finals)
    # the session heard the speech, through the plugin's FINALs (utterances cut at the VAD's pauses:
    # every word the model finds offline appears, in order, in what the session got)
    assert heard.split()[:1] == model.transcribe(audio_clips["jfk.wav"], latency_ms=160).text.split()[:1]
    # the turn the session committed is the user's transcript, and the LLM was asked with it (possibly
    # first preemptively, with the PREFLIGHT text: a prefix of it)
    assert committed and committed[0].startswith(finals[0]) and committed[0] in heard
    assert requests and committed[0].startswith(requests[0]) and requests[0]
    assert "speaking" in states and "listening" in states
