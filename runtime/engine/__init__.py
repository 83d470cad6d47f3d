"""The multi-stream engine: one loop thread batching every stream of a model.

Names are resolved on first use, so the torch-free parts (config, scheduler) import without torch.
"""

_NAMES = {
    "EngineConfig": "config",
    "Engine": "frontdoor",
    "EngineStream": "frontdoor",
    "SyncEngine": "frontdoor",
    "SyncStream": "frontdoor",
    "get_engine": "shared",
    "aget_engine": "shared",
    "close_shared_engines": "shared",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
