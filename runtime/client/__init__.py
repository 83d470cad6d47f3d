"""Client of `monosemantic serve`: RemoteEngine / RemoteStream mirror Engine / EngineStream over a
WebSocket (docs/protocol.md). Needs the `server` extra (aiohttp)."""

from .errors import (
    AuthenticationError,
    ConnectionLostError,
    RemoteError,
    ServerCapacityError,
    ServerRejectedError,
    ServerUnreachableError,
)

__all__ = [
    "AuthenticationError",
    "ConnectionLostError",
    "RemoteEngine",
    "RemoteError",
    "RemoteStream",
    "ServerCapacityError",
    "ServerRejectedError",
    "ServerUnreachableError",
]


def __getattr__(name: str):
    if name in ("RemoteEngine", "RemoteStream"):
        from . import remote

        return getattr(remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
