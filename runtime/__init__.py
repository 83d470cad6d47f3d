"""monosemantic: streaming speech recognition runtime for voice agents.

    import monosemantic
    model = monosemantic.load_model("nvidia/nemotron-speech-streaming-en-0.6b")
    print(model.transcribe(audio).text)

Torch-backed names are imported on first use, so torch-free parts (events, errors, the scheduler) can be
imported without torch.
"""

from .errors import (
    AudioError,
    CapacityError,
    MissingDependencyError,
    ModelLoadError,
    MonosemanticError,
    PushTimeoutError,
    StreamError,
    UnsupportedModelError,
)
from .events import Error, Event, Final, Partial, SpeechEnded, SpeechStarted, Usage
from .transcript import Token, Transcript, Word

__version__ = "0.1.0"

_LAZY = {
    "DEFAULT_MODEL": ("asr", "DEFAULT_MODEL"),
    "ASRModel": ("asr", "ASRModel"),
    "load_model": ("asr", "load_model"),
    "Engine": ("engine", "Engine"),
    "EngineConfig": ("engine", "EngineConfig"),
    "EngineStream": ("engine", "EngineStream"),
    "SyncEngine": ("engine", "SyncEngine"),
    "VADConfig": ("vad.policy", "VADConfig"),
    "get_engine": ("engine.shared", "get_engine"),
    "aget_engine": ("engine.shared", "aget_engine"),
    "close_shared_engines": ("engine.shared", "close_shared_engines"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'monosemantic' has no attribute {name!r}")


__all__ = [
    "ASRModel",
    "AudioError",
    "CapacityError",
    "DEFAULT_MODEL",
    "Engine",
    "EngineConfig",
    "EngineStream",
    "Error",
    "Event",
    "Final",
    "MissingDependencyError",
    "ModelLoadError",
    "MonosemanticError",
    "Partial",
    "SpeechEnded",
    "SpeechStarted",
    "PushTimeoutError",
    "StreamError",
    "SyncEngine",
    "Token",
    "Transcript",
    "UnsupportedModelError",
    "Usage",
    "VADConfig",
    "Word",
    "aget_engine",
    "close_shared_engines",
    "get_engine",
    "load_model",
    "__version__",
]
