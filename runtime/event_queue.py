"""A stream's queue of unread events, bounded for a reader that falls far behind.

Each Partial carries its utterance's whole text so far, so a stream that is pushed to but not read would
keep every one of them: memory quadratic in a long utterance, without bound in time. Once more than
UNREAD_LIMIT events wait, the queue is compacted: an unread Partial is dropped when a later unread
Partial or Final of the same utterance supersedes it, and unread Usage events that then follow one
another are merged into one (their sum). Finals, speech events, errors and the end of the stream are
always kept, in order. A reader that keeps up never sees a compaction.

The queues are the standard ones (asyncio's for an event loop, queue's for threads) with their storage
hook `_put` extended, the way the standard library's own LIFO and priority queues are made.
"""

from __future__ import annotations

import asyncio
import queue
from collections import deque

from .events import Final, Partial, Usage

UNREAD_LIMIT = 256  # unread events before superseded Partials are dropped (at 160 ms: about 40 s behind)


def compact(events: deque) -> None:
    """Drop the superseded Partials of `events` (oldest first) and merge the Usage events that meet."""
    kept = []
    superseded: set[int] = set()  # starts of utterances with a later Partial or Final
    for event in reversed(events):
        if isinstance(event, Partial):
            if event.start in superseded:
                continue
            superseded.add(event.start)
        elif isinstance(event, Final):
            superseded.add(event.start)
        kept.append(event)
    events.clear()
    for event in reversed(kept):
        if isinstance(event, Usage) and events and isinstance(events[-1], Usage):
            events[-1] = Usage(events[-1].audio_seconds + event.audio_seconds)
        else:
            events.append(event)


class _Bounded:
    """The compaction, on top of a standard queue's deque storage (named by `_storage`)."""

    _storage: str

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._compact_at = UNREAD_LIMIT

    def _put(self, item) -> None:
        super()._put(item)
        events = getattr(self, self._storage)
        if len(events) > self._compact_at:
            compact(events)
            # Events that are never dropped may fill the queue: compact again only once it has doubled,
            # so a put stays O(1) amortized.
            self._compact_at = max(UNREAD_LIMIT, 2 * len(events))

    def _get(self):
        item = super()._get()
        if not getattr(self, self._storage):
            self._compact_at = UNREAD_LIMIT  # the reader caught up: a later backlog starts from the limit
        return item


class EventQueue(_Bounded, asyncio.Queue):
    """asyncio.Queue of one stream's events (unbounded puts; compacts as above)."""

    _storage = "_queue"


class SyncEventQueue(_Bounded, queue.Queue):
    """queue.Queue of one stream's events (thread-safe; compacts as above)."""

    _storage = "queue"
