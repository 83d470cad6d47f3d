"""One engine stream of the service and the bookkeeping that decides when it may be closed.

The service keeps one current stream for the audio it receives. When a setting that needs a new stream
changes (latency mode, model), the old stream is retired at an utterance boundary: it is flushed, keeps
delivering events until the Final of every flush it was given has arrived, and only then closes, so no
pushed audio goes untranscribed while the new stream already takes the next utterance.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from monosemantic.errors import PushTimeoutError
from monosemantic.events import Error

from .backend import StreamLike


class StreamSession:
    """An engine stream, the task reading its events, and what is still owed by it."""

    def __init__(
        self,
        stream: StreamLike,
        latency_ms: int | None,
        model: str,
        after: "StreamSession | None" = None,
        on_sent: Callable[[bytes], None] | None = None,
    ):
        self.stream = stream
        # Told of every audio the stream took (the service's usage metrics count what reached a stream).
        self.on_sent = on_sent
        # The stream this one replaced. Its last Final is delivered before any event of this stream, so
        # transcripts stay in utterance order although both streams run at once.
        self.after = after
        self.done = asyncio.Event()  # set when the event task has finished
        self.latency_ms = latency_ms
        self.model = model
        self.task: asyncio.Task | None = None
        self.unflushed = False  # audio pushed since the last flush (a flush now would owe a Final)
        self.outstanding = 0  # flushes whose Final has not arrived yet
        self.retiring = False  # close once nothing is outstanding
        self.closed = False
        self.error: Error | None = None  # the error that took it out of service (reported at its end)
        # For counting a stream that ends at once as a failed open (the service's _QUICK_FAILURE_SECONDS):
        self.opened_at = time.monotonic()  # when it opened (the service's clock)
        self.adopted = False  # the service took it as its current stream (else its open counts a failure)
        self.heard = False  # a transcript (Partial or Final) came: the server works
        self.ended = False  # its events are over
        self.end_reason: str | None = None  # why, when the service did not end it

    async def push(self, audio: bytes) -> None:
        try:
            await self.stream.push(audio)
        except PushTimeoutError as e:
            # Timed out on an overloaded engine after taking its audio: that audio goes at the next push
            # or flush, so a flush owes its Final.
            if e.accepted:
                self.unflushed = True
                self._sent(audio)
            raise
        self.unflushed = True
        self._sent(audio)

    async def keepalive(self, silence: bytes) -> None:
        """Send silence that keeps an idle connection open. It is not an utterance's audio: a flush does
        not owe a Final for it alone (`unflushed` is left as it was), and if speech follows, the silence
        is the start of that utterance, as the transport's own silence between turns is."""
        await self.stream.push(silence)
        self._sent(silence)

    def _sent(self, audio: bytes) -> None:
        if self.on_sent is not None:
            self.on_sent(audio)

    async def flush(self) -> bool:
        """End the utterance if audio was pushed since the last flush; True if a Final is now owed."""
        if not self.unflushed:
            return False
        self.unflushed = False
        self.outstanding += 1
        try:
            await self.stream.flush()
        except BaseException:
            # Not flushed (a flush timed out on an overloaded engine keeps the audio, unended): the audio
            # is still owed a flush, or a later one (the EndFrame's) would find nothing to flush.
            self.outstanding -= 1
            self.unflushed = True
            raise
        return True

    async def retire(self) -> None:
        """Flush what was pushed, then close as soon as the last Final owed has arrived."""
        self.retiring = True
        await self.flush()
        if not self.outstanding:
            await self.close()

    def final_arrived(self) -> bool:
        """Count one Final in; True when the stream is retiring and owes nothing more (close it)."""
        if not self.outstanding:  # a Final nobody asked for: a server draining on shutdown flushed for us
            self.unflushed = False
        self.outstanding = max(0, self.outstanding - 1)
        return self.retiring and not self.outstanding

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.stream.close()
