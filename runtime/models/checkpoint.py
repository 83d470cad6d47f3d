"""Reading NeMo checkpoints: a `.nemo` file, an extracted checkpoint directory, or a Hugging Face repo id.

A `.nemo` file is a tar archive (uncompressed, sometimes gzip) holding `model_config.yaml`,
`model_weights.ckpt` (a plain torch state_dict) and the tokenizer artifacts, which the yaml names as
`nemo:<uuid>_tokenizer.model`. Member names may carry a leading `./`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from ..errors import ModelLoadError

CONFIG_NAME = "model_config.yaml"
WEIGHTS_NAME = "model_weights.ckpt"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What reading a damaged archive raises: tarfile turns zlib errors into ReadError only in member headers;
# in a gzip archive, corrupt data under a member (met while seeking past it or reading it) is a zlib.error.
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


@dataclass
class Checkpoint:
    """The raw contents of a checkpoint, before any model is built."""

    source: str  # what the user passed
    path: str  # the file or directory actually read
    config: dict[str, Any]  # parsed model_config.yaml
    state_dict: dict[str, torch.Tensor]
    tokenizer_proto: bytes  # SentencePiece model file contents


def _artifact_name(reference: str | None) -> str | None:
    if not reference or not isinstance(reference, str):  # malformed: parse_model_config names it
        return None
    return os.path.basename(reference[len("nemo:") :] if reference.startswith("nemo:") else reference)


def _load_yaml(data: bytes, where: str) -> dict[str, Any]:
    try:
        config = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{where}: {CONFIG_NAME} is not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: {CONFIG_NAME} does not hold a model config")
    return config


def _load_weights(source: bytes | Path | IO[bytes], where: str) -> dict[str, torch.Tensor]:
    try:
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ModelLoadError(f"{where}: cannot read {WEIGHTS_NAME} ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{where}: {WEIGHTS_NAME} is not a state_dict of tensors")
    return state


def _tokenizer_candidates(config: dict[str, Any]) -> list[str]:
    # Read before the config is validated: a malformed section yields no names here, and
    # parse_model_config then refuses it by name.
    tok = config.get("tokenizer")
    names = [_artifact_name(tok.get("model_path"))] if isinstance(tok, dict) else []
    return [n for n in names if n]


def read_nemo_file(path: Path, source: str) -> Checkpoint:
    """Read a .nemo archive without extracting it to disk."""
    where = f"'{source}'"
    try:
        archive = tarfile.open(path, "r:")
    except tarfile.ReadError:
        try:
            archive = tarfile.open(path, "r:gz")
        except (tarfile.ReadError, OSError, EOFError) as exc:
            raise ModelLoadError(f"{where} is not a valid .nemo archive (a tar file): {exc}") from None
    except OSError as exc:
        raise ModelLoadError(f"{where}: cannot open: {exc}") from None
    with archive:
        try:
            members = {os.path.normpath(m.name).lstrip("./"): m for m in archive.getmembers() if m.isfile()}
        except _ARCHIVE_ERRORS as exc:
            raise ModelLoadError(f"{where} is a corrupt .nemo archive: {exc}") from None

        def open_member(name: str) -> IO[bytes]:
            member = members.get(name) or next((m for k, m in members.items() if os.path.basename(k) == name), None)
            if member is None:
                raise ModelLoadError(f"{where} has no '{name}' inside; is it a NeMo checkpoint?")
            return archive.extractfile(member)

        def read(name: str) -> bytes:
            try:
                return open_member(name).read()
            except _ARCHIVE_ERRORS as exc:
                raise ModelLoadError(f"{where}: cannot read '{name}' from the archive: {exc}") from None

        config = _load_yaml(read(CONFIG_NAME), where)
        # torch.load reads the member in place (seekable for plain tar): no second copy of the weights.
        state = _load_weights(open_member(WEIGHTS_NAME), where)
        proto = _read_tokenizer(config, list(members), read, where)
    return Checkpoint(source=source, path=str(path), config=config, state_dict=state, tokenizer_proto=proto)


def read_checkpoint_dir(path: Path, source: str) -> Checkpoint:
    """Read a checkpoint directory: the contents of a .nemo archive extracted into it, or into its one
    subdirectory that holds them, or a directory holding a single .nemo file (a Hugging Face download).
    Nothing below its direct subdirectories is looked at: a directory that is not a checkpoint, say a
    home directory, is answered at once, not searched."""
    where = f"'{source}'"
    entries = sorted(path.iterdir())
    files = {p.name: p for p in entries if p.is_file()}
    if CONFIG_NAME not in files:
        inner = [d for d in entries if d.is_dir() and (d / CONFIG_NAME).is_file()]
        archives = [name for name in files if name.endswith(".nemo")]
        if len(inner) == 1 and not archives:
            return read_checkpoint_dir(inner[0], source)
        if len(archives) == 1 and not inner:
            return read_nemo_file(files[archives[0]], source)
        if inner or archives:
            found = [f"{d.name}/" for d in inner] + archives
            raise ModelLoadError(f"{where} holds several checkpoints ({', '.join(found)}); pass the one to load")
        raise ModelLoadError(
            f"{where} has no {CONFIG_NAME} (nor a .nemo file); pass a .nemo file or the directory a .nemo "
            f"archive was extracted into"
        )

    def member(name: str) -> Path:
        if name not in files:
            raise ModelLoadError(f"{where} has no '{name}'; is it an extracted NeMo checkpoint?")
        return files[name]

    def read(name: str) -> bytes:
        return member(name).read_bytes()

    config = _load_yaml(read(CONFIG_NAME), where)
    state = _load_weights(member(WEIGHTS_NAME), where)
    proto = _read_tokenizer(config, list(files), read, where)
    return Checkpoint(source=source, path=str(path), config=config, state_dict=state, tokenizer_proto=proto)


def _read_tokenizer(config, names: list[str], read, where: str) -> bytes:
    for name in _tokenizer_candidates(config):
        if any(os.path.basename(n) == name for n in names):
            return read(name)
    fallback = [n for n in names if n.endswith("tokenizer.model")]
    if len(fallback) == 1:
        return read(os.path.basename(fallback[0]))
    wanted = ", ".join(_tokenizer_candidates(config)) or "a SentencePiece tokenizer.model"
    raise ModelLoadError(f"{where}: tokenizer file not found in the checkpoint (looked for {wanted})")


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch the .nemo file of a Hugging Face repo into the Hugging Face cache (huggingface_hub's progress
    bars show the download), or find it there; returns its path. This is what `load_model(repo_id)`
    reads, so running it ahead (a Docker build, LiveKit's `download-files`) spares the first load the
    download."""
    return _nemo_in_snapshot(_hub_snapshot(repo_id, revision), repo_id)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # a core dependency, but say what to do rather than fail obscurely
        raise ModelLoadError("loading from the Hugging Face Hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.nemo"]))
    except Exception as exc:  # network, auth, offline-cache miss: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (
            "HF_HUB_OFFLINE is set and the model is not in the local Hugging Face cache"
            if offline
            else "check the network connection and the repo name (and HF_TOKEN for gated repos)"
        )
        raise ModelLoadError(
            f"fetching '{repo_id}' from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {hint}"
        ) from None


