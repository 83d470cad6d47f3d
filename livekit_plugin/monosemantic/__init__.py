"""monosemantic speech recognition for LiveKit Agents.

    from livekit.plugins import monosemantic
    session = AgentSession(stt=monosemantic.STT(), vad=silero.VAD.load(), llm=..., tts=...)

Every STT of a process with the same model, device, dtype and engine_config shares one engine, so all
of the process's sessions are recognized in shared batches. See livekit_plugin/README.md.
"""

import os
from pathlib import Path

from livekit.agents import Plugin

from .log import logger
from .stream import SpeechStream
from .stt import STT
from .version import __version__

__all__ = ["STT", "SpeechStream", "__version__"]


try:  # what LiveKit's CLI reports as a plain error line, with no traceback
    from livekit.agents._exceptions import CLIError as _DownloadError
except ImportError:  # pragma: no cover - a livekit-agents that moved it: still an error, with a traceback
    _DownloadError = RuntimeError


class MonosemanticPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)

    def download_files(self) -> None:
        """`python -m livekit.agents download-files` (or `python agent.py download-files`): fetch the
        default model into the Hugging Face cache, as the first stream of an `STT()` would, so a Docker
        build can bake it into the image; and the model MONOSEMANTIC_MODEL names, when that is a Hugging
        Face repo id (the example agent, and agents written after it, load that one instead)."""
        import monosemantic

        _fetch(monosemantic.DEFAULT_MODEL, "its default model")
        configured = os.environ.get(_MODEL_VARIABLE, "").strip()
        if not configured or configured == monosemantic.DEFAULT_MODEL:
            return
        if not _is_repo_id(configured):
            # A path is read where it is, at run time: it may be a volume not mounted at build time.
            logger.info("%s=%s is a local path: nothing to fetch", _MODEL_VARIABLE, configured)
            return
        _fetch(configured, f"the model {_MODEL_VARIABLE} names ({configured})")


_MODEL_VARIABLE = "MONOSEMANTIC_MODEL"


def _is_repo_id(spec: str) -> bool:
    """Whether `spec` names a Hugging Face repo, as `load_model` tells one from a path: 'org/name', not
    an existing file or directory, not a .nemo file."""
    from monosemantic.models.checkpoint import _REPO_ID

    return bool(_REPO_ID.match(spec)) and not spec.endswith(".nemo") and not Path(spec).expanduser().exists()


def _fetch(model: str, what: str) -> None:
    import monosemantic
    from monosemantic.models.checkpoint import download_from_hub

    logger.info("fetching the speech model %s into the Hugging Face cache", model)
    try:
        path = download_from_hub(model)
    except monosemantic.ModelLoadError as exc:
        raise _DownloadError(f"monosemantic could not download {what}: {exc}") from None
    logger.info("the speech model %s is in the Hugging Face cache: %s", model, path)


Plugin.register_plugin(MonosemanticPlugin())
