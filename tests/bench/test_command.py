"""`monosemantic bench`: the search for the most streams sustained in real time (against a fake system
with a known edge), and its command line's refusal of arguments no run can use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monosemantic.bench.command import find_max_interleaved, find_max_streams
from monosemantic.bench.result import BenchResult


def system(edge: int):
    """A trial that is sustained up to `edge` streams (p95 below the 160 ms chunk), and which ones ran."""
    tried: list[int] = []

    def trial(n: int) -> BenchResult:
        tried.append(n)
        latency = 100.0 if n <= edge else 300.0
        return BenchResult("fake", n, 160, 1.0, 1.0, 0.1, chunk_latency_ms=[latency] * 20)

    return trial, tried


@pytest.mark.parametrize("within", [0.0, 0.05, 0.125])
@pytest.mark.parametrize("edge", [0, 1, 3, 7, 8, 9, 15, 40, 53, 100])
def test_finds_the_edge_from_above_or_below_the_start(edge, within):
    trial, tried = system(edge)
    found, results = find_max_streams(trial, start=8, limit=64, log=lambda res: None, within=within)
    assert len(results) == len(tried) and len(set(tried)) == len(tried)  # no count tried twice
    assert found <= min(edge, 64) and all(results[tried.index(n)].sustained for n in tried if n <= found)
    # Within the tolerance of the edge (or at the limit), from a start above the edge as well as below it:
    # the search stopped because a count at most that far above the maximum failed.
    assert min(edge, 64) - found <= max(1, int(found * within))
    if found < 64:
        failed_above = min(n for n in tried if n > found and not results[tried.index(n)].sustained)
        assert failed_above - found <= max(1, int(found * within))


def test_a_finer_search_costs_a_few_trials_more():
    coarse, fine = system(53), system(53)
    assert find_max_streams(coarse[0], 8, 1024, lambda res: None, within=0.125)[0] >= 47
    assert find_max_streams(fine[0], 8, 1024, lambda res: None, within=0.05)[0] >= 51
    assert len(coarse[1]) < len(fine[1]) <= len(coarse[1]) + 3


def test_interleaved_searches_take_turns_and_find_each_edge():
    """Side by side, each system's search tries what it would alone, its trials alternating with the other's."""
    edges = {"engine": 27, "nemo": 9}
    order: list[str] = []

    def recorded(name: str):
        trial, _ = system(edges[name])

        def run(n: int) -> BenchResult:
            order.append(name)
            return trial(n)

        return run

    found, results = find_max_interleaved({name: recorded(name) for name in edges}, start=8, limit=64, log=lambda res: None)
    for name, edge in edges.items():
        trial, tried = system(edge)
        alone, _ = find_max_streams(trial, start=8, limit=64, log=lambda res: None)
        assert found[name] == alone
        assert [r.streams for r in results[name]] == tried
    # Turns: while both searches run, no system runs twice in a row.
    both = 2 * min(len(r) for r in results.values())
    assert order[:both] == ["engine", "nemo"] * (both // 2)


ROOT = Path(__file__).resolve().parents[2]


def run_bench(checkpoint, *args: str) -> subprocess.CompletedProcess:
    # A short, small run first, so that arguments the command failed to refuse finish fast (or, for an
    # infinite --seconds, hang into the timeout) rather than run the default bench.
    return subprocess.run(
        [sys.executable, "-m", "monosemantic", "bench", "--model", str(checkpoint), "--device", "cpu",
         "--seconds", "1", "--streams", "1", "--no-vad", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


@pytest.fixture(scope="module")
def checkpoint(nemo_checkpoint):
    return nemo_checkpoint("nemotron_rnnt")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--seconds", "inf"], "--seconds"),  # built its workload forever, memory growing
        (["--seconds", "nan"], "--seconds"),
        (["--seconds", "0"], "--seconds"),
        (["--seconds", "-3"], "--seconds"),
        (["--seconds", "7200"], "--seconds"),
        (["--streams", "0"], "--streams"),
        (["--streams", "4", "-2"], "--streams"),
        (["--find-max", "--streams", "0"], "--streams"),
        (["--streams", "9", "--max-streams", "8"], "--streams"),
        (["--max-streams", "0"], "--max-streams"),
        (["--frame-ms", "0"], "--frame-ms"),
        (["--frame-ms", "-20"], "--frame-ms"),
        (["--latency-ms", "0"], "--latency-ms"),  # silently ran the default mode
        (["--latency-ms", "-160"], "--latency-ms"),
        (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
        (["--switch-interval-ms", "0"], "--switch-interval-ms"),  # Python refuses it with a traceback
        (["--switch-interval-ms", "nan"], "--switch-interval-ms"),
        (["--find-max", "--search-within", "-5"], "--search-within"),
        (["--find-max", "--search-within", "nan"], "--search-within"),
        (["--json", "/nonexistent_dir/out.json"], "--json /nonexistent_dir/out.json"),
        (["--batch-wait-ms", "1e12"], "--batch-wait-ms"),
        (["--load-curve"], "add --find-max"),  # was ignored without the search
        (["--search-within", "10"], "add --find-max"),
    ],
)
def test_bad_arguments_get_one_line_errors_before_any_run(checkpoint, args, needle):
    done = run_bench(checkpoint, *args)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""  # refused before the model loaded: nothing ran


def test_the_default_first_count_stays_within_max_streams():
    """--find-max --max-streams 4 without --streams starts at 4 (it was refused for the default 8, which
    the user never typed); an explicit --streams is still checked against the bound."""
    from monosemantic.bench.command import check_args
    from monosemantic.cli import _parser

    args = _parser().parse_args(["bench", "--find-max", "--max-streams", "4"])
    check_args(args)
    assert args.streams == [4] and args.search_within == 5.0
    args = _parser().parse_args(["bench"])
    check_args(args)
    assert args.streams == [8]
    with pytest.raises(ValueError, match="--streams must be in 1..4"):
        check_args(_parser().parse_args(["bench", "--streams", "8", "--max-streams", "4"]))


def test_json_that_is_a_directory_is_refused_and_a_good_path_is_written(checkpoint, tmp_path):
    refused = run_bench(checkpoint, "--json", str(tmp_path))
    assert refused.returncode != 0 and f"--json {tmp_path}: is a directory" in refused.stderr
    out = tmp_path / "bench.json"
    done = run_bench(checkpoint, "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"runs"' in out.read_text() and "streams=1" in done.stdout
    import json

    import torch

    machine = json.loads(out.read_text())["machine"]  # what a figure needs beside it
    assert machine["torch"] == torch.__version__ and machine["threads"] >= 1 and machine["cores"] >= 1
    assert machine["switch_interval_ms"] == 5.0  # Python's default, unless --switch-interval-ms
    assert f"torch {torch.__version__}" in done.stdout


def test_switch_interval_applies_to_the_run_and_is_recorded(checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench(checkpoint, "--switch-interval-ms", "0.5", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    assert json.loads(out.read_text())["machine"]["switch_interval_ms"] == 0.5
    assert "switch_interval_ms 0.5" in done.stdout


def test_audio_that_resamples_to_no_samples_is_refused_not_looped_forever(checkpoint, tmp_path):
    """A 1-sample 48 kHz wav comes out of the resampler as 0 samples at 16 kHz: refused in one line (it
    passed load_audio_file's emptiness check, made before resampling, and make_workload then looped
    forever adding empty utterances, its memory growing about 60 MB/s)."""
    import soundfile

    clip = tmp_path / "click.wav"
    soundfile.write(clip, np.full(1, 0.1, dtype=np.float32), 48000)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "monosemantic", "bench", "--model", str(checkpoint), "--device", "cpu",
             "--seconds", "1", "--streams", "1", "--no-vad", "--audio", str(clip)],
            capture_output=True, text=True, cwd=ROOT, timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("bench hung building its workload from a clip of 0 samples at the model's rate")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_baseline_nemo_with_a_checkpoint_directory_is_refused_before_any_run(checkpoint, tmp_path):
    """`--baseline nemo` cannot use an extracted checkpoint directory (_nemo_path): refused before any
    run, as every other unusable argument is (it was found only when the first NeMo trial started, after
    the engine's trial of the same count had run in full)."""
    import tarfile

    import soundfile

    extracted = tmp_path / "checkpoint"
    with tarfile.open(checkpoint) as tar:
        tar.extractall(extracted)
    clip = tmp_path / "short.wav"
    soundfile.write(clip, (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32), 16000)
    done = subprocess.run(
        [sys.executable, "-m", "monosemantic", "bench", "--model", str(extracted), "--device", "cpu",
         "--seconds", "0.5", "--streams", "1", "--no-vad", "--audio", str(clip), "--baseline", "nemo"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "--baseline nemo" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "streams=" not in done.stdout, "an engine trial ran before the argument was refused:\n" + done.stdout


def test_clips_too_short_for_any_chunk_latency_are_refused_in_one_line(checkpoint, tmp_path):
    """Clips no longer than two chunks give no chunk latency (each chunk is its utterance's last): the
    runs used to report NaN percentiles and "not sustained" without saying why."""
    import soundfile

    clip = tmp_path / "short.wav"
    soundfile.write(clip, (np.random.default_rng(0).standard_normal(4800) * 0.1).astype(np.float32), 16000)  # 300 ms
    done = run_bench(checkpoint, "--audio", str(clip), "--latency-ms", "160")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "longer than two 160 ms chunks" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
