"""monosemantic speech recognition for LiveKit Agents.

    from livekit.plugins import monosemantic
    session = AgentSession(stt=monosemantic.STT(), vad=silero.VAD.load(), llm=..., tts=...)

Every STT of a process with the same model, device, dtype and engine_config shares one engine, so all
of the process's sessions are recognized in shared batches. See livekit_plugin/README.md.
"""

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
        build can bake it into the image."""
        import monosemantic
        from monosemantic.models.checkpoint import download_from_hub

        model = monosemantic.DEFAULT_MODEL
        logger.info("fetching the speech model %s into the Hugging Face cache", model)
        try:
            path = download_from_hub(model)
        except monosemantic.ModelLoadError as exc:
            raise _DownloadError(f"monosemantic could not download its default model: {exc}") from None
        logger.info("the speech model %s is in the Hugging Face cache: %s", model, path)


Plugin.register_plugin(MonosemanticPlugin())
