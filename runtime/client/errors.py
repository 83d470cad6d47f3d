"""Failures of a remote stream, typed so that adapters can map them onto their frameworks' errors
(LiveKit's APIConnectionError / APIStatusError, Pipecat's ErrorFrame) and retry the retryable ones.
All are StreamErrors, so code written against a local EngineStream catches them too."""

from __future__ import annotations

from ..errors import CapacityError, StreamError


class RemoteError(StreamError):
    """Base of the client's errors. `retryable`: trying again (later, or another server) may work."""

    retryable: bool = False


class ServerUnreachableError(RemoteError):
    """No connection could be made (refused, DNS, timeout)."""

    retryable = True


class ConnectionLostError(RemoteError):
    """The connection dropped mid-stream, or the server closed it abnormally. `code` is the WebSocket
    close code when one was received (None when the TCP connection just vanished)."""

    retryable = True

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class ServerRejectedError(RemoteError):
    """The server refused the connection before the upgrade. `status` is the HTTP status, `reason` the
    server's machine-readable reason ('unauthorized', 'capacity', 'draining', 'not_ready',
    'bad_request'), `retry_after` its Retry-After hint in seconds (None if absent)."""

    def __init__(self, message: str, status: int, reason: str | None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.retryable = status in (502, 503, 504)


class AuthenticationError(ServerRejectedError):
    """401: the API key is missing or wrong."""


class ServerCapacityError(ServerRejectedError, CapacityError):
    """503 'capacity': every stream slot of the server is in use (also a CapacityError, as a full local
    engine raises)."""
