"""The server end to end on loopback with real WebSocket clients: finals equal offline transcription,
clients share batches, operations endpoints, admission (auth, capacity, bad parameters) before the
upgrade."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest

from monosemantic import CapacityError, Final, Partial
from monosemantic.client import AuthenticationError, RemoteEngine, ServerCapacityError

from monosemantic.server.app import public_model_name

from _support.server import RunningServer, finals, pcm16, receive_until, send_audio

pytestmark = pytest.mark.timeout(180)
LATENCY = 160


@pytest.fixture(scope="module")
def server(model):
    with RunningServer(model, max_streams=8) as running:
        yield running


def expected(model, audio):
    return model.transcribe(audio, latency_ms=LATENCY)


def test_raw_protocol_round_trip_two_utterances(server, model, audio_clips):
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    want_a, want_b = expected(model, a), expected(model, b)

    async def main():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.ws, params={"latency_ms": str(LATENCY), "sample_rate": "16000"}) as ws:
                ready = json.loads((await ws.receive(timeout=10)).data)
                await send_audio(ws, a)
                await ws.send_str('{"type": "flush"}')
                first = await receive_until(ws, "final")
                await send_audio(ws, b)
                await ws.send_json({"type": "flush"})
                second = await receive_until(ws, "final")
                await ws.send_json({"type": "close"})
                rest = []
                async for msg in ws:
                    rest.append(json.loads(msg.data))
                return ready, first, second, rest, ws.close_code

    ready, first, second, rest, code = asyncio.run(main())
    assert ready["type"] == "ready" and ready["latency_ms"] == LATENCY and ready["sample_rate"] == 16000
    assert ready["model_sample_rate"] == 16000 and LATENCY in ready["latency_modes"] and ready["stream_id"]
    assert ready["vad"] is True  # the fixture's server runs VAD (a --no-vad one says false: tests/livekit_plugin)
    assert ready["idle_timeout"] == 60.0  # the server's idle timeout: how often a paused client must send
    # The model, named without the server's directories: the checkpoint file's own name.
    assert ready["model"] == Path(model.source).name == "nemotron_rnnt.nemo"
    fa, fb = first[-1], second[-1]
    assert fa["text"] == want_a.text and fb["text"] == want_b.text
    assert [w["word"] for w in fa["words"]] == [w.text for w in want_a.words]
    assert [round(w["start"] * 16000) for w in fa["words"]] == [w.start for w in want_a.words]
    assert [t["id"] for t in fb["tokens"]] == want_b.token_ids
    # the second utterance starts where the first ended: times count from the stream's first sample
    assert fa["start"] == 0 and fa["end"] * 16000 == len(a)
    assert fb["start"] * 16000 == len(a) and fb["end"] * 16000 == len(a) + len(b)
    partials = [m for m in first if m["type"] == "partial"]
    assert partials and all(want_a.text.startswith(p["text"]) and p["stable_text"] == p["text"] for p in partials)
    assert {m["type"] for m in first + second} <= {"partial", "final", "speech_started", "speech_ended", "usage"}
    assert code == 1000 and all(m["type"] in ("usage", "speech_ended") for m in rest)
    assert server.wait_until(lambda: server.open_streams() == 0)


def test_the_model_is_named_without_the_servers_paths(tmp_path, monkeypatch):
    """`ready` names the model for clients' metrics: a Hugging Face id as given, a local checkpoint by
    its final path component (its directories are the server's business)."""
    checkpoint = tmp_path / "models" / "asr-v3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.nemo").touch()
    monkeypatch.chdir(tmp_path)
    assert public_model_name("nvidia/nemotron-speech-streaming-en-0.6b") == "nvidia/nemotron-speech-streaming-en-0.6b"
    assert public_model_name(str(checkpoint / "model.nemo")) == "model.nemo"
    assert public_model_name(str(checkpoint) + "/") == "asr-v3"
    assert public_model_name("models/asr-v3/..") == "models"  # a relative path, as the server resolves it
    assert public_model_name(".") == tmp_path.name
    assert public_model_name("/") is None  # no name to give without the path itself


