"""The asyncio front door's mailbox: callbacks posted from the engine thread reach the asyncio loop in
order, many per loop wake-up."""

from __future__ import annotations

import asyncio
import threading

from monosemantic.engine.frontdoor import _Mailbox


def test_mailbox_delivers_in_order_in_few_wakeups():
    async def main():
        loop = asyncio.get_running_loop()
        mailbox = _Mailbox(loop)
        wakeups = [0]
        real = loop.call_soon_threadsafe

        def counting(callback, *args):
            wakeups[0] += 1
            return real(callback, *args)

        loop.call_soon_threadsafe = counting
        got: list[tuple[int, int]] = []
        done = asyncio.Event()

        def engine_thread():  # a burst per "tick", from another thread, as the engine posts events
            for tick in range(20):
                for stream in range(50):
                    mailbox.post(got.append, (tick, stream))
            mailbox.post(lambda _: done.set(), None)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        await asyncio.wait_for(done.wait(), 10)
        thread.join()
        return got, wakeups[0]

    got, wakeups = asyncio.run(main())
    assert got == [(tick, stream) for tick in range(20) for stream in range(50)]
    assert 1 <= wakeups < len(got) // 10  # batched: far fewer wake-ups than events


def test_posting_to_a_closed_loop_is_dropped_not_raised():
    """A stream left open when its event loop closed: the engine thread must not die posting to it."""
    loop = asyncio.new_event_loop()
    mailbox = _Mailbox(loop)
    loop.close()
    got: list = []
    for i in range(3):
        mailbox.post(got.append, i)  # no RuntimeError('Event loop is closed')
    assert got == [] and mailbox._items == []
