"""Loading checkpoints: .nemo (plain and gzip tar), extracted directories, Hugging Face repo ids from the
local cache; strict weights; clear errors for corrupt files and unsupported architectures."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

import monosemantic
from monosemantic.errors import ModelLoadError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[2]


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_nemo(path: Path, members: dict[str, bytes], mode: str = "w:") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def extract(members: dict[str, bytes], directory: Path) -> Path:
    for name, data in members.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def with_weights(members: dict[str, bytes], edit) -> dict[str, bytes]:
    key = next(k for k in members if k.endswith("model_weights.ckpt"))
    state = torch.load(io.BytesIO(members[key]), weights_only=True)
    edit(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return {**members, key: buf.getvalue()}


def with_config(members: dict[str, bytes], edit) -> dict[str, bytes]:
    key = next(k for k in members if k.endswith("model_config.yaml"))
    config = yaml.safe_load(members[key])
    edit(config)
    return {**members, key: yaml.safe_dump(config).encode()}


@pytest.fixture(scope="module")
def members(nemo_checkpoint):
    return read_members(nemo_checkpoint("nemotron_rnnt"))


@pytest.fixture(scope="module")
def reference_tokens(ms_model, audio_clips):
    return ms_model("nemotron_rnnt").transcribe(audio_clips["jfk.wav"]).token_ids


def test_gzip_archive_and_extracted_directory_load_identically(members, tmp_path, audio_clips, reference_tokens):
    gz = write_nemo(tmp_path / "model.nemo", members, "w:gz")
    assert monosemantic.load_model(gz, device="cpu").transcribe(audio_clips["jfk.wav"]).token_ids == reference_tokens
    model = monosemantic.load_model(str(extract(members, tmp_path / "extracted")), device="cpu")
    assert model.transcribe(audio_clips["jfk.wav"]).token_ids == reference_tokens


def test_missing_key_is_named(members, tmp_path):
    bad = with_weights(members, lambda s: s.pop("encoder.layers.1.self_attn.linear_pos.weight"))
    with pytest.raises(ModelLoadError, match=r"missing key\(s\): encoder\.layers\.1\.self_attn\.linear_pos\.weight"):
        monosemantic.load_model(write_nemo(tmp_path / "m.nemo", bad), device="cpu")


def test_unexpected_key_is_named(members, tmp_path):
    bad = with_weights(members, lambda s: s.__setitem__("encoder.extra_head.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\): encoder\.extra_head\.weight"):
        monosemantic.load_model(write_nemo(tmp_path / "m.nemo", bad), device="cpu")


def test_wrong_shape_is_named(members, tmp_path):
    def edit(state):
        state["joint.enc.weight"] = torch.zeros(3, 3)

    with pytest.raises(ModelLoadError, match=r"'joint\.enc\.weight' has shape \(3, 3\)"):
        monosemantic.load_model(write_nemo(tmp_path / "m.nemo", with_weights(members, edit)), device="cpu")


def test_config_weights_mismatch_is_an_error(members, tmp_path):
    """A config claiming more layers than the weights hold must not half-load."""
    bad = with_config(members, lambda c: c["encoder"].__setitem__("n_layers", 3))
    with pytest.raises(ModelLoadError, match=r"missing key\(s\): encoder\.layers\.2\."):
        monosemantic.load_model(write_nemo(tmp_path / "m.nemo", bad), device="cpu")


def test_unsupported_architecture_is_refused_by_name(members, tmp_path):
    bad = with_config(members, lambda c: c.__setitem__("target", "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"))
    with pytest.raises(UnsupportedModelError, match="EncDecCTCModelBPE: CTC-only"):
        monosemantic.load_model(write_nemo(tmp_path / "m.nemo", bad), device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_config", "bad_yaml", "bad_weights", "no_tokenizer"])
def test_corrupt_checkpoint_gives_clear_error(members, nemo_checkpoint, tmp_path, damage):
    path = tmp_path / "broken.nemo"
    if damage == "truncated":
        data = Path(nemo_checkpoint("nemotron_rnnt")).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(5000))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no_config":
        write_nemo(path, {k: v for k, v in members.items() if not k.endswith("model_config.yaml")})
    elif damage == "bad_yaml":
        key = next(k for k in members if k.endswith("model_config.yaml"))
        write_nemo(path, {**members, key: b"encoder: [unclosed"})
    elif damage == "bad_weights":
        key = next(k for k in members if k.endswith("model_weights.ckpt"))
        write_nemo(path, {**members, key: b"not a torch file"})
    else:
        write_nemo(path, {k: v for k, v in members.items() if not k.endswith(".model")})
    with pytest.raises(ModelLoadError) as info:
        monosemantic.load_model(path, device="cpu")
    assert "broken.nemo" in str(info.value)


def test_missing_path_and_bad_options():
    with pytest.raises(ModelLoadError, match="not found"):
        monosemantic.load_model("/no/such/model.nemo", device="cpu")
    with pytest.raises(ModelLoadError, match="not found"):
        monosemantic.load_model("no_such_file.nemo", device="cpu")
    with pytest.raises(ValueError, match="invalid dtype"):
        monosemantic.load_model("/no/such/model.nemo", dtype="int8")
    with pytest.raises(ValueError, match="invalid device"):
        monosemantic.load_model("/no/such/model.nemo", device="tpu")
    # device types torch knows but the runtime does not run on (they failed later, deep in torch)
    for device in ("meta", "mps", "xla", "hpu"):
        with pytest.raises(ValueError, match="invalid device"):
            monosemantic.load_model("/no/such/model.nemo", device=device)


@pytest.mark.parametrize("source", [None, 5, b"/tmp/model.nemo", ""])
def test_a_model_that_is_no_path_or_repo_id_is_a_load_error(source):
    with pytest.raises(ModelLoadError, match="model must be"):
        monosemantic.load_model(source, device="cpu")


def test_a_path_that_is_neither_file_nor_directory_is_named_so():
    with pytest.raises(ModelLoadError, match="neither a file nor a directory"):
        monosemantic.load_model("/dev/null", device="cpu")


def test_an_unreadable_directory_is_a_load_error(tmp_path, monkeypatch):
    """As `load_model('/')` met /proc: the OSError used to escape raw."""
    from pathlib import Path

    def unreadable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", unreadable)
    with pytest.raises(ModelLoadError, match="cannot read this directory"):
        monosemantic.load_model(str(tmp_path), device="cpu")


def test_checkpoint_directory_layouts(members, nemo_checkpoint, tmp_path, audio_clips, reference_tokens):
    """An archive extracted into a folder of the directory given, and a directory holding one .nemo file
    (what `huggingface-cli download --local-dir` leaves), load as the checkpoint itself does."""
    nested = extract(members, tmp_path / "nested" / "nemotron")
    (tmp_path / "nested" / "README.md").write_text("notes")
    downloaded = tmp_path / "download"
    downloaded.mkdir()
    (downloaded / "model.nemo").write_bytes(Path(nemo_checkpoint("nemotron_rnnt")).read_bytes())
    (downloaded / "config.json").write_text("{}")
    for directory in (nested.parent, downloaded):
        model = monosemantic.load_model(str(directory), device="cpu")
        assert model.transcribe(audio_clips["jfk.wav"]).token_ids == reference_tokens


def test_a_directory_that_is_no_checkpoint_is_answered_without_a_walk(members, tmp_path, monkeypatch):
    """`load_model(<home directory>)` used to walk the whole tree below it (rglob), and took a checkpoint
    found at any depth; now only the directory and its direct subdirectories are looked at."""
    extract(members, tmp_path / "a" / "b")  # a checkpoint two levels down is not this directory's
    from pathlib import Path

    def no_walk(self, pattern):
        raise AssertionError("walked the tree")

    monkeypatch.setattr(Path, "rglob", no_walk)
    with pytest.raises(ModelLoadError, match="has no model_config.yaml"):
        monosemantic.load_model(str(tmp_path), device="cpu")


def test_a_directory_of_several_checkpoints_names_them(members, tmp_path):
    extract(members, tmp_path / "one")
    extract(members, tmp_path / "two")
    write_nemo(tmp_path / "three.nemo", members)
    with pytest.raises(ModelLoadError, match=r"several checkpoints \(one/, two/, three.nemo\)"):
        monosemantic.load_model(str(tmp_path), device="cpu")


def test_an_extracted_directory_without_weights_names_them(members, tmp_path):
    directory = extract({k: v for k, v in members.items() if not k.endswith("model_weights.ckpt")}, tmp_path / "x")
    with pytest.raises(ModelLoadError, match="has no 'model_weights.ckpt'"):
        monosemantic.load_model(str(directory), device="cpu")


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_hugging_face_repo_id_from_local_cache(hf_home_with, reference_tokens):
    hf_home = hf_home_with("nemotron_rnnt", "nvidia/tiny-nemotron")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    code = (
        "import monosemantic, soundfile\n"
        "audio, _ = soundfile.read('tests/data/jfk.wav', dtype='float32')\n"
        "m = monosemantic.load_model('nvidia/tiny-nemotron', device='cpu')\n"
        "print(m.transcribe(audio).token_ids)\n"
    )
    done = _run(code, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(reference_tokens)

    missing = _run("import monosemantic\nmonosemantic.load_model('nvidia/not-cached', device='cpu')", env)
    assert missing.returncode != 0
    last = missing.stderr.strip().splitlines()[-1]
    assert "ModelLoadError" in last and "HF_HUB_OFFLINE" in last and "local" in last