def test_six_remote_clients_share_batches_and_all_are_exact(server, model, audio_clips):
    clips = list(audio_clips.values())
    wants = [expected(model, clips[i % len(clips)]) for i in range(6)]
    batches_before = server.metric("monosemantic_engine_batch_size_count")
    singles_before = server.metric('monosemantic_engine_batch_size_bucket{le="1.0"}')

    async def one(engine, i):
        audio = clips[i % len(clips)]
        stream = await engine.open_stream(latency_ms=LATENCY)
        for j in range(0, len(audio), 320):
            await stream.push(pcm16(audio[j : j + 320]) if i % 2 else audio[j : j + 320])  # bytes and float32
            if j % 3200 == 0:
                await asyncio.sleep(0)
        await stream.flush()
        events = []
        async for event in stream:
            events.append(event)
            if isinstance(event, Final):
                break
        await stream.close()
        async for event in stream:  # the iterator ends after the server closes
            events.append(event)
        return events

    async def main():
        async with RemoteEngine(server.ws.replace("/v1/stream", "")) as engine:
            return await asyncio.gather(*(one(engine, i) for i in range(6)))

    results = asyncio.run(main())
    for i, events in enumerate(results):
        (final,) = finals(events)
        assert [t.id for t in final.tokens] == wants[i].token_ids, f"stream {i}"
        assert final.text == wants[i].text
        # word times come back as exact samples (the engine clamps the last end to the utterance)
        assert [(w.text, w.start) for w in final.words] == [(w.text, w.start) for w in wants[i].words]
        assert final.start == 0 and final.end == len(clips[i % len(clips)])
        assert all(final.text.startswith(e.text) for e in events if isinstance(e, Partial))
    batches = server.metric("monosemantic_engine_batch_size_count") - batches_before
    singles = server.metric('monosemantic_engine_batch_size_bucket{le="1.0"}') - singles_before
    assert batches > singles, "no encoder step ever batched two clients together"
    assert server.wait_until(lambda: server.open_streams() == 0)


