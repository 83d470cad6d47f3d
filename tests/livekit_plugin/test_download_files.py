"""`download-files`: LiveKit's CLI calls every registered plugin's `download_files()` so that a Docker
build can bake models into the image. The plugin's fetches the default model into the Hugging Face cache,
as `load_model(DEFAULT_MODEL)` would at the first stream.

No hub is reachable from the tests: the real runs below use a Hugging Face cache laid out as a download
leaves it, offline (huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import, hence subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import monosemantic

pytestmark = pytest.mark.timeout(300)

AGENT = textwrap.dedent(
    """
    from livekit.agents import AgentServer, JobContext, cli
    from livekit.plugins import monosemantic  # noqa: F401  (registers the plugin)

    server = AgentServer()


    @server.rtc_session()
    async def entrypoint(ctx: JobContext) -> None:
        pass


    if __name__ == "__main__":
        cli.run_app(server)
    """
)
# `python -m livekit.agents download-files` finds plugins by listing the livekit.plugins namespace, which
# an editable install of this repo does not show; importing the plugin first registers it all the same.
MODULE_CLI = (
    "import sys\n"
    "from livekit.plugins import monosemantic\n"
    "from livekit.agents.__main__ import main\n"
    "sys.exit(main(['download-files']))\n"
)
COMMANDS = {"agent script": ["agent.py", "download-files"], "python -m livekit.agents": ["-c", MODULE_CLI]}


def offline_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    return {**env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "400"}


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "agent.py").write_text(AGENT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


@pytest.mark.parametrize("cli", sorted(COMMANDS))
def test_download_files_fetches_the_default_model_that_load_model_then_reads(cli, hf_home_with, tmp_path):
    hf_home = hf_home_with("nemotron_rnnt", monosemantic.DEFAULT_MODEL)
    env = offline_env(hf_home)
    done = run(COMMANDS[cli], env, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # It says where the model is: the .nemo of the default repo's snapshot in this cache.
    snapshot = hf_home / "hub" / f"models--{monosemantic.DEFAULT_MODEL.replace('/', '--')}" / "snapshots"
    nemo = next(snapshot.glob("*/*.nemo"))
    assert str(nemo) in " ".join(output.split()), output

    code = "import monosemantic\nprint(monosemantic.load_model(monosemantic.DEFAULT_MODEL, device='cpu').source)"
    loaded = run(["-c", code], env, tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == monosemantic.DEFAULT_MODEL


@pytest.mark.parametrize("cli", sorted(COMMANDS))
def test_download_files_without_the_hub_fails_with_a_clear_error(cli, tmp_path):
    """It did nothing and succeeded: the image was built without its model, fetched at the first call."""
    done = run(COMMANDS[cli], offline_env(tmp_path / "empty_hf_home"), tmp_path)
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    assert monosemantic.DEFAULT_MODEL in output and "HF_HUB_OFFLINE" in output, output
    assert "pass the path" not in output  # load_model's advice: download-files has no path to take


def test_download_files_asks_the_hub_for_what_load_model_reads(tmp_path, monkeypatch):
    """The same repo, revision and file patterns as `load_model(DEFAULT_MODEL)`, so the baked cache holds
    exactly what the first stream looks for."""
    import huggingface_hub
    from livekit.agents import Plugin

    from livekit.plugins import monosemantic as plugin

    calls: list[tuple] = []

    def snapshot_download(*args, **kwargs):
        calls.append((args, kwargs))
        (tmp_path / "model.nemo").write_bytes(b"")  # empty: load_model stops at reading it, after the call
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    registered = [p for p in Plugin.registered_plugins if p.package == plugin.__package__]
    assert len(registered) == 1
    registered[0].download_files()
    with pytest.raises(monosemantic.ModelLoadError):
        monosemantic.load_model(monosemantic.DEFAULT_MODEL, device="cpu")
    assert len(calls) == 2 and calls[0] == calls[1]


def _download_files_with_hub(tmp_path, monkeypatch, *, fails: tuple[str, ...] = ()) -> list[str]:
    """Run the registered plugin's download_files() against a stand-in hub; returns the repos it asked
    for (those in `fails` raise as an unreachable hub would)."""
    import huggingface_hub
    from livekit.agents import Plugin

    from livekit.plugins import monosemantic as plugin

    asked: list[str] = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        if repo_id in fails:
            raise ConnectionError("hub unreachable")
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        (snapshot / "model.nemo").write_bytes(b"")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    [registered] = [p for p in Plugin.registered_plugins if p.package == plugin.__package__]
    registered.download_files()
    return asked


def test_download_files_also_fetches_the_model_monosemantic_model_names(tmp_path, monkeypatch):
    """An agent configured by MONOSEMANTIC_MODEL (the example agent reads it) loads that model, which
    download-files did not fetch: the image was built without it, and the first session downloaded it."""
    monkeypatch.setenv("MONOSEMANTIC_MODEL", "acme/custom-asr")
    assert _download_files_with_hub(tmp_path, monkeypatch) == [monosemantic.DEFAULT_MODEL, "acme/custom-asr"]


def test_download_files_fetches_nothing_for_a_local_monosemantic_model(tmp_path, monkeypatch):
    """A path is read where it is (also one that exists only where the agent runs, a mounted volume)."""
    checkpoint = tmp_path / "mine.nemo"
    checkpoint.write_bytes(b"")
    for local in (str(checkpoint), "/models/not-mounted-yet.nemo", "~/models/asr", "./asr.nemo"):
        monkeypatch.setenv("MONOSEMANTIC_MODEL", local)
        assert _download_files_with_hub(tmp_path, monkeypatch) == [monosemantic.DEFAULT_MODEL]


def test_download_files_names_the_monosemantic_model_it_could_not_fetch(tmp_path, monkeypatch):
    from livekit.agents._exceptions import CLIError

    monkeypatch.setenv("MONOSEMANTIC_MODEL", "acme/custom-asr")
    with pytest.raises(CLIError) as info:
        _download_files_with_hub(tmp_path, monkeypatch, fails=("acme/custom-asr",))
    assert "MONOSEMANTIC_MODEL" in str(info.value) and "acme/custom-asr" in str(info.value)
