"""Remote mode: `MonosemanticSTTService(base_url=...)` against a real `monosemantic serve` app on loopback
gives the same transcripts as in-process; a server that goes away is a non-fatal ErrorFrame and the
service reconnects; a wrong key is a permanent error, not a retry loop; an unreachable server is retried
with a doubling backoff. While muted, silence keeps the connection open; a model change is refused
(the server's model is fixed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pipecat.frames.frames import InterimTranscriptionFrame, STTMuteFrame, STTUpdateSettingsFrame

from _support.server import RunningServer
from pipecat_monosemantic import MonosemanticSTTService

pytestmark = pytest.mark.timeout(240)


def test_remote_finals_equal_offline_transcription(harness, model, speech):
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]

    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}", api_key="k3y")
        async with harness(stt, sample_rate=16000) as h:
            for n, pcm in enumerate(speech[:2], 1):
                await h.say(pcm)
                await h.wait_for(lambda: len(h.finals()) == n)
            await h.end()
            return h

    with RunningServer(model, api_key="k3y") as server:
        h = asyncio.run(main(server.port))
    assert [f.text for f in h.finals()] == expected
    assert h.down.of(InterimTranscriptionFrame) and not h.errors()


def test_server_going_away_is_a_non_fatal_error_and_the_service_reconnects(harness, model, speech):
    expected = model.transcribe(speech[1], latency_ms=160).text
    server = RunningServer(model)

    async def main():
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{server.port}")
        async with harness(stt, sample_rate=16000) as h:
            await h.speech_starts()
            await h.audio(speech[0][:16000])
            await h.wait_for(lambda: h.down.of(InterimTranscriptionFrame))
            await asyncio.to_thread(server.__exit__)  # the server vanishes mid-utterance
            await h.wait_for(lambda: h.errors())
            await h.speech_stops()
            await asyncio.to_thread(server.restart)  # same port: the next audio reconnects
            await asyncio.sleep(1.1)  # the service's reopen backoff
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await h.end()
            return h

    with server:  # (its __exit__ after one inside the test is a no-op)
        h = asyncio.run(main())
    (error,) = h.errors()
    assert not error.fatal and "shutting down" in error.error
    # A server shutting down drains its streams: the interrupted utterance still gets its final (no
    # audio lost), so the error does not claim otherwise; the next utterance runs on the new server.
    drained, final = h.finals()
    assert drained.text and "not transcribed" not in error.error
    assert final.text == expected


def test_wrong_key_is_a_permanent_error_not_a_retry_loop(harness, model, speech):
    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}", api_key="wrong")
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0][:8000])
            await h.end(timeout=30)
            return stt, h

    with RunningServer(model, api_key="right") as server:
        stt, h = asyncio.run(main(server.port))
    errors = h.errors()
    assert len(errors) == 1 and ("401" in errors[0].error or "unauthorized" in errors[0].error.lower())
    assert not stt.is_usable and h.finals() == []


def test_an_unreachable_server_is_retried_with_a_doubling_backoff(harness, speech, monkeypatch):
    """While the server stays down, each failed open is a non-fatal ErrorFrame. With a fixed 1 s reopen
    backoff that was one every second for as long as audio came; the wait now doubles from 1 s up to
    8 s. A fake clock for the service, advanced half a second per audio frame, makes the schedule exact:
    opens at 0 (start), 1, 3, 7 and 15 s in 18 s of frames."""
    import socket
    import types

    from pipecat_monosemantic import stt as stt_module

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = [1000.0]
    monkeypatch.setattr(stt_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    tries = []
    ensure = MonosemanticSTTService._ensure_session

    async def counted(self):
        session = await ensure(self)
        tries.append(clock[0])
        return session

    monkeypatch.setattr(MonosemanticSTTService, "_ensure_session", counted)
    frame = speech[0][:320]  # 20 ms

    async def main():
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}")
        async with harness(stt, sample_rate=16000) as h:
            # Streams open in the background: each try is over (and its failure has set the next one's
            # time on the fake clock) before the clock moves on.
            await h.wait_for(lambda: len(tries) == 1 and stt._opening is None)  # the open at start
            for n in range(36):
                clock[0] += 0.5
                await h.audio(frame)
                await h.wait_for(lambda: len(tries) == n + 2 and stt._opening is None)
            await h.end(timeout=30)
            return stt, h

    stt, h = asyncio.run(main())
    errors = h.errors()
    assert len(errors) == 5 and not any(e.fatal for e in errors)
    assert [e.error.rsplit("next try in ", 1)[1] for e in errors] == ["1 s)", "2 s)", "4 s)", "8 s)", "8 s)"]
    # Each try after the first was started by a 20 ms frame, kept for it and lost with it (which the error
    # used to round to "the 0.0 s of audio").
    assert all("the 0.02 s of audio received while it was opening" in e.error for e in errors[1:])
    assert f"127.0.0.1:{port}" in errors[0].error and stt.is_usable


def test_a_muted_service_keeps_the_connection_open_with_silence(harness, model, speech):
    """While muted (STTMuteFrame, as STTMuteFilter sends while the bot speaks) nothing reaches the server,
    which closes a connection silent for its idle timeout. The service's keepalive sends silence once no
    audio was sent for `keepalive_timeout` seconds, so the stream outlives a mute several idle timeouts
    long, and the next utterance is transcribed on it with no ErrorFrame."""
    expected = model.transcribe(speech[0], latency_ms=160).text

    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}", keepalive_timeout=0.3, keepalive_interval=0.1)
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            stream = stt._session
            await h.worker.queue_frame(STTMuteFrame(mute=True))
            await h.audio(np.zeros(16000, dtype=np.int16), pace=1.0)  # 1 s of the transport's audio, muted
            await asyncio.sleep(1.5)  # and 1.5 s of none: 2.5 s without audio sent, the idle timeout is 1 s
            await h.worker.queue_frame(STTMuteFrame(mute=False))
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            assert stt._session is stream  # never closed, never reopened
            await h.end()
            return h

    with RunningServer(model, idle_timeout_seconds=1.0) as server:
        h = asyncio.run(main(server.port))
    assert not h.errors()
    first, second = h.finals()
    # The second utterance starts with the keepalive silence (as with the silence between turns that a
    # transport delivers), so only its presence is checked, not its text against offline.
    assert first.text == expected and second.text


def test_keepalive_is_on_in_remote_mode_only():
    from pipecat_monosemantic.stt import REMOTE_KEEPALIVE_TIMEOUT

    remote = MonosemanticSTTService(base_url="ws://127.0.0.1:1")
    assert remote._keepalive_timeout == REMOTE_KEEPALIVE_TIMEOUT == 10.0 and remote._keepalive_interval == 2.0
    assert MonosemanticSTTService(base_url="ws://127.0.0.1:1", keepalive_timeout=None)._keepalive_timeout is None
    assert MonosemanticSTTService(model="local.nemo")._keepalive_timeout is None


def test_losing_the_connection_while_muted_is_one_error_and_the_next_audio_reconnects(harness, model, speech):
    """The keepalive neither reports a lost connection a second time nor reopens a stream: the event task
    reports it, as any lost connection, and the first audio after the mute opens a new stream."""
    expected = model.transcribe(speech[1], latency_ms=160).text
    server = RunningServer(model, idle_timeout_seconds=1.0)

    async def main():
        stt = MonosemanticSTTService(
            base_url=f"ws://127.0.0.1:{server.port}", keepalive_timeout=0.2, keepalive_interval=0.05
        )
        async with harness(stt, sample_rate=16000) as h:
            await h.worker.queue_frame(STTMuteFrame(mute=True))
            await asyncio.sleep(0.5)  # keepalives go out
            await asyncio.to_thread(server.__exit__)  # the server goes away while the service is muted
            await h.wait_for(lambda: h.errors())
            await asyncio.sleep(0.5)  # keepalive checks find no stream: nothing is sent, nothing opened
            assert stt._session is None
            await asyncio.to_thread(server.restart)
            await h.worker.queue_frame(STTMuteFrame(mute=False))
            await h.say(speech[1])
            await h.wait_for(lambda: any(f.text == expected for f in h.finals()))
            await h.end()
            return h

    with server:  # (its __exit__ after one inside the test is a no-op)
        h = asyncio.run(main())
    (error,) = h.errors()
    assert not error.fatal and "shutting down" in error.error


def test_a_model_change_is_refused_in_remote_mode_and_the_rest_of_the_update_applies(harness, model, speech):
    """The server transcribes with the model it was started with: a `model` update cannot take effect,
    so it is refused with a non-fatal ErrorFrame instead of being accepted and silently ignored. The
    stream is not reopened, the setting (and the metrics' model name) stay, the update's other fields
    apply, and an update to the current model is no change at all."""
    expected = [model.transcribe(pcm, latency_ms=160).text for pcm in speech[:2]]

    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}")
        async with harness(stt, sample_rate=16000) as h:
            model_before = stt.settings.model
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            stream = stt._session
            Settings = MonosemanticSTTService.Settings
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=Settings(model=model_before)))
            delta = Settings(model="/elsewhere/other-model.nemo", interim_results=False)
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=delta))
            await h.wait_for(lambda: h.errors())
            await h.wait_for(lambda: not stt.settings.interim_results)
            assert stt.settings.model == model_before and stt._session is stream
            assert delta.model == "/elsewhere/other-model.nemo"  # the frame's delta is not altered
            interims_before = len(h.down.of(InterimTranscriptionFrame))
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            assert stt._session is stream and len(h.down.of(InterimTranscriptionFrame)) == interims_before
            await h.end()
            return stt, h, model_before

    with RunningServer(model) as server:
        stt, h, model_before = asyncio.run(main(server.port))
    (error,) = h.errors()
    assert not error.fatal and stt.is_usable
    assert "/elsewhere/other-model.nemo" in error.error and "monosemantic serve" in error.error
    assert f"keeping {model_before!r}" in error.error
    assert [f.text for f in h.finals()] == expected


def test_remote_metrics_name_the_servers_model_without_reopening_streams(harness, model, speech):
    """The metrics (TTFB, usage) were labelled with `settings.model`, the constructor's `model` (by
    default monosemantic.DEFAULT_MODEL), which the server ignores. Once a stream has opened they carry the
    model the server's `ready` names. `settings.model` stays what it was: it decides when a stream is
    replaced and which updates are refused, and the server's name must change neither. An update naming
    the server's model is no change either."""
    from pathlib import Path

    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import STTUsageMetricsData, TTFBMetricsData

    import monosemantic

    served = Path(model.source).name

    async def main(port):
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}")
        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            stream = stt._session
            Settings = MonosemanticSTTService.Settings
            await h.worker.queue_frame(STTUpdateSettingsFrame(delta=Settings(model=served)))
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            assert stt._session is stream  # never reopened
            await h.end()
            return stt, h

    with RunningServer(model) as server:
        stt, h = asyncio.run(main(server.port))
    assert not h.errors() and stt.settings.model == monosemantic.DEFAULT_MODEL
    initial, *frames = h.down.of(MetricsFrame)
    assert {d.value for d in initial.data} == {0.0}  # the pipeline's own zeros at start, of no model
    data = [d for frame in frames for d in frame.data]
    assert any(isinstance(d, TTFBMetricsData) for d in data) and any(isinstance(d, STTUsageMetricsData) for d in data)
    assert {d.model for d in data} == {served}


