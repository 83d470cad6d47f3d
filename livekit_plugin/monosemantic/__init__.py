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


class MonosemanticPlugin(Plugin):
    def __init__(self) -> None:
        super().__init__(__name__, __version__, __package__, logger)


Plugin.register_plugin(MonosemanticPlugin())
