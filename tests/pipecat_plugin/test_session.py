"""StreamSession's bookkeeping of what a stream owes, against a stand-in for an engine stream (the
monosemantic stream interface, `backend.StreamLike`; no framework is involved)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("pipecat", reason="pipecat-ai (the 'pipecat' extra) is not installed")

from monosemantic.errors import PushTimeoutError  # noqa: E402
from pipecat_monosemantic.session import StreamSession  # noqa: E402


class Stream:
    """Records pushes, flushes and closes; its first `failing_flushes` flushes time out, as an overloaded
    engine's do (the utterance is not ended, the audio stays)."""

    def __init__(self, failing_flushes: int = 0):
        self.calls: list[str] = []
        self.failing_flushes = failing_flushes

    async def push(self, pcm) -> None:
        self.calls.append("push")

    async def flush(self) -> None:
        if self.failing_flushes:
            self.failing_flushes -= 1
            raise PushTimeoutError("flush timed out: the utterance was not ended, call flush() again", accepted=True)
        self.calls.append("flush")

    async def close(self) -> None:
        self.calls.append("close")


def test_a_flush_that_failed_leaves_the_audio_owed_a_flush():
    """A flush that timed out did not end the utterance, and the audio stays in the stream. It used to
    count as done all the same: the next flush (at the next VAD stop with no audio between, or the
    EndFrame's) found nothing to flush, and the stream was closed with the utterance untranscribed,
    without a word."""

    async def main():
        stream = Stream(failing_flushes=1)
        session = StreamSession(stream, 160, "m")
        await session.push(b"\0\0" * 160)
        with pytest.raises(PushTimeoutError):
            await session.flush()
        assert session.unflushed and not session.outstanding
        await session.retire()  # EndFrame: the utterance is flushed now, and the stream waits for its Final
        return stream, session

    stream, session = asyncio.run(main())
    assert stream.calls == ["push", "flush"] and session.outstanding == 1 and not session.closed


def test_a_push_that_timed_out_after_taking_its_audio_owes_a_flush():
    """A push that timed out with `accepted=True` took its audio (it goes at the next push or flush); a
    flush after it must end the utterance, or that audio waits unflushed and is closed away."""

    class SlowPush(Stream):
        async def push(self, pcm) -> None:
            self.calls.append("push")
            raise PushTimeoutError("push timed out: this call's audio was accepted", accepted=True)

    async def main():
        stream = SlowPush()
        session = StreamSession(stream, 160, "m")
        with pytest.raises(PushTimeoutError):
            await session.push(b"\0\0" * 160)
        return stream, session, await session.flush()

    stream, session, owed = asyncio.run(main())
    assert owed and stream.calls == ["push", "flush"] and session.outstanding == 1