def test_a_server_that_never_answers_does_not_hold_up_the_pipeline(harness, speech):
    """A host that accepts the TCP connection but never answers the WebSocket handshake (hung, or a
    firewall's blackhole) makes a connection attempt last the client's whole connect timeout (10 s).
    The stream opens in the background, so nothing waits for it: the pipeline starts, audio and VAD frames
    pass downstream, and a CancelFrame ends the pipeline, all before that attempt ends (its failure would
    be an ErrorFrame)."""
    import socket

    from pipecat.frames.frames import InputAudioRawFrame, VADUserStartedSpeakingFrame

    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(16)  # the kernel completes the connections; nothing ever reads or answers
        port = blackhole.getsockname()[1]

        async def main():
            stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{port}")
            assert stt._remote.connect_timeout == 10.0
            async with harness(stt, sample_rate=16000) as h:
                assert not h.errors(), "the pipeline started only after the connection attempt failed"
                await h.speech_starts()
                await h.audio(speech[0][:3200])  # 10 frames of 20 ms
                frames = lambda: len(h.down.of(InputAudioRawFrame)) == 10 and h.down.of(VADUserStartedSpeakingFrame)
                await h.wait_for(frames, timeout=3.0)
                assert not h.errors() and stt._opening is not None  # the attempt is still going on
                await h.cancel(timeout=3.0)
                return h

        h = asyncio.run(main())
    assert not h.errors() and h.finals() == []


