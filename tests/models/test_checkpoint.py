"""Loading checkpoints: .nemo (plain and gzip tar), extracted directories, Hugging Face repo ids from the
local cache; strict weights; clear errors for corrupt files and unsupported architectures."""

from __future__ import annotations

import copy
import gzip
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
from monosemantic.models.checkpoint import read_checkpoint
from monosemantic.models.config import parse_model_config

ROOT = Path(__file__).resolve().parents[2]


def read_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_nemo(path: Path, members: dict[str, bytes], mode: str = "w:") -> Path:
    path.write_bytes(tar_bytes(members, gz=mode == "w:gz"))
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


def test_a_revision_with_a_local_checkpoint_is_refused(nemo_checkpoint, tmp_path):
    """`revision` picks a version of a Hugging Face repo; with a local file or directory it was ignored
    without a word, so load_model('nvidia/x', revision='jan2026') where a directory of that name was in
    the working directory (`hf download --local-dir nvidia/x`) loaded whatever that directory held."""
    path = nemo_checkpoint("nemotron_rnnt")
    for local in (path, path.parent):
        with pytest.raises(ModelLoadError, match="revision='jan2026' picks a version of a Hugging Face repo"):
            read_checkpoint(local, revision="jan2026")


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


def tar_bytes(members: dict[str, bytes], gz: bool = False) -> bytes:
    """A .nemo's bytes, the same on every run (mtime 0, no file name), so damaged offsets are stable."""
    buf = io.BytesIO()
    fileobj = gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") if gz else buf
    with tarfile.open(fileobj=fileobj, mode="w:") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if gz:
        fileobj.close()
    return buf.getvalue()


def config_key(members: dict[str, bytes]) -> str:
    return next(k for k in members if k.endswith("model_config.yaml"))


@pytest.fixture(scope="module")
def parakeet_tdt_members(nemo_checkpoint):
    return read_members(nemo_checkpoint("parakeet_tdt"))


def test_damaged_gzip_archive_is_a_load_error(members, tmp_path):
    """Corrupt deflate data under a member of a gzip .nemo raised a bare zlib.error (from tarfile's
    getmembers seeking past it, or from reading it): tarfile converts zlib errors only in headers."""
    data = tar_bytes(members, gz=True)
    path = tmp_path / "broken.nemo"
    zlib_reported = 0
    # The first 20 kB of the compressed stream hold the small members (tokenizer, config) before the weights.
    for offset in range(1000, 20000, 250):
        damaged = bytearray(data)
        for i in range(offset, offset + 16):
            damaged[i] ^= 0xA5
        path.write_bytes(bytes(damaged))
        try:
            read_checkpoint(path)
        except ModelLoadError as exc:
            assert "broken.nemo" in str(exc)
            zlib_reported += "decompressing data" in str(exc)
    assert zlib_reported > 0  # some damage hit the deflate stream itself: the case under test happened


@pytest.mark.parametrize("tokenizer", ["bpe", ["bpe"], {"type": "bpe", "model_path": 5}])
def test_a_malformed_tokenizer_section_is_a_load_error(members, tmp_path, tokenizer):
    """The reader looked up `tokenizer.model_path` before the config was validated: a tokenizer section
    that is no mapping, or a model_path that is no string, raised a bare AttributeError."""
    members = with_config(members, lambda c: c.__setitem__("tokenizer", tokenizer))
    path = tmp_path / "m.nemo"
    write_nemo(path, members)
    with pytest.raises(ModelLoadError, match="tokenizer") as info:
        monosemantic.load_model(path, device="cpu")
    assert "m.nemo" in str(info.value)


def test_tdt_is_decided_by_durations_as_in_nemo(parakeet_tdt_members, tmp_path, ms_model, audio_clips):
    """NeMo's RNNTDecoding makes a model TDT when `decoding.durations` is non-empty and never reads
    `decoding.model_type` (it defaults to 'rnnt' in RNNTDecodingConfig). A TDT checkpoint whose config
    carries the durations but no model_type was refused ("joint has 5 extra outputs but 0 TDT
    durations")."""
    members = with_config(parakeet_tdt_members, lambda c: c["decoding"].pop("model_type"))
    config = yaml.safe_load(members[config_key(members)])
    cfg = parse_model_config(config, "x")
    assert cfg.is_tdt and cfg.decoding.durations == (0, 1, 2, 3, 4)
    path = tmp_path / "tdt.nemo"
    write_nemo(path, members)
    audio = audio_clips["jfk.wav"]
    expected = ms_model("parakeet_tdt").transcribe(audio).token_ids
    assert monosemantic.load_model(path, device="cpu").transcribe(audio).token_ids == expected
    # Explicitly 'rnnt' with durations: NeMo still decodes TDT.
    explicit = copy.deepcopy(config)
    explicit["decoding"]["model_type"] = "rnnt"
    assert parse_model_config(explicit, "x").is_tdt


