"""A child forked after its parent ran a model: it transcribes (torch's OpenMP pool, which does not survive
a fork, used to make it wait forever at its first multithreaded op), with one intra-op thread; a child
forked when the model was only loaded keeps its threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)

AUDIO = Path(__file__).parent / "data" / "jfk.wav"


def test_a_child_forked_after_the_parent_ran_a_model_transcribes(nemo_checkpoint):
    code = f"""
import faulthandler, os
import soundfile as sf
import torch
import monosemantic
torch.set_num_threads(2)
model = monosemantic.load_model({str(nemo_checkpoint("nemotron_rnnt"))!r}, device="cpu")
audio, _ = sf.read({str(AUDIO)!r}, dtype="float32")
audio = audio[:48000]

def in_child(run):
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the child, with its traceback
        try:
            print(run(), flush=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("exit", os.waitstatus_to_exitcode(status), flush=True)

in_child(lambda: f"loaded-only threads {{torch.get_num_threads()}}")
want = model.transcribe(audio).text
in_child(lambda: f"after-transcribe threads {{torch.get_num_threads()}} same {{model.transcribe(audio).text == want}}")
print("parent threads", torch.get_num_threads(), model.transcribe(audio).text == want)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500)
    out = done.stdout + done.stderr
    assert "loaded-only threads 2" in done.stdout, out
    assert "after-transcribe threads 1 same True" in done.stdout, out
    assert done.stdout.count("exit 0") == 2 and "parent threads 2 True" in done.stdout, out
    assert "forked after its parent ran a model" in done.stderr, out


def test_a_child_forked_after_the_parent_loaded_a_bfloat16_model_on_cpu_transcribes(nemo_checkpoint):
    """Loading converts the encoder's weights to the dtype asked for, with torch's parallel copy kernels:
    the OpenMP pool was then in use although no model had run, the child kept its threads, and waited
    forever at its first transcription (a gunicorn --preload worker of a dtype='bfloat16' app)."""
    code = f"""
import faulthandler, os
import soundfile as sf
import torch
import monosemantic
torch.set_num_threads(2)
model = monosemantic.load_model({str(nemo_checkpoint("nemotron_rnnt"))!r}, device="cpu", dtype="bfloat16")
audio, _ = sf.read({str(AUDIO)!r}, dtype="float32")
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang fails the child, with its traceback
    try:
        print("child threads", torch.get_num_threads(), type(model.transcribe(audio[:48000]).text).__name__, flush=True)
    finally:
        os._exit(0)
_, status = os.waitpid(pid, 0)
print("exit", os.waitstatus_to_exitcode(status), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=500)
    out = done.stdout + done.stderr
    assert "child threads 1 str" in done.stdout and "exit 0" in done.stdout, out
