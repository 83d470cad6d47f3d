"""Streams open in the background, a settings change's new stream too: against a fake `monosemantic serve`
endpoint on loopback whose handshakes the test holds back, nothing waits for an open, the audio and
flushes received meanwhile reach the new stream (or, if it cannot open, the old one) in order, and a
setting changed while a stream opened applies before the next utterance. The same endpoint (`FakeServer`)
serves tests that need a server's exact answers (an empty final, a cut, a clean end unasked)."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
from pipecat.frames.frames import InputAudioRawFrame, STTUpdateSettingsFrame, VADUserStartedSpeakingFrame

from _support.fake_server import FakeServer, fake_server
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(60)

Settings = MonosemanticSTTService.Settings


def pcm(seconds: float) -> np.ndarray:
    return (np.arange(int(16000 * seconds)) % 200 + 1).astype(np.int16)


def update(**fields) -> STTUpdateSettingsFrame:
    return STTUpdateSettingsFrame(delta=Settings(**fields))


@contextlib.asynccontextmanager
async def remote_service(harness, recorder: FakeServer, **kwargs):
    """A remote MonosemanticSTTService against `recorder` on loopback, in the pipeline harness."""
    async with fake_server(recorder) as url:
        stt = MonosemanticSTTService(base_url=url, **kwargs)
        async with harness(stt, sample_rate=16000) as h:
            yield stt, h


async def change_latency_after_an_utterance(h, recorder: FakeServer) -> None:
    """One utterance of 0.5 s and its Final, then latency 80: the new stream's connection is made."""
    await h.say(pcm(0.5))
    await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
    await h.worker.queue_frame(update(latency_ms=80))
    await h.wait_for(lambda: len(recorder.connections) == 2, timeout=5)


async def change_latency_in_an_utterance(h, stt, recorder: FakeServer, more: float = 0.0) -> None:
    """Speech of 0.4 s, latency 80 (taken), `more` seconds of speech, the speech stops: the utterance
    finishes on the old stream and the new stream's connection is made."""
    await h.speech_starts()
    await h.audio(pcm(0.4))
    await h.worker.queue_frame(update(latency_ms=80))
    await h.wait_for(lambda: stt.settings.latency_ms == 80, timeout=5)
    if more:
        await h.audio(pcm(more))
    await h.speech_stops()  # the old stream finishes this utterance; the new one opens
    await h.wait_for(lambda: len(recorder.connections) == 2, timeout=5)


def check_the_utterance_ran_in_the_new_mode(recorder: FakeServer, h) -> None:
    """The one utterance of 0.5 s went to a second stream, opened in the 80 ms mode, without errors."""
    assert [c.latency_ms for c in recorder.connections] == ["160", "80"]
    assert [f.text for f in h.finals()] == ["c1:16000"] and not h.errors()


def test_a_latency_change_whose_new_stream_never_answers_holds_up_nothing(harness):
    """A latency change between utterances opens the new stream at once, in remote mode on a new
    connection. It used to open on the frame path, holding the lock that every audio frame takes: a
    server that never answered the handshake stalled audio, VAD frames and cancel for the client's
    connect timeout (10 s). It opens in the background now."""
    recorder = FakeServer(hold={1: asyncio.Event()})  # the second connection is never answered

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await change_latency_after_an_utterance(h, recorder)
            await h.speech_starts()
            await h.audio(pcm(0.2))  # 10 frames of 20 ms
            frames = lambda: len(h.down.of(InputAudioRawFrame)) == 25 + 10 and len(h.down.of(VADUserStartedSpeakingFrame)) == 2
            await h.wait_for(frames, timeout=3.0)
            assert stt._opening is not None and not h.errors()  # the attempt is still going on
            await h.cancel(timeout=3.0)
            return h

    h = asyncio.run(main())
    assert [f.text for f in h.finals()] == ["c0:16000"] and not h.errors()


