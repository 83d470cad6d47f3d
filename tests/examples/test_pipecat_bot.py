"""examples/pipecat_bot.py runs end to end on a stand-in microphone (a fake pyaudio that plays a file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _support.server import with_default_sigint

pytest.importorskip("pipecat")
ROOT = Path(__file__).resolve().parents[2]
CLIP = ROOT / "tests" / "data" / "jfk.wav"
pytestmark = pytest.mark.timeout(300)

FAKE_PYAUDIO = '''
"""A stand-in for pyaudio: an input device that "hears" FAKE_MIC_CLIP (after 1 s of silence, then
silence), in the blocks Pipecat asks for, a few times faster than real time."""
import os, threading, time
import numpy as np
from monosemantic.audio import load_audio_file

paContinue = 0
paInt16 = 8

class _Stream:
    def __init__(self, rate, frames_per_buffer, stream_callback, input=False, **_):
        self.rate, self.block, self.callback, self.input = rate, frames_per_buffer, stream_callback, input
        self.stopped = threading.Event()

    def start_stream(self):
        if not self.input:
            return
        audio = load_audio_file(os.environ["FAKE_MIC_CLIP"], self.rate)
        silence = np.zeros(self.rate, np.float32)
        pcm = np.round(np.concatenate([silence, audio, silence, silence]) * 32767).astype(np.int16)

        def capture():
            for i in range(0, len(pcm) - self.block + 1, self.block):
                if self.stopped.is_set():
                    return
                self.callback(pcm[i : i + self.block].tobytes(), self.block, None, 0)
                time.sleep(self.block / self.rate / 4)
            while not self.stopped.wait(0.02):  # the room stays quiet
                self.callback(bytes(2 * self.block), self.block, None, 0)

        threading.Thread(target=capture, daemon=True).start()

    def stop_stream(self):
        self.stopped.set()

    def close(self):
        self.stopped.set()

    def write(self, *_args, **_kwargs):
        pass

class PyAudio:
    def open(self, format=None, channels=1, rate=16000, frames_per_buffer=320, stream_callback=None, input=False, **_):
        return _Stream(rate, frames_per_buffer, stream_callback, input)

    def get_format_from_width(self, width):
        return paInt16

    def terminate(self):
        pass
'''


def start_bot(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "pyaudio.py").write_text(FAKE_PYAUDIO)
    env = {**os.environ, "FAKE_MIC_CLIP": str(CLIP),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "pipecat_bot.py"), "--device", "cpu", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=with_default_sigint,
    )


def test_prints_finals_and_stops_on_ctrl_c(tmp_path, nemo_checkpoint):
    proc = start_bot(tmp_path, "--model", str(nemo_checkpoint("nemotron_rnnt")))
    try:
        final = ""
        for line in proc.stdout:  # interims rewrite one line with '\r'; each final ends its own line
            final = line.rsplit("\r", 1)[-1]
            if final.startswith("> "):
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert final.startswith("> ") and final[2:].replace("\033[K", "").strip(), (final, stderr)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("args, needle", [
    (["--model", "/no/such/model.nemo"], "not found"),
    (["--latency-ms", "100"], "not a mode"),
])
def test_a_recognizer_that_cannot_start_ends_the_bot(tmp_path, nemo_checkpoint, args, needle):
    """A model that does not load, or a latency mode it lacks: the bot logged Pipecat's error and then
    went on 'listening' with no recognizer until Ctrl-C. It now stops, with the reason and a non-zero exit."""
    if "--model" not in args:
        args = [*args, "--model", str(nemo_checkpoint("nemotron_rnnt"))]
    proc = start_bot(tmp_path, *args)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        pytest.fail(f"the bot kept running without a recognizer:\n{stderr[-2000:]}")
    assert proc.returncode == 1, stderr
    assert needle in stderr and "Traceback" not in stderr, stderr
