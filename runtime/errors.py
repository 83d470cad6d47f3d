"""Exceptions raised by monosemantic.

Every error a user can cause (a bad path, an unsupported checkpoint, bad audio) is one of these, with a
message that says what was wrong and what to do; the CLI prints the message on one line instead of a
traceback.
"""

from __future__ import annotations


class MonosemanticError(Exception):
    """Base class of every error monosemantic raises on purpose."""


class ModelLoadError(MonosemanticError):
    """The checkpoint could not be found, read or loaded (missing file, no network, corrupt archive,
    missing or unexpected weight)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is readable but its architecture is one this runtime does not implement."""


class AudioError(MonosemanticError):
    """Audio that cannot be used: unreadable file, wrong dtype, NaN/inf samples, bad sample rate."""


class StreamError(MonosemanticError):
    """A streaming call that is not valid in the stream's current state (e.g. push after finalize)."""


class PushTimeoutError(StreamError):
    """A push or flush waited `push_timeout_seconds` for room in the stream's buffer (the engine is
    overloaded). `accepted` says whether the call's own audio was taken: if so, what is not yet written
    goes first at the stream's next push or flush and must not be pushed again; if not (an earlier push's
    audio still waited for room), push it again."""

    def __init__(self, message: str, accepted: bool):
        super().__init__(message)
        self.accepted = accepted


class CapacityError(MonosemanticError):
    """The engine is serving its maximum number of streams (close one or raise EngineConfig.max_streams), or
    its max_streams slots of state would not fit in the memory available (lower it)."""


class MissingDependencyError(MonosemanticError, ImportError):
    """An optional dependency is needed for this feature; the message names the extra to install."""


def missing_dependency(package: str, extra: str, feature: str) -> MissingDependencyError:
    """Build the error for an optional import that failed, naming the pip extra that provides it."""
    return MissingDependencyError(
        f"{feature} needs the '{package}' package, which is not installed. "
        f"Install it with: pip install 'monosemantic[{extra}]'"
    )
