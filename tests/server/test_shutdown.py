"""Shutdown: on SIGTERM a real `python -m monosemantic serve` process still sends the open stream the
final of all the audio it sent, then a close, and exits 0; audio that does not make it into the drain's
final (in transit behind backpressure, or sent during the drain) is reported exactly, never lost in
silence."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from _support.server import RunningServer, pcm16, send_audio

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_mid_stream_delivers_the_final_and_exits_0(nemo_checkpoint, ms_model, audio_clips):
    audio = audio_clips["jfk.wav"]
    sent = audio[: int(len(audio) * 0.7)]  # mid-utterance: never flushed by the client
    want = ms_model("nemotron_rnnt").transcribe(sent, latency_ms=160).text
    proc = subprocess.Popen(
        [sys.executable, "-m", "monosemantic", "serve", "--model", str(nemo_checkpoint("nemotron_rnnt")), "--device", "cpu",
         "--port", "0", "--max-streams", "2", "--log-format", "json", "--switch-interval-ms", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split("http://")[1].split()[0]

        async def main():
            async with aiohttp.ClientSession() as http:
                deadline = time.monotonic() + 60
                while (await http.get(f"http://{base}/readyz")).status != 200:
                    assert time.monotonic() < deadline, "never ready"
                    await asyncio.sleep(0.1)
                async with http.ws_connect(f"ws://{base}/v1/stream?latency_ms=160") as ws:
                    await ws.receive(timeout=10)
                    await send_audio(ws, sent)
                    await asyncio.sleep(0.2)
                    proc.send_signal(signal.SIGTERM)
                    messages = [json.loads(msg.data) async for msg in ws]
                    return messages, ws.close_code

        messages, code = asyncio.run(main())
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    finals = [m for m in messages if m["type"] == "final"]
    assert len(finals) == 1 and finals[0]["text"] == want and finals[0]["end"] * 16000 == len(sent)
    closed = messages[-1]
    assert closed["type"] == "error" and closed["code"] == "closed" and closed["fatal"] is True
    assert closed["transcribed_until"] * 16000 == len(sent)  # all of it: the client sent nothing after SIGTERM
    assert "shutting down" in closed["message"] and f"{len(sent) / 16000:.3f} s" in closed["message"]
    assert not [m for m in messages if m["type"] == "error" and m["code"] == "shutting_down"]  # nothing was dropped
    assert code == 1001
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(entry.get("stream_id") and entry["message"] == "stream closed" and entry["reason"] == "shutdown" for entry in logs)
    # --switch-interval-ms reached the interpreter that served (the ready line reads it back from sys)
    assert any(entry["message"].startswith("ready: ") and entry["message"].endswith("thread switch interval 0.5 ms") for entry in logs)


def test_audio_behind_backpressure_at_shutdown_is_reported_exactly(ms_model, audio_clips):
    """A client far ahead of the engine (its audio waits in socket buffers while the server applies
    backpressure) when the shutdown begins: the drain's final covers what the server had read, and the
    client is told exactly where transcription ends (`transcribed_until`, also in the messages), so the
    audio it sent beyond that is reported, not lost in silence."""
    model = ms_model("nemotron_rnnt")
    speech = pcm16(np.concatenate(list(audio_clips.values())))
    stall = threading.Event()

    def stall_engine(plan, elapsed) -> None:  # engine thread, outside the core's lock: the engine falls behind
        stall.wait(60)

    running = RunningServer(model, max_streams=1, max_buffered_seconds=1.0).__enter__()
    try:
        running.state.engine.core.add_tick_hook(stall_engine)

        async def main():
            sent = 0

            async def sender(ws):
                nonlocal sent
                while True:
                    for i in range(0, len(speech), 32000):
                        await ws.send_bytes(speech[i : i + 32000])  # waits while TCP pushes back
                        sent += len(speech[i : i + 32000]) // 2

            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"{running.ws}?latency_ms=160") as ws:
                    await ws.receive(timeout=10)
                    sending = asyncio.create_task(sender(ws))
                    while running.metric("monosemantic_audio_received_seconds_total") < 1.0:
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(1.0)  # the push waits; the socket buffers fill
                    sending.cancel()  # between frames: a frame is written whole before send_bytes waits
                    await asyncio.gather(sending, return_exceptions=True)
                    sent_before = sent
                    shutdown = asyncio.create_task(asyncio.to_thread(running.__exit__, None, None, None))
                    await asyncio.sleep(0.5)
                    stall.set()  # the drain needs the engine for its final
                    messages = []
                    while (msg := await ws.receive(timeout=60)).type is aiohttp.WSMsgType.TEXT:
                        messages.append(json.loads(msg.data))
                    await shutdown
                    return sent_before, messages, ws.close_code

        sent_before, messages, code = asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        stall.set()
        running.__exit__(None, None, None)
    finals = [m for m in messages if m["type"] == "final"]
    dropped = [m for m in messages if m["type"] == "error" and m["code"] == "shutting_down"]
    closed = messages[-1]
    assert code == 1001 and closed["code"] == "closed" and closed["fatal"] is True
    assert len(finals) == 1 and finals[0]["start"] == 0
    until = finals[0]["end"]
    # the audio sent before the shutdown that the final does not cover is reported, with where it begins
    assert sent_before / 16000 > until
    assert closed["transcribed_until"] == until and f"{until:.3f} s" in closed["message"]
    assert len(dropped) == 1 and dropped[0]["fatal"] is False and dropped[0]["transcribed_until"] == until
    assert f"{until:.3f} s" in dropped[0]["message"] and "shutdown began" not in dropped[0]["message"]


def test_a_client_still_sending_at_shutdown_receives_the_final_and_the_close(ms_model, audio_clips):
    """A client pushing as fast as the server takes its audio (a file transcriber) when the shutdown
    begins: it still receives the drain's final, `closed` and the 1001 close. The server used to close
    the TCP connection right after its close frame with the client's audio unread, and the reset that
    followed made the client's side discard the final and the close it had not read yet."""
    from monosemantic.client import ConnectionLostError, RemoteEngine

    model = ms_model("nemotron_rnnt")
    chunk = (np.concatenate(list(audio_clips.values()))[:1600] * 32767).astype(np.int16)

    async def one_run(running):
        async with RemoteEngine(running.ws) as engine:
            stream = await engine.open_stream(latency_ms=80)

            async def read():
                events = []
                try:
                    async for event in stream:
                        events.append(event)
                except ConnectionLostError as exc:
                    events.append(exc)
                return events

            reader = asyncio.create_task(read())
            shutdown = None
            started = time.monotonic()
            try:
                while True:
                    await stream.push(chunk)
                    if shutdown is None and time.monotonic() - started > 1.0:
                        shutdown = asyncio.create_task(asyncio.to_thread(running.__exit__, None, None, None))
            except ConnectionLostError:
                pass
            events = await asyncio.wait_for(reader, 30)
            await shutdown
            return events

    for _ in range(3):
        running = RunningServer(model, max_streams=1).__enter__()
        try:
            events = asyncio.run(asyncio.wait_for(one_run(running), 60))
        finally:
            running.__exit__(None, None, None)
        kinds = [type(e).__name__ + (f":{e.code}" if hasattr(e, "code") else "") for e in events]
        assert not any(isinstance(e, ConnectionLostError) for e in events), (kinds[-4:], events[-1])
        finals = [e for e in events if type(e).__name__ == "Final"]
        assert len(finals) == 1 and kinds[-1] == "Error:closed", kinds