def test_audio_during_a_latency_changes_open_reaches_the_new_stream_in_order(harness):
    """The utterance in progress when the change arrives finishes on the old stream; the next one's audio
    and flush, received while the new stream opens, go to it once it opens, in order, and its Final
    comes after the old stream's. The old stream is closed after its Final."""
    release = asyncio.Event()
    recorder = FakeServer(hold={1: release})

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await change_latency_in_an_utterance(h, stt, recorder, more=0.2)
            await h.say(pcm(0.6))  # kept while the new stream opens
            await h.speech_starts()
            await h.audio(pcm(0.3))  # and this, not flushed yet
            await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == 20 + 10 + 30 + 15, timeout=5)
            assert [f.text for f in h.finals()] == ["c0:19200"]
            release.set()
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            assert stt._session.latency_ms == 80 and recorder.connections[0].closed
            await h.end(timeout=10)  # flushes the last 0.3 s
            return h

    h = asyncio.run(main())
    assert recorder.connections[1].latency_ms == "80"
    assert [f.text for f in h.finals()] == ["c0:19200", "c1:19200", "c1:9600"]
    assert [f.finalized for f in h.finals()[1:]] == [False, True]  # the second came as the user spoke
    assert recorder.connections[1].received == [640] * 30 + ["flush"] + [640] * 15 + ["flush"]
    assert not h.errors()


def test_a_new_stream_that_cannot_open_leaves_the_old_one_the_audio_kept_for_it(harness):
    """If the stream for new settings is refused after audio was kept for it, the old stream carries on
    with that audio (nothing lost, in order), the setting goes back, and one ErrorFrame says so."""
    release = asyncio.Event()
    recorder = FakeServer(hold={1: release}, refuse=(1,))

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await change_latency_after_an_utterance(h, recorder)
            await h.say(pcm(0.6))  # kept while the new stream opens
            await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == 25 + 30, timeout=5)
            release.set()  # and now it is refused
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            assert stt.settings.latency_ms == 160 and stt._session.latency_ms == 160
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    assert [f.text for f in h.finals()] == ["c0:16000", "c0:19200"]
    (error,) = h.errors()
    assert "cannot apply latency_ms=80" in error.error and "keeping latency_ms=160" in error.error
    assert not error.fatal


@pytest.mark.parametrize("failure", ["refused", "dies at once"])
def test_a_settings_changes_stream_that_fails_is_a_connection_error_as_any_failed_open(harness, failure):
    """A stream that cannot open raised on_connection_error when it was the service's only stream, but
    none when it was the stream for new settings (the old one carrying on): an application watching the
    connection (alerting, a failover) never heard of that failure. Both are now reported the same way,
    once; one that opens and dies at once is too (its event task reports it, as for any stream)."""
    recorder = FakeServer(refuse=(1,) if failure == "refused" else ())

    async def main():
        async with fake_server(recorder) as url:
            stt = MonosemanticSTTService(base_url=url)
            seen: list[str] = []

            @stt.event_handler("on_connection_error")
            async def on_connection_error(service, error):
                seen.append(error)

            async with harness(stt, sample_rate=16000) as h:
                await h.say(pcm(0.5))
                await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
                if failure == "dies at once":
                    recorder.then = "abort"  # from the next connection on: ready, then cut
                await h.worker.queue_frame(update(latency_ms=80))
                await h.wait_for(lambda: h.errors() and seen, timeout=5)  # the handlers run as tasks
                if failure == "refused":  # the old stream carries on
                    await h.say(pcm(0.6))
                    await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
                await h.end(timeout=10)
                return stt, h, seen

    stt, h, seen = asyncio.run(main())
    (error,) = h.errors()
    assert not error.fatal
    (connection_error,) = seen
    if failure == "refused":
        assert [f.text for f in h.finals()] == ["c0:16000", "c0:19200"] and stt.settings.latency_ms == 160
        assert "cannot apply latency_ms=80" in error.error
        assert connection_error == "could not open a recognition stream: the server refused the stream: HTTP 400"
    else:
        assert "connection lost" in connection_error, connection_error