def test_connection_events_follow_the_streams_connections(harness, model, speech):
    """pipecat's STTService documents on_connected / on_disconnected / on_connection_error, which an
    application uses to watch a hosted STT's connection (alerting, a failover); none was ever raised. In
    remote mode each stream is a connection: opened, lost with the server, failing to open while the
    server is down, opened again, closed at the pipeline's end."""
    server = RunningServer(model)

    async def main():
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{server.port}")
        seen = []

        @stt.event_handler("on_connected")
        async def on_connected(service):
            seen.append("connected")

        @stt.event_handler("on_disconnected")
        async def on_disconnected(service):
            seen.append("disconnected")

        @stt.event_handler("on_connection_error")
        async def on_connection_error(service, error):
            assert isinstance(error, str) and error
            seen.append("error")

        async with harness(stt, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await asyncio.to_thread(server.__exit__)  # the server goes away
            await h.wait_for(lambda: "disconnected" in seen)
            await asyncio.sleep(1.1)  # the reopen backoff
            await h.audio(speech[1][:3200])  # the next audio tries to reopen: refused, the server is down
            await h.wait_for(lambda: seen.count("error") >= 1 and len(h.errors()) >= 2)
            await asyncio.to_thread(server.restart)
            await asyncio.sleep(2.1)  # the doubled backoff
            await h.say(speech[1])
            await h.wait_for(lambda: len(h.finals()) == 2)
            await h.end()
            await asyncio.sleep(0.1)  # the handlers run as tasks
            return seen

    with server:
        seen = asyncio.run(main())
    assert seen[0] == "connected" and seen[-1] == "disconnected"
    assert seen.count("connected") == 2 and seen.count("disconnected") == 2, seen
    assert "error" in seen[seen.index("disconnected"):seen.index("connected", 1)], seen


def test_a_server_down_for_good_fails_over_after_max_open_failures(harness, model, speech, monkeypatch):
    """A server that stays down was retried for as long as audio came, each failed open a non-fatal
    ErrorFrame: the service never became unusable, so pipecat's ServiceSwitcherStrategyFailover (which
    switches only away from a service that can no longer do its job) never moved to the backup STT, and
    nothing was transcribed. With `max_open_failures=2` the second failed open in a row gives up: its
    ErrorFrame marks the service unusable, the switcher fails over, and the audio reaches the backup."""
    from pipecat.pipeline.service_switcher import ServiceSwitcher, ServiceSwitcherStrategyFailover
    from pipecat.services.stt_service import STTService

    from pipecat_monosemantic import stt as stt_module

    monkeypatch.setattr(stt_module, "_REOPEN_BACKOFF_SECONDS", 0.05)  # the backoff between the two tries

    class Backup(STTService):
        def __init__(self):
            super().__init__(ttfs_p99_latency=1.0)
            self.received = 0

        async def run_stt(self, audio):
            self.received += len(audio)
            yield None

    server = RunningServer(model)

    async def main():
        stt = MonosemanticSTTService(base_url=f"ws://127.0.0.1:{server.port}", max_open_failures=2)
        backup = Backup()
        switcher = ServiceSwitcher(services=[stt, backup], strategy_type=ServiceSwitcherStrategyFailover)
        reported = []

        @stt.event_handler("on_error")
        async def on_error(service, error):
            reported.append(error)

        async with harness(switcher, sample_rate=16000) as h:
            await h.say(speech[0])
            await h.wait_for(lambda: len(h.finals()) == 1)
            await asyncio.to_thread(server.__exit__)  # the server goes away, for good
            await h.wait_for(lambda: stt._session is None)
            for _ in range(250):  # 5 s of audio at most, in real time
                if switcher.strategy.active_service is backup:
                    break
                await h.audio(speech[1][:320], pace=1.0)
            assert switcher.strategy.active_service is backup
            await h.audio(speech[1][:3200])
            await h.wait_for(lambda: backup.received >= 3200)
            await h.end()
            return stt, h, reported

    with server:  # (its __exit__ after one inside the test is a no-op)
        stt, h, reported = asyncio.run(main())
    failed_opens = [e for e in reported if "could not open a recognition stream" in e.error]
    assert len(failed_opens) == 2 and not stt.is_usable
    assert "next try in" in failed_opens[0].error and "giving up after 2 failed attempts" in failed_opens[1].error
    # The switch absorbed the error that caused it; the ones before it were not the switcher's to act on.
    assert failed_opens[1] not in h.errors() and not any(e.fatal for e in h.errors())


@pytest.mark.parametrize("ending", ["a clean close", "a fatal error"])
def test_a_server_that_ends_every_stream_at_once_gives_up_after_max_open_failures(harness, speech, monkeypatch, ending):
    """A server that accepts each stream and ends it at once (a broken deployment, an auth proxy that
    closes after the upgrade): every open succeeded and reset the count of failed opens, so the service
    reopened for as long as audio came, a connection every few frames, and `max_open_failures` never
    gave up (a failover never switched). A stream that ends within seconds of opening, before any
    transcript, now counts as a failed open, as pipecat's websocket services count a connection that
    dies right after connecting: the reopen backs off, and the third gives up."""
    from _support.fake_server import FakeServer, fake_server
    from pipecat_monosemantic import stt as stt_module

    monkeypatch.setattr(stt_module, "_REOPEN_BACKOFF_SECONDS", 0.05)
    if ending == "a fatal error":
        error = {"type": "error", "code": "internal", "message": "broken", "fatal": True}
        ends_at_once = FakeServer(script=[error], then="close", close_code=1011, close_reason="internal")
    else:
        ends_at_once = FakeServer(then="close")

    async def main():
        async with fake_server(ends_at_once) as url:
            stt = MonosemanticSTTService(base_url=url, max_open_failures=3)
            async with harness(stt, sample_rate=16000) as h:
                for _ in range(250):  # 5 s of audio at most, in real time
                    if not stt.is_usable:
                        break
                    await h.audio(speech[0][:320], pace=1.0)
                usable = stt.is_usable
                await h.end(timeout=10)
                return usable, h

    usable, h = asyncio.run(main())
    assert not usable and len(ends_at_once.connections) == 3 and len(h.errors()) == 3  # one per failed attempt
    gave_up = [e for e in h.errors() if "giving up" in e.error]
    assert gave_up and "giving up after 3 failed attempts in a row" in gave_up[0].error
    assert len([e for e in h.errors() if "next try in" in e.error]) == 2  # the two before: backed off


def test_max_open_failures_is_checked_and_counts_afresh_once_the_service_is_usable_again():
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="max_open_failures must be a positive integer or None"):
            MonosemanticSTTService(base_url="ws://127.0.0.1:1", max_open_failures=bad)
    stt = MonosemanticSTTService(base_url="ws://127.0.0.1:1", max_open_failures=1)

    async def main():
        stt._open_failures, stt._retry_at = 1, float("inf")  # as after giving up
        await stt.set_usable(False)
        await stt.set_usable(True)  # the application brings it back: the next audio tries at once

    asyncio.run(main())
    assert stt._open_failures == 0 and stt._retry_at == 0.0
