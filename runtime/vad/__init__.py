"""Voice activity detection: the Silero VAD network with explicit per-stream state (`silero`, torch) and
the policy turning its probabilities into speech start/end transitions (`policy`, pure Python).

The model names are resolved on first use so that importing the policy never loads the model module.
"""

from .policy import VADConfig, VADPolicy, VADTransition

_MODEL_NAMES = ("SileroVAD", "VADState")

__all__ = ["SileroVAD", "VADConfig", "VADPolicy", "VADState", "VADTransition"]


def __getattr__(name: str):
    if name in _MODEL_NAMES:
        from . import silero

        return getattr(silero, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
