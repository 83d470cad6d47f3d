"""monosemantic: streaming speech recognition runtime for voice agents.

    import monosemantic
    model = monosemantic.load_model("nvidia/nemotron-speech-streaming-en-0.6b")
    print(model.transcribe(audio).text)
"""

from .asr import DEFAULT_MODEL, ASRModel, load_model
from .errors import (
    AudioError,
    MissingDependencyError,
    ModelLoadError,
    MonosemanticError,
    StreamError,
    UnsupportedModelError,
)
from .transcript import Token, Transcript, Word

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "ASRModel",
    "AudioError",
    "MissingDependencyError",
    "ModelLoadError",
    "MonosemanticError",
    "StreamError",
    "Token",
    "Transcript",
    "UnsupportedModelError",
    "Word",
    "load_model",
    "__version__",
]
