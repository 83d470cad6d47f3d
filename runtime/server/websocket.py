"""The stream endpoint's WebSocketResponse: aiohttp's, with the frame limit and the close reason that
docs/protocol.md promises."""

from __future__ import annotations

from aiohttp import WSCloseCode, web


class StreamSocket(web.WebSocketResponse):
    """`max_frame_bytes` is the largest message accepted, itself included: aiohttp's `max_msg_size`
    refuses a message of exactly that size, so it is given one more. A message over the limit closes
    with 1009 and reason `message_too_large` (aiohttp closes it itself, without a reason)."""

    def __init__(self, *, max_frame_bytes: int, **kwargs):
        super().__init__(max_msg_size=max_frame_bytes + 1, **kwargs)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not message:
            message = b"message_too_large"
        return await super().close(code=code, message=message, drain=drain)
