"""examples/live_captions.py runs end to end on a file and prints the finals the engine produces."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from _support.server import with_default_sigint

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "live_captions.py"), *args],
        capture_output=True, text=True, timeout=240,
    )


def test_file_captions_cover_the_clip(nemo_checkpoint, ms_model, audio_clips):
    """Utterances end at the VAD's speech ends and at the end of the file: their spans tile the clip from
    0 to its last sample, and one utterance alone transcribes as offline transcription does."""
    clip = ROOT / "tests" / "data" / "sense_and_sensibility_01_austen_64kb-0880.wav"
    result = run(str(clip), "--fast", "--model", str(nemo_checkpoint("nemotron_rnnt")), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"^\[\s*([\d.]+)-\s*([\d.]+)s\] (.*)$", result.stdout, re.M)
    assert lines, result.stdout
    audio = audio_clips[clip.name]
    assert float(lines[0][0]) == 0.0
    assert abs(float(lines[-1][1]) - len(audio) / 16000) < 0.01
    for (_, end), (start, _) in zip([l[:2] for l in lines], [l[:2] for l in lines[1:]]):
        assert end == start
    if len(lines) == 1:
        assert lines[0][2] == ms_model("nemotron_rnnt").transcribe(audio, latency_ms=160).text


def test_captions_from_a_server(ms_model, audio_clips):
    """--url: the same captions through `monosemantic serve` (a real server on loopback)."""
    from _support.server import RunningServer

    clip = ROOT / "tests" / "data" / "sense_and_sensibility_01_austen_64kb-0880.wav"
    model = ms_model("nemotron_rnnt")
    with RunningServer(model, api_key="k") as server:
        result = run(str(clip), "--fast", "--url", f"ws://127.0.0.1:{server.port}", "--api-key", "k")
        wrong = run(str(clip), "--fast", "--url", f"ws://127.0.0.1:{server.port}", "--api-key", "nope")
    assert result.returncode == 0, result.stderr
    lines = re.findall(r"^\[\s*([\d.]+)-\s*([\d.]+)s\] (.*)$", result.stdout, re.M)
    assert lines and abs(float(lines[-1][1]) - len(audio_clips[clip.name]) / 16000) < 0.01
    if len(lines) == 1:
        assert lines[0][2] == model.transcribe(audio_clips[clip.name], latency_ms=160).text
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr and wrong.stderr.startswith("error:")
    assert "Unclosed" not in wrong.stderr  # the refused open still closes the client's HTTP session


def test_a_refused_open_is_one_line_and_releases_the_client(ms_model, nemo_checkpoint):
    """Nothing listening at --url, or a latency mode the model lacks (locally or on a server): one line, no
    traceback, and no aiohttp warnings about a session left open."""
    from _support.server import RunningServer

    clip = str(ROOT / "tests" / "data" / "jfk.wav")
    with RunningServer(ms_model("nemotron_rnnt")) as server:
        url = f"ws://127.0.0.1:{server.port}"
        results = [run(clip, "--fast", "--url", url, "--latency-ms", "100")]
    results.append(run(clip, "--fast", "--url", url))  # the server is gone
    model = str(nemo_checkpoint("nemotron_rnnt"))
    results.append(run(clip, "--fast", "--model", model, "--device", "cpu", "--latency-ms", "100"))
    for result in results:
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
    assert "choose one of" in results[0].stderr and "choose one of" in results[2].stderr


def test_bad_arguments_are_one_line_errors(tmp_path):
    result = run()
    assert result.returncode == 2 and "give an audio file or --mic" in result.stderr
    both = run(str(ROOT / "tests" / "data" / "jfk.wav"), "--mic")  # asked the user for what they gave
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    result = run(str(tmp_path / "missing.wav"), "--model", str(tmp_path / "missing.nemo"), "--device", "cpu")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in result.stderr


FAKE_SOUNDDEVICE = '''
"""A stand-in for sounddevice: a capture device that runs at 48 kHz only, "hearing" a file."""
import os, threading, time
import numpy as np
from monosemantic.audio import load_audio_file

class PortAudioError(Exception):
    pass

def query_devices(kind=None):
    return {"name": "fake 48 kHz microphone", "default_samplerate": 48000.0}

class RawInputStream:
    def __init__(self, samplerate, channels, dtype, blocksize, callback):
        if samplerate != 48000 or channels != 1 or dtype != "int16":
            raise PortAudioError("Error opening RawInputStream: Invalid sample rate [PaErrorCode -9997]")
        self.blocksize, self.callback = blocksize, callback

    def __enter__(self):
        audio = load_audio_file(os.environ["FAKE_MIC_CLIP"], 48000)
        audio = np.concatenate([audio, np.zeros(48000, np.float32)])  # the speaker stops
        pcm = np.round(audio * 32767).astype(np.int16)

        self.stopped = threading.Event()

        def capture():
            for i in range(0, len(pcm) - self.blocksize + 1, self.blocksize):
                if self.stopped.is_set():
                    return
                self.callback(pcm[i : i + self.blocksize].tobytes(), self.blocksize, None, None)
                time.sleep(0.001)
        self.thread = threading.Thread(target=capture, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        # As PortAudio's: no callback after the stream is closed.
        self.stopped.set()
        self.thread.join()
        return False
'''


def test_microphone_at_its_own_rate(tmp_path, nemo_checkpoint):
    """--mic on a device that captures at 48 kHz only (many do): the microphone is opened at its own rate
    and the engine resamples; captions appear, and Ctrl-C ends the program quietly. (It asked PortAudio
    for 16 kHz: a PortAudioError traceback before anything was heard.)"""
    import os
    import signal

    (tmp_path / "sounddevice.py").write_text(FAKE_SOUNDDEVICE)
    clip = ROOT / "tests" / "data" / "sense_and_sensibility_01_austen_64kb-0880.wav"
    env = {**os.environ, "FAKE_MIC_CLIP": str(clip),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "live_captions.py"), "--mic",
         "--model", str(nemo_checkpoint("nemotron_rnnt")), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=with_default_sigint,
    )
    try:
        line = proc.stdout.readline()  # the first final (stdout is not a terminal: finals only)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.match(r"^\[\s*0\.00-\s*[\d.]+s\] ", line), (line, stderr)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