def test_a_latency_change_while_the_stream_opens_applies_before_the_next_utterance(harness):
    """A change that arrives while the service's stream is still opening (at start, or after a lost
    connection) found no stream to replace, and the stream opened with the old setting; the next
    utterance then ran in the old mode although it started after the change. The service now replaces
    that stream at once when it opens between utterances."""
    release = asyncio.Event()
    recorder = FakeServer(hold={0: release})

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.wait_for(lambda: len(recorder.connections) == 1, timeout=5)
            await h.worker.queue_frame(update(latency_ms=80))
            await h.wait_for(lambda: stt.settings.latency_ms == 80, timeout=5)
            release.set()
            await h.wait_for(lambda: stt._session is not None, timeout=5)
            await h.say(pcm(0.5))
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.end(timeout=10)
            return h

    check_the_utterance_ran_in_the_new_mode(recorder, asyncio.run(main()))


def test_a_latency_change_during_an_utterance_without_audio_applies_at_its_end(harness):
    """A change that arrives mid-utterance waits for the utterance's end. When no audio was pushed in
    that utterance (the service muted, as while the bot speaks) there was nothing to flush, and the
    stream was not replaced either: the next utterance ran in the old mode."""
    from pipecat.frames.frames import STTMuteFrame

    recorder = FakeServer()

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.wait_for(lambda: stt._session is not None, timeout=5)
            await h.worker.queue_frame(STTMuteFrame(mute=True))
            await h.speech_starts()
            await h.audio(pcm(0.2))  # muted: not sent
            await h.worker.queue_frame(update(latency_ms=80))
            await h.wait_for(lambda: stt.settings.latency_ms == 80, timeout=5)
            await h.speech_stops()
            await h.worker.queue_frame(STTMuteFrame(mute=False))
            await h.wait_for(lambda: stt._session is not None and stt._session.latency_ms == 80, timeout=5)
            await h.say(pcm(0.5))
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.end(timeout=10)
            return h

    check_the_utterance_ran_in_the_new_mode(recorder, asyncio.run(main()))


@pytest.mark.parametrize("answers", [True, False])
def test_end_frame_during_a_latency_changes_open(harness, answers):
    """EndFrame while the new stream opens, with audio kept for it: the open is waited for within
    `stop_timeout` and the kept audio transcribed on it; if it does not open in time, one ErrorFrame says
    the kept audio was not transcribed, and the old stream still delivers its last Final."""
    release = asyncio.Event()
    recorder = FakeServer(hold={1: release})

    async def main():
        async with remote_service(harness, recorder, stop_timeout=1.0) as (stt, h):
            await change_latency_in_an_utterance(h, stt, recorder)
            await h.say(pcm(0.6))  # kept while the new stream opens
            await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == 20 + 30, timeout=5)
            if answers:
                asyncio.get_running_loop().call_later(0.3, release.set)
            await h.end(timeout=10)
            return stt, h

    stt, h = asyncio.run(main())
    assert not stt._sessions and stt._opening is None and stt._swap_from is None
    if answers:
        assert [f.text for f in h.finals()] == ["c0:12800", "c1:19200"] and not h.errors()
    else:
        assert [f.text for f in h.finals()] == ["c0:12800"]
        (error,) = h.errors()
        assert "no recognition stream opened within 1.0 s" in error.error and "0.6 s" in error.error


def test_a_service_run_again_after_its_pipeline_ended_reconnects(harness):
    """A service object can serve a second pipeline after the first one ended (pipecat sets it up and
    starts it again; an in-process service does). In remote mode the first run's cleanup closed its
    RemoteEngine for good, so every open of the second run failed ("this RemoteEngine is closed"), one
    ErrorFrame after another, and nothing was transcribed."""
    recorder = FakeServer()

    async def main():
        async with fake_server(recorder) as url:
            stt = MonosemanticSTTService(base_url=url)
            runs = []
            for _ in range(2):
                async with harness(stt, sample_rate=16000) as h:
                    await h.say(pcm(0.5))
                    await h.wait_for(lambda: len(h.finals()) == 1 or h.errors(), timeout=10)
                    await h.end(timeout=10)
                runs.append(h)
            return runs

    runs = asyncio.run(main())
    assert [[f.text for f in h.finals()] for h in runs] == [["c0:16000"], ["c1:16000"]]
    assert not any(h.errors() for h in runs)


