"""The protocol's pure functions under property-based fuzzing, and a live server fed random frames:
no crash, a clear error for each bad frame, and another stream's transcript unaffected."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monosemantic.events import Error, Final, Partial, SpeechEnded, SpeechStarted, Usage
from monosemantic.server.protocol import (
    Close, Flush, ProtocolError, check_audio, encode, event_to_message, message_to_event, parse_control, parse_stream_params,
)
from monosemantic.transcript import Token, Word

from _support.server import RunningServer, receive_until, send_audio

pytestmark = pytest.mark.timeout(240)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.dictionaries(st.just("type"), st.one_of(st.sampled_from(["flush", "close", "configure", ""]), json_values)).map(json.dumps),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_control_parser_accepts_or_names_the_problem(text):
    try:
        control = parse_control(text)
    except ProtocolError as exc:
        assert exc.code in {"bad_json", "bad_message", "unknown_type"} and exc.message
    else:
        data = json.loads(text)
        assert isinstance(control, Flush if data["type"] == "flush" else Close)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_audio_framing(data):
    if len(data) % 2:
        with pytest.raises(ProtocolError, match="odd byte count"):
            check_audio(data)
    else:
        check_audio(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["latency_ms", "sample_rate", "token", "x"]), st.text(max_size=8)))
def test_stream_parameters(query):
    try:
        params = parse_stream_params(query)
    except ProtocolError as exc:
        assert exc.code == "bad_request" and exc.message
    else:
        assert 1000 <= params.sample_rate <= 384_000


samples = st.integers(0, 2**31)
events = st.one_of(
    st.builds(Partial, st.text(), st.text(), samples, samples),
    st.builds(
        Final, st.text(),
        st.lists(st.builds(Token, st.integers(0, 10**5), st.text(max_size=5), samples, samples), max_size=4),
        st.lists(st.builds(Word, st.text(max_size=5), samples, samples), max_size=4),
        samples, samples,
    ),
    st.builds(SpeechStarted, samples), st.builds(SpeechEnded, samples),
    st.builds(Usage, st.floats(0, 1e6)), st.builds(Error, st.text(max_size=10), st.text()),
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_events_survive_the_json_round_trip_exactly(event):
    """Times travel as unrounded seconds and come back as the same integer samples."""
    assert message_to_event(json.loads(encode(event_to_message(event, 16000))), 16000) == event


@pytest.fixture(scope="module")
def server(ms_model):
    with RunningServer(ms_model("nemotron_rnnt"), max_streams=4, max_frame_bytes=4096) as running:
        yield running


frames = st.lists(
    st.one_of(st.binary(max_size=600).map(lambda b: ("bytes", b)), messages.map(lambda t: ("text", t))), min_size=1, max_size=12
)


def test_random_frames_on_a_live_server(server, ms_model, audio_clips):
    """Each example's connection gets random frames; each bad frame gets exactly its error, and a
    victim stream streaming speech meanwhile still gets its exact final."""
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    want = model.transcribe(audio, latency_ms=160).text

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(frames)
    def example(batch):
        async def fuzz(http):
            async with http.ws_connect(server.ws) as ws:
                await ws.receive(timeout=10)
                expected = []
                for kind, payload in batch:
                    if kind == "bytes":
                        await ws.send_bytes(payload)
                        if len(payload) % 2:
                            expected.append("bad_audio")
                    else:
                        await ws.send_str(payload)
                        try:
                            if isinstance(parse_control(payload), Close):
                                return expected, None  # the server ends the stream; nothing more to check
                        except ProtocolError as exc:
                            expected.append(exc.code)
                got = []
                for _ in expected:
                    got.append((await receive_until(ws, "error", timeout=10))[-1]["code"])
                return expected, got

        async def victim(http):
            async with http.ws_connect(server.ws, params={"latency_ms": "160"}) as ws:
                await ws.receive(timeout=10)
                await send_audio(ws, audio, frame_ms=100)
                await ws.send_json({"type": "flush"})
                return (await receive_until(ws, "final"))[-1]["text"]

        async def main():
            async with aiohttp.ClientSession() as http:
                return await asyncio.gather(fuzz(http), victim(http))

        (expected, got), text = asyncio.run(main())
        assert got is None or got == expected
        assert text == want

    example()
    assert server.wait_until(lambda: server.open_streams() == 0)
    assert server.get("/healthz")[0] == 200


@pytest.mark.parametrize("raw", ["1_60", "+160", " 160", "160 ", "\u0661\u0666\u0660", "0x10", "1e3"])
def test_stream_parameters_are_plain_decimal_integers(raw):
    """int() also reads underscores, a sign, outer whitespace and non-ASCII digits: `latency_ms=1_60` or
    Arabic-Indic digits opened a 160 ms stream where docs/protocol.md asks for an integer."""
    with pytest.raises(ProtocolError, match="latency_ms must be an integer"):
        parse_stream_params({"latency_ms": raw})
    assert parse_stream_params({"latency_ms": "160"}).latency_ms == 160


def test_a_flush_may_name_the_time_it_ends_the_utterance_at():
    assert parse_control('{"type": "flush"}') == Flush()
    assert parse_control('{"type": "flush", "at": 1.5}') == Flush(1.5)
    assert parse_control('{"type": "flush", "at": 3}') == Flush(3.0)
    for bad in ('-1', '"1.5"', 'true', 'NaN', 'Infinity', '1e300', '[1]'):
        with pytest.raises(ProtocolError, match="'at' must be a number of seconds") as caught:
            parse_control('{"type": "flush", "at": %s}' % bad)
        assert caught.value.code == "bad_message"
