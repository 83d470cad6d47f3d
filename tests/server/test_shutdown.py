"""SIGTERM on a real `python -m monosemantic serve` process: the open stream still receives the final
of all the audio it sent, then a close; the process exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from _support.server import send_audio

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_mid_stream_delivers_the_final_and_exits_0(nemo_checkpoint, ms_model, audio_clips):
    audio = audio_clips["jfk.wav"]
    sent = audio[: int(len(audio) * 0.7)]  # mid-utterance: never flushed by the client
    want = ms_model("nemotron_rnnt").transcribe(sent, latency_ms=160).text
    proc = subprocess.Popen(
        [sys.executable, "-m", "monosemantic", "serve", "--model", str(nemo_checkpoint("nemotron_rnnt")), "--device", "cpu",
         "--port", "0", "--max-streams", "2", "--log-format", "json"],
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
    assert messages[-1] == {"type": "error", "code": "closed", "message": "the server is shutting down", "fatal": True}
    assert code == 1001
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert any(entry.get("stream_id") and entry["message"] == "stream closed" and entry["reason"] == "shutdown" for entry in logs)