def test_a_final_with_no_text_reports_no_ttfb(harness):
    """A flush whose Final has no text (a cough, a VAD false start) pushes no transcript. It used to stop
    the TTFB measurement all the same, reporting a TTFB for a transcript that never came (the quickest
    finals of all, pulling the figures down); Pipecat's base class and its services abandon the
    measurement when no transcript comes, and so does the service now."""
    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import TTFBMetricsData

    class FirstBlank(FakeServer):
        def final_text(self, conn, pending):
            self.flushes = getattr(self, "flushes", 0) + 1
            return "" if self.flushes == 1 else super().final_text(conn, pending)

    recorder = FirstBlank()

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.say(pcm(0.3))
            await h.wait_for(lambda: getattr(recorder, "flushes", 0) == 1, timeout=10)
            await h.say(pcm(0.5))
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    assert [f.text for f in h.finals()] == ["c0:16000"] and not h.errors()
    ttfb = [d for m in h.down.of(MetricsFrame) for d in m.data if isinstance(d, TTFBMetricsData) and d.value > 0]
    assert len(ttfb) == 1  # the second utterance's, measured to its transcript


def test_a_connection_lost_mid_utterance_is_one_error_and_the_audio_after_it_goes_to_a_new_stream(harness):
    """Audio frames that met the lost connection before the stream's event task had seen it each failed
    with their own ErrorFrame ("audio frame not transcribed", one per 20 ms frame) and were dropped; the
    event task's own error did not say that the utterance in progress was lost. Now the loss is one
    ErrorFrame saying so, and the frames after it go to a new stream."""
    recorder = FakeServer(cut_after={0: 6400})  # cut (no close frame) after 0.2 s of audio

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.wait_for(lambda: stt._session is not None, timeout=5)
            await h.speech_starts()
            await h.audio(pcm(0.4))  # cut after 0.2 s
            await h.speech_stops()
            await h.wait_for(lambda: h.errors(), timeout=10)
            await h.say(pcm(0.5))
            await h.wait_for(lambda: h.finals() and h.finals()[-1].text.endswith(":16000"), timeout=10)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    (error,) = h.errors()
    assert "connection to the server was lost" in error.error and "not transcribed" in error.error
    # The frames that met the lost connection went to the new one, ahead of the next utterance (a few that
    # the dying connection still took are lost with it, as the error says).
    assert recorder.audio(1) > 16000


def test_a_final_that_comes_after_the_user_spoke_again_is_not_finalized(harness):
    """Pipecat's turn strategies read a finalized TranscriptionFrame as "the STT has nothing more to
    send": Smart Turn's ends the turn at once if it judges it complete. An utterance's final that came
    late, after the user had started speaking again, was pushed finalized all the same, so the next VAD
    stop could end the turn before the transcript of what the user said after it. Deepgram's service
    marks a final finalized only for a finalize requested since the last VADUserStartedSpeakingFrame;
    this one now only when the user is not speaking (or the pipeline is ending)."""
    late = asyncio.Event()

    class LateFirstFinal(FakeServer):
        async def before_final(self, conn):
            if not getattr(self, "delayed", False):
                self.delayed = True
                await late.wait()

    recorder = LateFirstFinal()

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.say(pcm(0.5))
            await h.wait_for(lambda: getattr(recorder, "delayed", False), timeout=10)
            await h.speech_starts()  # the user speaks again before the first final came
            await h.audio(pcm(0.3))
            await h.wait_for(lambda: stt._in_utterance, timeout=5)
            late.set()
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    assert [(f.text, f.finalized) for f in h.finals()] == [("c0:16000", False), ("c0:9600", True)]
    assert not h.errors()