def _nemo_in_snapshot(folder: Path, repo_id: str) -> Path:
    found = sorted(folder.rglob("*.nemo"))
    if not found:
        raise ModelLoadError(f"Hugging Face repo '{repo_id}' has no .nemo file; is it a NeMo checkpoint?")
    if len(found) > 1:  # as for a directory: name the candidates rather than guess between them
        names = ", ".join(str(p.relative_to(folder)) for p in found)
        raise ModelLoadError(
            f"Hugging Face repo '{repo_id}' holds several .nemo files ({names}); pass the path of the one to "
            f"load (huggingface_hub.hf_hub_download('{repo_id}', filename) returns it)"
        )
    return found[0]


def read_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Resolve `source` (path to .nemo, checkpoint directory, or Hugging Face repo id) and read it."""
    if not isinstance(source, (str, os.PathLike)) or isinstance(source, bytes):
        raise ModelLoadError(f"model must be a path or a Hugging Face repo id (a str), got {type(source).__name__}")
    text = os.fspath(source)
    if not isinstance(text, str) or not text:  # a PathLike of bytes, or an empty name
        raise ModelLoadError(f"model must be a non-empty path or Hugging Face repo id, got {source!r}")
    path = Path(text).expanduser()
    if revision is not None and path.exists():  # a local path shadows a repo id of the same name
        raise ModelLoadError(
            f"revision={revision!r} picks a version of a Hugging Face repo, but '{text}' is a local "
            f"{'directory' if path.is_dir() else 'file'}, which has none: leave revision out to load it"
        )
    if path.is_dir():
        try:
            return read_checkpoint_dir(path, text)
        except OSError as exc:  # an unreadable entry below a directory that is no checkpoint (say '/')
            raise ModelLoadError(f"'{text}': cannot read this directory as a checkpoint ({exc})") from None
    if path.is_file():
        return read_nemo_file(path, text)
    if path.exists():
        raise ModelLoadError(f"model '{text}' is neither a file nor a directory")
    if _REPO_ID.match(text) and not text.endswith(".nemo"):
        try:
            folder = _hub_snapshot(text, revision)
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"could not load '{text}': it is not a local file or directory, and {exc}. To use a local "
                f"checkpoint, pass the path of a .nemo file or of an extracted checkpoint directory."
            ) from None
        return read_nemo_file(_nemo_in_snapshot(folder, text), text)
    raise ModelLoadError(
        f"model '{text}' not found: no such file or directory, and it is not a Hugging Face repo id "
        f"('org/name'). Pass the path of a .nemo file, an extracted checkpoint directory, or a repo id."
    )
