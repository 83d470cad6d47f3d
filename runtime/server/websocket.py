"""The stream endpoint's WebSocketResponse: aiohttp's, with the frame limit and the close reason that
docs/protocol.md promises."""

from __future__ import annotations

from aiohttp import WSCloseCode, web


# The reasons of the closes aiohttp makes itself, without one, on a frame it refuses.
_REASONS = {
    WSCloseCode.MESSAGE_TOO_BIG: b"message_too_large",
    WSCloseCode.PROTOCOL_ERROR: b"protocol_error",
    WSCloseCode.INVALID_TEXT: b"protocol_error",
}


class StreamSocket(web.WebSocketResponse):
    """`max_frame_bytes` is the largest message accepted, itself included: aiohttp's `max_msg_size`
    refuses a message of exactly that size, so it is given one more. A message over the limit closes
    with 1009 and reason `message_too_large`, a frame the WebSocket protocol forbids with 1002 or 1007
    (text that is not UTF-8) and reason `protocol_error` (aiohttp closes these itself, without a
    reason)."""

    def __init__(self, *, max_frame_bytes: int, **kwargs):
        super().__init__(max_msg_size=max_frame_bytes + 1, **kwargs)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if not message:
            message = _REASONS.get(code, b"")
        return await super().close(code=code, message=message, drain=drain)