class HoldsFirstFinal(FakeServer):
    """A FakeServer that answers its first flush only once `release` is set (a final still in flight while
    the user says something short and stops again)."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()
        self.release_second = asyncio.Event()
        self.release_second.set()
        self.holding = False
        self.flushes = 0

    async def before_final(self, conn):
        self.flushes += 1
        if self.flushes == 1:
            self.holding = True
            await self.release.wait()
        elif self.flushes == 2:
            await self.release_second.wait()


async def two_utterances_the_first_final_late(h, stt, recorder: HoldsFirstFinal) -> None:
    """0.5 s of speech and its VAD stop, then 0.3 s more and its stop, all before the first final comes."""
    await h.say(pcm(0.5))
    await h.wait_for(lambda: recorder.holding, timeout=10)
    await h.say(pcm(0.3))
    await h.wait_for(lambda: stt._session is not None and stt._session.outstanding == 2, timeout=5)
    recorder.release.set()


def test_a_final_that_comes_while_another_flush_is_owed_is_not_finalized(harness):
    """The user paused, spoke a few words and stopped again before the first utterance's final came. That
    final was pushed finalized (the user was not speaking at that moment, and pipecat's finalize
    handshake, requested at the second stop, was confirmed by it), and reported the second stop's TTFB:
    turn strategies took it for the end of what the user said, and the second final, still to come, went
    to the next turn. Only the final that answers the last flush owed is finalized now, and the TTFB is
    measured to it."""
    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import TTFBMetricsData

    recorder = HoldsFirstFinal()
    recorder.release_second.clear()

    def ttfbs(h) -> int:
        return sum(isinstance(d, TTFBMetricsData) and d.value > 0 for m in h.down.of(MetricsFrame) for d in m.data)

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await two_utterances_the_first_final_late(h, stt, recorder)
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await asyncio.sleep(0.1)
            before_second = ttfbs(h)  # a TTFB is a system frame: it would be here before the final it ends at
            recorder.release_second.set()
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            await h.end(timeout=10)
            return h, before_second

    h, before_second = asyncio.run(main())
    assert [(f.text, f.finalized) for f in h.finals()] == [("c0:16000", False), ("c0:9600", True)]
    assert before_second == 0 and ttfbs(h) == 1 and not h.errors()


def test_a_user_turn_holds_both_finals_when_the_first_comes_after_the_second_stop(harness):
    """The same in a pipeline with pipecat's user context aggregator and a turn-analyzer stop strategy
    (Smart Turn's, the default, ends a complete turn at a finalized transcript): the turn held only the
    first final's words and the second's started a turn of their own."""
    from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, BaseTurnParams, EndOfTurnState
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    class Complete(BaseTurnAnalyzer):
        """Judges every VAD stop the end of a complete turn (as Smart Turn does a finished sentence)."""

        speech_triggered = False
        params = BaseTurnParams()

        def append_audio(self, buffer, is_speech):
            return EndOfTurnState.INCOMPLETE

        async def analyze_end_of_turn(self):
            return EndOfTurnState.COMPLETE, None

        def clear(self):
            pass

    recorder = HoldsFirstFinal()
    turns: list[str] = []

    async def main():
        strategies = UserTurnStrategies(stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=Complete())])
        pair = LLMContextAggregatorPair(
            LLMContext(), user_params=LLMUserAggregatorParams(user_turn_strategies=strategies)
        )

        @pair.user().event_handler("on_user_turn_stopped")
        async def on_stopped(aggregator, strategy, message):
            turns.append(message.content)

        async with fake_server(recorder) as url:
            # A p99 well above this test's finals: the strategies' safety net does not end the turn itself.
            stt = MonosemanticSTTService(base_url=url, ttfs_p99_latency=3.0)
            async with harness(stt, pair.user(), sample_rate=16000) as h:
                await two_utterances_the_first_final_late(h, stt, recorder)
                await h.wait_for(lambda: turns, timeout=10)
                await asyncio.sleep(0.3)
                await h.end(timeout=10)

    asyncio.run(main())
    assert turns == ["c0:16000 c0:9600"]


class PartialThenCut(FakeServer):
    """A FakeServer whose first connection answers its first audio with a partial, and is cut (no close
    frame) at the first audio after `cut` is set."""

    def __init__(self):
        super().__init__()
        self.cut = asyncio.Event()

    async def after_audio(self, conn, ws):
        if conn.n != 0:
            return
        if self.cut.is_set():
            conn.abort()
        elif len(conn.received) == 1:
            await ws.send_json({"type": "partial", "text": "he", "stable_text": "he"})


@pytest.mark.parametrize("frame_rate", [16000, 24000])
def test_a_flush_on_a_connection_that_just_died_is_one_error(harness, frame_rate):
    """The connection dies while the stream's event task is still busy with an earlier event (here a
    partial it pushes), and the VAD stop comes before that task has seen the loss: the flush failed
    ("could not finalize the utterance"), as did the push of the resampler's tail at a frame rate that
    needs resampling ("the end of the utterance was not transcribed"), each with an ErrorFrame of its
    own, and the event task then reported the same loss again. The event task's report is the one now."""
    partial_pushed, release = asyncio.Event(), asyncio.Event()
    finalized = asyncio.Event()

    class Service(MonosemanticSTTService):
        async def _on_partial(self, event):
            partial_pushed.set()
            await release.wait()  # the event task lags behind its connection
            await super()._on_partial(event)

        async def _finalize(self):
            await super()._finalize()
            finalized.set()

    recorder = PartialThenCut()

    async def main():
        async with fake_server(recorder) as url:
            stt = Service(base_url=url)
            async with harness(stt, sample_rate=16000) as h:
                await h.wait_for(lambda: stt._session is not None, timeout=5)
                stream = stt._session.stream
                await h.speech_starts()
                audio = pcm(0.1 * frame_rate / 16000)  # 100 ms at the frames' rate
                await h.audio(audio, rate=frame_rate)
                await asyncio.wait_for(partial_pushed.wait(), 5)
                recorder.cut.set()
                await h.audio(audio, rate=frame_rate)  # the connection is cut
                await h.wait_for(lambda: stream._gone is not None, timeout=5)  # the client has seen it
                await h.speech_stops()
                await asyncio.wait_for(finalized.wait(), 5)
                release.set()
                await h.wait_for(lambda: h.errors(), timeout=5)
                await h.say(pcm(0.5))
                await h.wait_for(lambda: h.finals() and h.finals()[-1].text.startswith("c1:"), timeout=10)
                await h.end(timeout=10)
                return h

    h = asyncio.run(main())
    (error,) = h.errors()
    assert "connection to the server was lost" in error.error and "not transcribed" in error.error


