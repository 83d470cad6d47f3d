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
from livekit.agents.stt import SpeechEventType as stt_events
from livekit.agents.voice.io import AudioInput

from livekit.plugins import monosemantic as lk_monosemantic

pytestmark = pytest.mark.timeout(240)


class FramesInput(AudioInput):
    """Audio input without a room: real-time 20 ms frames of a clip, then silence until closed."""

    def __init__(self, frames: list[rtc.AudioFrame], on_frame=None):
        """`on_frame(i)` is called as frame `i` is handed to the session."""
        super().__init__(label="test-frames")
        self._frames = frames
        self._i = 0
        self._silence = rtc.AudioFrame(bytes(640), 16000, 1, 320)
        self._on_frame = on_frame

    async def __anext__(self) -> rtc.AudioFrame:
        await asyncio.sleep(0.02 / 2)  # twice real time: bounded test time, the engine keeps up
        frame = self._frames[self._i] if self._i < len(self._frames) else self._silence
        if self._on_frame is not None:
            self._on_frame(self._i)
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


class RecordingAgent(Agent):
    """An agent whose STT node records every SpeechEvent the session receives from the plugin."""

    def __init__(self, events: list, **kwargs):
        super().__init__(**kwargs)
        self.stt_events = events

    async def stt_node(self, audio, model_settings):
        async for event in Agent.default.stt_node(self, audio, model_settings):
            self.stt_events.append(event)
            yield event


def test_a_latency_change_mid_session_does_not_cut_the_utterance_it_lands_in(checkpoint, ms_model, audio_clips, lk):
    """stt.update_options(latency_ms=...) while the session listens, just after the user began to speak:
    the engine's VAD reports a start only once the speech has lasted min_speech_ms (250 ms), so the
    stream looked idle, and the plugin flushed there to reopen its engine stream at once: the utterance
    was cut 100 ms in (its first word split across two engine streams, the piece before the cut
    finalized on its own, a turn of its own when it had text). The change waits for the utterance's
    end, a boundary the VAD is sure of."""
    lead = 2.0  # seconds of silence, then speech from its first sample
    speech = audio_clips["61-70968-0000.flac"]
    audio = np.concatenate([np.zeros(int(lead * 16000), np.float32), speech, np.zeros(24000, np.float32)])
    model = ms_model("nemotron_rnnt")
    other = [m for m in model.latency_modes if m != 160][0]
    onset_frame = int(lead * 50)

    async def main():
        stt = lk_monosemantic.STT(model=checkpoint, device="cpu")
        stt.prewarm()
        await asyncio.wait_for(stt._prewarm_task, 60)
        streams, events = [], []
        stream = stt.stream
        stt.stream = lambda **kw: streams.append(stream(**kw)) or streams[-1]
        changed = []

        def on_frame(i):
            if i == onset_frame + 5 and streams and streams[0]._latency is not None:
                stt.update_options(latency_ms=other)  # 100 ms into the speech
                changed.append(i)

        session = AgentSession(stt=stt, llm=StubLLM(), tts=StubTTS(), turn_handling={"turn_detection": "stt"})
        session.input.audio = FramesInput(list(lk.frames(audio)), on_frame=on_frame)
        await session.start(agent=RecordingAgent(events, instructions="Repeat after the user."))
        try:
            await asyncio.sleep(len(audio) / 16000 / 2 + 1.0)
            latency = streams[0]._latency
        finally:
            await session.aclose()
            await stt.aclose()
        return events, changed, streams[0].start_time_offset, latency

    events, changed, offset, latency = asyncio.run(main())
    assert changed, "the stream was not live when the user began to speak"
    finals = [e.alternatives[0] for e in events if e.type == stt_events.FINAL_TRANSCRIPT]
    cuts = sorted({round(t - offset, 3) for f in finals for t in (f.start_time, f.end_time)})
    # no engine flush in the first 350 ms of the speech (the VAD cannot end a segment there)
    assert not [c for c in cuts if lead < c < lead + 0.35], cuts
    assert latency == other  # it took effect at the utterance's end
