"""The command line end to end on real speech: offline and --stream give the same final, JSON lines,
and one-line errors with a non-zero exit for bad files and models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monosemantic", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


@pytest.fixture(scope="module")
def checkpoint(nemo_checkpoint) -> str:
    return str(nemo_checkpoint("nemotron_tdt"))


def test_offline_and_stream_json_agree_with_the_api(checkpoint, ms_model, audio_clips):
    files = [str(DATA / "jfk.wav"), str(DATA / "61-70968-0000.flac")]
    offline = run_cli("transcribe", *files, "--model", checkpoint, "--device", "cpu", "--latency-ms", "160", "--json")
    streamed = run_cli("transcribe", *files, "--model", checkpoint, "--device", "cpu", "--latency-ms", "160", "--json", "--stream")
    for done in (offline, streamed):
        assert done.returncode == 0, done.stderr
    off_lines = [json.loads(line) for line in offline.stdout.splitlines()]
    stream_lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    model = ms_model("nemotron_tdt")
    for name in ("jfk.wav", "61-70968-0000.flac"):
        expected = model.transcribe(audio_clips[name], latency_ms=160)
        finals = [d for d in off_lines + stream_lines if d["type"] == "final" and d["file"].endswith(name)]
        assert len(finals) == 2
        for final in finals:
            assert [t["id"] for t in final["tokens"]] == expected.token_ids
            assert final["text"] == expected.text
            assert [w["word"] for w in final["words"]] == [w.text for w in expected.words]
        partials = [d for d in stream_lines if d["type"] == "partial" and d["file"].endswith(name)]
        assert len(partials) >= 2 and all(expected.text.startswith(p["text"]) for p in partials)
    # the last line for each file is its final
    assert stream_lines[-1]["type"] == "final"


def test_plain_text_output(checkpoint, ms_model, audio_clips):
    done = run_cli("transcribe", str(DATA / "jfk.wav"), "--model", checkpoint, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ms_model("nemotron_tdt").transcribe(audio_clips["jfk.wav"]).text.strip()


def test_bad_files_get_one_line_errors_and_the_rest_still_run(checkpoint, tmp_path):
    """Every kind of bad file gets its one line and the others are transcribed, exit status 1: a missing
    file and a directory said at once (before the model loads), an empty or corrupt one when its turn
    comes."""
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC" + b"\x00" * 64)
    missing = tmp_path / "missing.wav"
    done = run_cli("transcribe", str(empty), str(DATA / "jfk.wav"), str(missing), str(corrupt), str(DATA),
                   "--model", checkpoint, "--device", "cpu", "--json")
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("monosemantic: error: ") for line in errors)
    assert errors[:2] == [
        f"monosemantic: error: {missing}: no such file",
        f"monosemantic: error: {DATA}: is a directory, not an audio file",
    ]
    assert "Traceback" not in done.stderr
    finals = [json.loads(line) for line in done.stdout.splitlines()]
    assert [f["file"] for f in finals if f["type"] == "final"] == [str(DATA / "jfk.wav")]


def test_missing_files_and_directories_are_said_before_the_model_loads(tmp_path):
    """A mistyped file name was found only after the model had loaded (downloaded, on a first run). The
    paths are now checked first: their errors come before the model's, and with no file left a model that
    does not exist is never looked at."""
    missing = tmp_path / "missing.wav"
    done = run_cli("transcribe", str(DATA / "jfk.wav"), str(missing), str(DATA), "--model", "/no/such.nemo")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and done.stdout == "" and len(lines) == 3
    assert lines[:2] == [
        f"monosemantic: error: {missing}: no such file",
        f"monosemantic: error: {DATA}: is a directory, not an audio file",
    ]
    assert "not found" in lines[2]  # then the model
    done = run_cli("transcribe", str(missing), str(DATA), "--model", "/no/such.nemo")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == lines[:2]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "/no/such.nemo"], "not found"),
        (["--latency-ms", "100"], "not a mode"),
        (["--device", "tpu"], "invalid device"),
        (["--device", "meta"], "invalid device"),
        (["--dtype", "int4"], "invalid dtype"),
        (["--realtime"], "--realtime paces --stream"),  # it was ignored: the file was transcribed offline
    ],
)
def test_bad_options_one_line_error(checkpoint, args, needle):
    if "--model" not in args:
        args = [*args, "--model", checkpoint]
    done = run_cli("transcribe", str(DATA / "jfk.wav"), *args)
    assert done.returncode != 0
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_output_into_a_closed_pipe_is_no_traceback(nemo_checkpoint):
    """`monosemantic transcribe a.wav b.wav | head -1`: once the reader has gone, printing the next result
    raised BrokenPipeError with a traceback."""
    checkpoint = str(nemo_checkpoint("nemotron_rnnt"))
    cmd = [sys.executable, "-m", "monosemantic", "transcribe", *[str(DATA / "jfk.wav")] * 3, "--model", checkpoint, "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=600)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert proc.returncode != 0


def test_stream_of_a_full_context_model_takes_latency_ms_as_its_partial_interval(nemo_checkpoint, ms_model, audio_clips):
    """A full-context model's stream recomputes its partial every latency_ms (README); `transcribe --stream
    --latency-ms 500` refused it ('has full-context attention and no latency modes; omit latency_ms')
    before reading a file. Offline, the option is still refused."""
    checkpoint = str(nemo_checkpoint("parakeet_tdt"))
    base = ["transcribe", str(DATA / "jfk.wav"), "--model", checkpoint, "--device", "cpu", "--latency-ms", "500"]
    done = run_cli(*base, "--stream", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    expected = ms_model("parakeet_tdt").transcribe(audio_clips["jfk.wav"])
    assert lines[-1]["type"] == "final" and [t["id"] for t in lines[-1]["tokens"]] == expected.token_ids
    assert sum(line["type"] == "partial" for line in lines) > 2  # every 500 ms of an 11 s clip, not every 1000
    offline = run_cli(*base)
    assert offline.returncode == 1 and "full-context" in offline.stderr and len(offline.stderr.strip().splitlines()) == 1
    bad = run_cli(*base[:-1], "0", "--stream")
    assert bad.returncode == 1 and "positive integer" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_file_name_that_is_not_utf8_is_read_and_shown(checkpoint, tmp_path):
    """A Linux file name may hold bytes that are not UTF-8 (Python holds them as surrogates). soundfile
    could not open such a file, and once it could, printing its name as the line's label stopped the run
    with "'utf-8' codec can't encode character '\\udce9'" where stdout is strict UTF-8 (a UTF-8 locale
    such as en_US.UTF-8, PYTHONIOENCODING below); the files after it were not transcribed."""
    import os
    import shutil

    if sys.platform == "win32":
        pytest.skip("Windows file names are Unicode")
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9.wav")
    try:
        shutil.copyfile(DATA / "jfk.wav", odd)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    done = subprocess.run(
        [sys.executable, "-m", "monosemantic", "transcribe", odd, str(DATA / "jfk.wav"), "--model", checkpoint, "--device", "cpu"],
        capture_output=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    lines = done.stdout.decode("utf-8").splitlines()
    assert [line.split(":")[0] for line in lines] == ["caf\ufffd.wav", "jfk.wav"]
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]