def test_a_non_fatal_server_error_closes_the_stream_it_drops_and_loses_no_audio(harness):
    """A non-fatal error (docs/protocol.md: the server refused a message, or is shutting down; the stream
    carries on) made the service drop its stream without closing it: the connection, and its slot on the
    server, stayed open and unused until the server's idle timeout, and the audio of the utterance in
    progress pushed to it was never flushed (the ErrorFrame said it was not transcribed). The dropped
    stream is now retired: flushed, closed after its final. The audio after the error goes to a new
    stream, so the utterance's audio is all transcribed, in two finals."""

    class RefusesOnce(FakeServer):
        async def after_audio(self, conn, ws):
            if conn.n == 0 and len(conn.received) == 5:
                await ws.send_json({"type": "error", "code": "bad_audio", "message": "refused", "fatal": False})

    recorder = RefusesOnce()

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.wait_for(lambda: stt._session is not None, timeout=5)
            await h.speech_starts()
            await h.audio(pcm(0.4))
            await h.wait_for(lambda: len(recorder.connections) == 2 and recorder.connections[0].closed, timeout=5)
            await h.speech_stops()
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    first, second = recorder.connections
    assert first.received[-1] == "flush" and first.closed
    assert sorted(f.text for f in h.finals()) == [f"c0:{recorder.audio(0)}", f"c1:{recorder.audio(1)}"]
    assert recorder.audio(0) + recorder.audio(1) == 12800  # nothing lost
    (error,) = h.errors()
    assert "bad_audio" in error.error and "not transcribed" not in error.error and not error.fatal


def usage_seconds(h) -> float:
    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import STTUsageMetricsData

    return sum(d.value.audio_seconds for m in h.down.of(MetricsFrame) for d in m.data if isinstance(d, STTUsageMetricsData))


