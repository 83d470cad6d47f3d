"""Unread events stay bounded: superseded Partials are dropped and Usage merged once a reader falls far
behind, and nothing else is lost or reordered (unit, and over a real engine whose stream is not read)."""

from __future__ import annotations

import asyncio
import queue
import time
from collections import deque

import pytest

import monosemantic.event_queue as event_queue
from monosemantic import Engine, EngineConfig, Final, Partial, SpeechEnded, SpeechStarted, SyncEngine, Usage
from monosemantic.event_queue import EventQueue, SyncEventQueue, compact


def test_compact_keeps_each_utterances_newest_partial_and_every_other_event():
    events = deque(
        [
            SpeechStarted(10),
            Partial("a", "a", start=0, end=100),
            Usage(1.0),
            Partial("ab", "ab", start=0, end=200),
            Usage(2.0),
            Partial("abc", "abc", start=0, end=300),
            Final("abc", start=0, end=320),
            Partial("d", "d", start=320, end=400),
            SpeechEnded(410),
            Partial("de", "de", start=320, end=500),
            Usage(0.5),
            None,  # the end of the stream
        ]
    )
    compact(events)
    assert list(events) == [
        SpeechStarted(10),
        Usage(3.0),  # the two Usage events met once the Partial between them went
        Final("abc", start=0, end=320),  # the utterance's Partials are all superseded by its Final
        SpeechEnded(410),
        Partial("de", "de", start=320, end=500),  # the open utterance keeps its newest
        Usage(0.5),
        None,
    ]


def test_an_empty_utterance_does_not_drop_the_next_ones_partials():
    # A flush with no audio: Final(start=s, end=s); the next utterance starts at the same sample.
    events = deque([Final("", start=50, end=50), Partial("x", "x", start=50, end=90)])
    compact(events)
    assert list(events) == [Final("", start=50, end=50), Partial("x", "x", start=50, end=90)]


@pytest.mark.parametrize("make", [SyncEventQueue, EventQueue])
def test_queues_compact_only_past_the_limit(make, monkeypatch):
    monkeypatch.setattr(event_queue, "UNREAD_LIMIT", 8)

    async def fill():  # asyncio.Queue wants a running loop on some Python versions
        q = make()
        for i in range(8):
            q.put_nowait(Partial(str(i), str(i), start=0, end=i))
        assert q.qsize() == 8  # at the limit: a reader a little behind sees every Partial
        q.put_nowait(Partial("8", "8", start=0, end=8))
        assert q.qsize() == 1 and q.get_nowait().text == "8"
        # Events that are never dropped: compacting again only once the queue has doubled.
        for i in range(30):
            q.put_nowait(Final(str(i), start=i, end=i + 1))
        assert q.qsize() == 30 and [q.get_nowait().text for _ in range(30)] == [str(i) for i in range(30)]
        # Once the reader has caught up, the limit is the limit again.
        for i in range(9):
            q.put_nowait(Partial(str(i), str(i), start=0, end=i))
        assert q.qsize() == 1

    asyncio.run(fill())


# ---- over a real engine --------------------------------------------------------------------------------

QUIET = dict(vad=None, freeze_gc=False, keep_freed_memory=False)
FRAME = 320  # 20 ms


def _check_against_reader(unread: list, read: list, pushed_seconds: float):
    """`unread`: the events of a stream nobody read while it ran; `read`: those of the same audio read as
    they came. Finals equal and in order, every Partial kept is one the reader saw, in order, and the
    usage adds up."""
    finals = [e for e in unread if isinstance(e, Final)]
    assert finals == [e for e in read if isinstance(e, Final)]
    seen = [e for e in read if isinstance(e, Partial)]
    kept = [e for e in unread if isinstance(e, Partial)]
    assert len(kept) < len(seen)
    it = iter(seen)
    assert all(any(p == q for q in it) for p in kept)  # a subsequence
    for events in (unread, read):
        assert sum(e.audio_seconds for e in events if isinstance(e, Usage)) == pytest.approx(pushed_seconds, abs=1e-6)


def test_a_sync_stream_nobody_reads_keeps_its_finals_in_bounded_memory(ms_model, audio_clips, monkeypatch):
    monkeypatch.setattr(event_queue, "UNREAD_LIMIT", 4)
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    half = len(audio) // 2 // FRAME * FRAME
    with SyncEngine(model, EngineConfig(max_streams=2, **QUIET)) as engine:
        idle, reader = engine.open_stream(), engine.open_stream()
        read, most = [], 0
        for at in range(0, len(audio), FRAME):
            for stream in (idle, reader):
                stream.push(audio[at : at + FRAME])
                if at + FRAME == half:
                    stream.flush()
            while True:  # the reader reads what has come; the idle stream's queue is only looked at
                try:
                    read.append(reader.get(timeout=0))
                except queue.Empty:
                    break
            most = max(most, idle._events.qsize())
        for stream in (idle, reader):
            stream.flush()
        def idle_finals() -> int:
            with idle._events.mutex:  # the engine thread appends meanwhile
                return sum(isinstance(e, Final) for e in idle._events.queue)

        deadline = time.monotonic() + 30
        while sum(isinstance(e, Final) for e in read) < 2 and time.monotonic() < deadline:
            read.append(reader.get(timeout=30))
        while idle_finals() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        idle.close()
        reader.close()
        read += list(reader.events(timeout=10))
        unread = list(idle.events(timeout=10))
    assert most <= 8  # 2 * the limit: compaction keeps the queue from growing with the audio
    _check_against_reader(unread, read, len(audio) / 16000)


def test_an_async_stream_nobody_reads_keeps_its_finals_in_bounded_memory(ms_model, audio_clips, monkeypatch):
    monkeypatch.setattr(event_queue, "UNREAD_LIMIT", 4)
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]

    async def main():
        async with Engine(model, EngineConfig(max_streams=2, **QUIET)) as engine:
            idle, reader = await engine.open_stream(), await engine.open_stream()
            read: list = []

            async def read_all():
                async for event in reader:
                    read.append(event)

            task = asyncio.create_task(read_all())
            most = 0
            for at in range(0, len(audio), FRAME):
                await idle.push(audio[at : at + FRAME])
                await reader.push(audio[at : at + FRAME])
                most = max(most, idle._events.qsize())
                await asyncio.sleep(0)
            await idle.flush()
            await reader.flush()
            # (The idle queue is touched only on this loop: the mailbox delivers here.)
            while not any(isinstance(e, Final) for e in read) or not any(isinstance(e, Final) for e in idle._events._queue):
                await asyncio.sleep(0.02)
            await idle.close()
            await reader.close()
            await task
            return [e async for e in idle], read, most

    unread, read, most = asyncio.run(asyncio.wait_for(main(), 120))
    assert most <= 8
    _check_against_reader(unread, read, len(audio) / 16000)