def test_operations_endpoints(server):
    status, body = server.get("/healthz")
    assert status == 200 and json.loads(body)["alive"] is True
    status, body = server.get("/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "open_streams": 0, "max_streams": 8}
    status, text = server.get("/metrics")
    for name in (
        "monosemantic_open_streams", "monosemantic_engine_tick_seconds_bucket", "monosemantic_engine_batch_size_bucket",
        "monosemantic_audio_processed_seconds_total", "monosemantic_stream_buffered_seconds_bucket",
        "monosemantic_rejected_connections_total", "monosemantic_final_latency_seconds_bucket",
    ):
        assert name in text, name
    status, body = server.get("/v1/stream")  # not an upgrade request
    assert status == 400 and json.loads(body)["error"] == "bad_request"


@pytest.mark.parametrize("query, words", [("latency_ms=7", "160"), ("sample_rate=abc", "integer"), ("sample_rate=10", "1000..")])
def test_bad_parameters_are_refused_before_the_upgrade(server, query, words):
    status, body = server.get(f"/v1/stream?{query}", upgrade=True)
    assert status == 400 and json.loads(body)["error"] == "bad_request" and words in json.loads(body)["message"]

    async def main():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(server.ws + "?" + query)
            return err.value

    err = asyncio.run(main())
    assert err.status == 400 and err.headers["X-Monosemantic-Error"] == "bad_request"
    assert words in err.headers["X-Monosemantic-Message"]


def test_capacity_is_refused_before_the_upgrade_with_a_reason(model, audio_clips):
    async def main(running):
        async with RemoteEngine(running.http) as engine:
            held = [await engine.open_stream(), await engine.open_stream()]
            with pytest.raises(ServerCapacityError) as err:
                await engine.open_stream()
            status, body = running.get("/v1/stream", upgrade=True)  # the JSON body of the refusal
            ready_status, ready = running.get("/readyz")
            await held[0].close()
            await held[0].wait_closed()
            again = await engine.open_stream(latency_ms=LATENCY)  # a freed slot is usable at once
            await again.push(audio_clips["jfk.wav"])
            await again.flush()
            final = [e async for e in _until_final(again)]
            return err.value, status, json.loads(body), ready_status, json.loads(ready), final

    with RunningServer(model, max_streams=2) as running:
        err, status, body, ready_status, ready, final = asyncio.run(main(running))
        assert isinstance(err, CapacityError) and err.status == 503 and err.reason == "capacity"
        assert err.retryable and err.retry_after == 1.0
        assert status == 503 and body["error"] == "capacity" and body["max_streams"] == 2 and body["open_streams"] == 2
        assert ready_status == 503 and ready["reason"] == "capacity"
        assert final[-1].text == expected(model, audio_clips["jfk.wav"]).text
        assert running.metric('monosemantic_rejected_connections_total{reason="capacity"}') == 2


def test_readyz_and_the_open_streams_gauge_count_the_engines_slots(model):
    """/readyz told a load balancer `capacity` while the only slot was already free: its session was
    still waiting out the client's close handshake (up to the close timeout). It counts the engine's
    slots, which is what refuses or accepts the next connection. The `monosemantic_open_streams` gauge
    counted sessions still, so it said 1 where /readyz said 0: it counts the same slots."""

    async def main(running):
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(running.ws, autoclose=False)  # answers no close frame by itself
            await ws.receive(timeout=10)  # ready
            held = running.get("/readyz"), running.metric("monosemantic_open_streams")
            await ws.send_str('{"type": "close"}')
            while (await ws.receive(timeout=10)).type is not aiohttp.WSMsgType.CLOSE:
                pass  # the server's close frame: its stream is over, the client does not answer yet
            freed = running.wait_until(lambda: running.open_streams() == 0)
            after = running.get("/readyz"), running.metric("monosemantic_open_streams")
            sessions = len(running.state.sessions)
            await ws.close()
            return held, freed, after, sessions

    with RunningServer(model, max_streams=1, close_timeout_seconds=30.0) as running:
        ((held_status, held), held_gauge), freed, ((status, body), gauge), sessions = asyncio.run(main(running))
    assert held_status == 503 and json.loads(held)["reason"] == "capacity" and held_gauge == 1
    assert freed and status == 200 and json.loads(body) == {"ready": True, "open_streams": 0, "max_streams": 1}
    assert sessions == 1 and gauge == 0  # the connection still closing holds no slot, in either count


def _raw_upgrade(port: int, header: bytes) -> bytes:
    """The response head to an upgrade request carrying `header` verbatim (any bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" + header + b"\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return head


async def _until_final(stream):
    async for event in stream:
        yield event
        if isinstance(event, Final):
            return


def test_api_key_header_and_query_token(model):
    key = "s3cret-key"

    async def attempt(url, headers=None):
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(url, headers=headers or {}) as ws:
                    ready = json.loads((await ws.receive(timeout=10)).data)
                    await ws.send_json({"type": "close"})
                    return ready["type"]
            except aiohttp.WSServerHandshakeError as err:
                return err.status

    async def main(running):
        url = running.ws
        results = {
            "none": await attempt(url),
            "wrong header": await attempt(url, {"Authorization": "Bearer nope"}),
            "wrong scheme": await attempt(url, {"Authorization": f"Basic {key}"}),
            "wrong query": await attempt(url + "?token=nope"),
            "header": await attempt(url, {"Authorization": f"Bearer {key}"}),
            "query": await attempt(url + f"?token={key}"),
        }
        async with RemoteEngine(running.http, api_key="nope") as engine:
            with pytest.raises(AuthenticationError) as err:
                await engine.open_stream()
        async with RemoteEngine(running.http, api_key=key) as engine:
            stream = await engine.open_stream()
            await stream.close()
        return results, err.value

    with RunningServer(model, api_key=key) as running:
        results, err = asyncio.run(main(running))
        status, body = running.get("/v1/stream", upgrade=True)
        assert status == 401 and json.loads(body)["error"] == "unauthorized"
        # Header bytes that are not UTF-8 (no client library sends them; a raw socket can) are a wrong key too.
        for raw_key in (b"\xe9", b"caf\xc3\xa9", b"s3cret-key\xff"):
            head = _raw_upgrade(running.port, b"Authorization: Bearer " + raw_key)
            assert head.startswith(b"HTTP/1.1 401") and b"X-Monosemantic-Error: unauthorized" in head, head
        assert running.metric('monosemantic_rejected_connections_total{reason="unauthorized"}') == 4 + 1 + 1 + 3
    assert results == {"none": 401, "wrong header": 401, "wrong scheme": 401, "wrong query": 401, "header": "ready", "query": "ready"}
    assert err.status == 401 and not err.retryable


def test_retry_after_fits_each_refusal(model, monkeypatch):
    """A loading server answered every connection (and said nothing on /readyz) with `Retry-After: 1`:
    over a load of minutes, clients and balancers retried every second. Loading now asks for 5 s, a
    full server keeps 1 s (a slot frees soon), and a server that will not serve (failed, draining)
    sends none: retrying it later does not help."""
    import threading

    import monosemantic.asr as asr
    from aiohttp import web

    from monosemantic.server import ServerConfig, create_app
    from monosemantic.server.app import STATE, wait_ready

    loaded = threading.Event()

    def slow_load(*args, **kwargs):  # a worker thread of the app's loop
        loaded.wait(60)
        return model

    monkeypatch.setattr(asr, "load_model", slow_load)

    async def get(http, url, upgrade: bool):
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} if upgrade else {}
        async with http.get(url, headers=headers) as resp:
            return resp.status, (await resp.json())["error" if upgrade else "reason"], resp.headers.get("Retry-After")

    async def main():
        app = create_app(ServerConfig(model="unused", max_streams=1, heartbeat_seconds=None))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                loading = [await get(http, base + "/v1/stream", True), await get(http, base + "/readyz", False)]
                loaded.set()
                await wait_ready(app)
                async with http.ws_connect(base + "/v1/stream") as ws:  # the only slot
                    await ws.receive(timeout=10)
                    full = [await get(http, base + "/v1/stream", True), await get(http, base + "/readyz", False)]
                    await ws.send_json({"type": "close"})
                app[STATE].ready, app[STATE].failed = False, RuntimeError("the model failed to load (simulated)")
                failed = [await get(http, base + "/v1/stream", True), await get(http, base + "/readyz", False)]
                app[STATE].ready, app[STATE].failed = True, None
                app[STATE].draining = True
                draining = [await get(http, base + "/v1/stream", True), await get(http, base + "/readyz", False)]
                app[STATE].draining = False
        finally:
            loaded.set()
            await runner.cleanup()
        return loading, full, failed, draining

    loading, full, failed, draining = asyncio.run(main())
    assert loading == [(503, "not_ready", "5"), (503, "loading", "5")]
    assert full == [(503, "capacity", "1"), (503, "capacity", "1")]
    assert failed == [(503, "not_ready", None), (503, "failed", None)]
    assert draining == [(503, "draining", None), (503, "draining", None)]