def test_usage_counts_the_keepalive_silence_sent(harness):
    """Usage metrics say how much audio went to the recognizer (what a hosted STT bills). The keepalive
    silence sent while no audio came was not counted, although it is transcribed audio all the same (and
    pipecat's WebsocketSTTService counts its keepalives)."""
    recorder = FakeServer()

    async def main():
        async with remote_service(harness, recorder, keepalive_timeout=0.2, keepalive_interval=0.05) as (stt, h):
            await h.say(pcm(0.5))
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.wait_for(lambda: recorder.audio(0) >= 16000 + 2 * 3200, timeout=5)  # two keepalives went
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    assert recorder.audio(0) > 16000 and usage_seconds(h) == pytest.approx(recorder.audio(0) / 32000, abs=1e-6)


def test_usage_does_not_count_audio_kept_for_a_stream_that_did_not_open(harness):
    """Audio received while a stream opened is kept for it; if the open fails, it is not transcribed (an
    ErrorFrame says so). It was counted in the usage metrics all the same, as if it had been sent."""
    release = asyncio.Event()
    recorder = FakeServer(hold={0: release}, refuse=(0,))

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.say(pcm(0.3))  # kept while the stream opens
            await h.wait_for(lambda: len(h.down.of(InputAudioRawFrame)) == 15, timeout=5)
            release.set()  # and now it is refused
            await h.wait_for(lambda: h.errors(), timeout=5)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    (error,) = h.errors()
    assert "0.3 s of audio received while it was opening were not transcribed" in error.error
    assert usage_seconds(h) == 0.0


@pytest.mark.parametrize("ending", ["a fatal error", "a lost connection"])
def test_a_stream_that_dies_while_its_open_completes_is_one_error(harness, ending):
    """A stream whose connection opens and then dies before the service has taken it as its stream (the
    open is still completing) is a failed open, reported once. Its event task reported the end too, so
    the user got two ErrorFrames for one failure (only one of them counted as a failed attempt)."""

    if ending == "a fatal error":
        error = {"type": "error", "code": "internal", "message": "broken", "fatal": True}
        dies_at_once = FakeServer(script=[error], then="close", close_code=1011, close_reason="internal")
    else:
        dies_at_once = FakeServer(then="abort")

    class Service(MonosemanticSTTService):
        async def _open_session(self, after=None):
            session = await super()._open_session(after)
            await asyncio.wait_for(session.done.wait(), 5)  # its events end before the open completes
            return session

    async def main():
        async with fake_server(dies_at_once) as url:
            stt = Service(base_url=url)
            async with harness(stt, sample_rate=16000) as h:
                await h.audio(pcm(0.1))
                await h.wait_for(lambda: h.errors(), timeout=5)
                await h.wait_for(lambda: stt._opening is None, timeout=5)
                await h.end(timeout=10)
                return stt, h

    stt, h = asyncio.run(main())
    (error,) = h.errors()
    assert "could not open a recognition stream" in error.error and not error.fatal
    assert stt._open_failures == 1


def test_a_stream_the_server_ends_unasked_is_an_error_and_the_next_audio_reopens(harness):
    """A stream that has worked for a while and that the server then ends cleanly, unasked and without
    an error message (a close frame with code 1000: a proxy, a server of another make), was dropped
    without a word: only an end right after opening was reported. The user never learnt that the
    audio of the utterance in progress was not transcribed. Now a non-fatal ErrorFrame says so, and
    the audio after the end goes to a new stream, as after any lost connection."""

    class EndsMidUtterance(FakeServer):
        async def after_audio(self, conn, ws):
            if conn.n == 0 and conn.received.count("flush") == 1:
                await ws.close()  # in the second utterance, at its first audio: code 1000, no error message

    recorder = EndsMidUtterance()

    async def main():
        async with remote_service(harness, recorder) as (stt, h):
            await h.say(pcm(0.5))
            await h.wait_for(lambda: len(h.finals()) == 1, timeout=10)
            await h.say(pcm(0.4))
            await h.wait_for(lambda: len(h.finals()) == 2, timeout=10)
            await h.end(timeout=10)
            return h

    h = asyncio.run(main())
    (error,) = h.errors()
    assert "the server ended the recognition stream" in error.error and "not transcribed" in error.error
    assert not error.fatal
    assert [f.text for f in h.finals()] == ["c0:16000", f"c1:{recorder.audio(1)}"] and recorder.audio(1) > 0
