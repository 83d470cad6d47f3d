"""`monosemantic serve`: one engine shared by many clients over WebSocket (docs/server.md,
docs/protocol.md). Needs the `server` extra (aiohttp, prometheus-client)."""

from .config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve", "wait_ready"):
        from ..errors import missing_dependency

        try:
            from . import app
        except ImportError as exc:
            if exc.name in ("aiohttp", "prometheus_client"):
                raise missing_dependency(exc.name, "server", "monosemantic serve") from None
            raise
        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