def test_a_rectangular_window_is_refused_by_name(members):
    """window='none' was accepted by the parser, but NeMo saves no window buffer for it (and NeMo 3.0's
    own STFT fails on it), so every such checkpoint then failed as 'weights do not match the architecture:
    missing key(s): preprocessor.featurizer.window', blaming the weights."""
    config = yaml.safe_load(members[config_key(members)])
    config["preprocessor"]["window"] = "none"
    with pytest.raises(UnsupportedModelError, match="window 'none'"):
        parse_model_config(config, "x")


@pytest.mark.parametrize("section, key", [("encoder", "xscaling"), ("preprocessor", "log")])
def test_a_null_switch_means_off_as_in_nemo(members, tmp_path, audio_clips, section, key):
    """NeMo tests these switches for truth (`if xscaling:`, `if self.log:`), so `null` in the config turns
    them off; the parser took null for 'absent' and applied the default, True: features without the log,
    or an encoder input without the sqrt(d_model) scale, silently differed from NeMo's."""
    import torch

    from _support.nemo_reference import load_nemo, nemo_encoder_output, nemo_mel

    members = with_config(members, lambda c: c[section].__setitem__(key, None))
    path = tmp_path / "null.nemo"
    write_nemo(path, members)
    model, reference = monosemantic.load_model(path, device="cpu"), load_nemo(path)
    audio = audio_clips["jfk.wav"][: 3 * 16000]
    feats, n = model.module.frontend(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    if section == "preprocessor":
        expected = nemo_mel(reference, audio)
        torch.testing.assert_close(feats[0, :, : int(n[0])], expected, atol=1e-4, rtol=1e-4)
    else:
        context = model.config.encoder.att_context_sizes[0]
        expected, length = nemo_encoder_output(reference, audio, list(context))
        with torch.no_grad():
            encoded, _ = model.module.encoder(feats, n, context)
        assert (encoded[0, :length] - expected).abs().max().item() < 1e-4


def test_a_hub_repo_with_several_nemo_files_names_them(tmp_path, monkeypatch):
    """A repo holding several .nemo files loaded the alphabetically first one without a word; the
    documented rule for directories is that several candidates are named, not guessed between."""
    import huggingface_hub

    (tmp_path / "a_streaming.nemo").write_bytes(b"")
    (tmp_path / "b_offline.nemo").write_bytes(b"")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path))
    with pytest.raises(ModelLoadError, match="several") as info:
        read_checkpoint("org/two-checkpoints")
    assert "a_streaming.nemo" in str(info.value) and "b_offline.nemo" in str(info.value)


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("encoder", "n_heads", 0, "n_heads=0"),  # was a ZeroDivisionError from d_model % n_heads
        ("encoder", "subsampling_conv_channels", 0, "subsampling_conv_channels=0"),  # ValueError from nn.Conv2d
        ("encoder", "n_layers", -2, "n_layers=-2"),  # an empty layer stack
        ("joint.jointnet", "joint_hidden", 0, "joint_hidden=0"),
        ("preprocessor", "n_window_stride", -160, "hop_length=-160"),
    ],
)
def test_a_non_positive_size_is_a_load_error_naming_its_section(members, tmp_path, section, key, value, needle):
    """Sizes of zero or less passed the parser and failed (or not) in torch, with a bare traceback."""

    def edit(config):
        node = config
        for part in section.split("."):
            node = node[part]
        node[key] = value

    path = tmp_path / "m.nemo"
    write_nemo(path, with_config(members, edit))
    with pytest.raises(ModelLoadError, match=f"in its {section.split('.')[0]} section") as info:
        monosemantic.load_model(path, device="cpu")
    assert needle in str(info.value)
