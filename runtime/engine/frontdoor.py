"""The asyncio front door (`Engine`, `EngineStream`) and a thread-safe synchronous facade
(`SyncEngine`, `SyncStream`) over one EngineCore.

    async with monosemantic.Engine(model) as engine:
        stream = await engine.open_stream(latency_ms=160, sample_rate=48000)
        await stream.push(pcm)            # int16 bytes/array or float32 array, any size
        await stream.flush()              # -> a Final covering everything pushed so far
        await stream.flush(at=n)          # ... or the audio up to stream sample n (a SpeechEnded's)
        async for event in stream: ...
        await stream.close()
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref

import numpy as np

from ..asr import ASRModel
from ..audio import StreamResampler, as_float32, typed_view_as_array
from ..errors import AudioError, PushTimeoutError, StreamError
from ..event_queue import EventQueue, SyncEventQueue
from ..events import Error, Event
from ..validate import flush_point
from .config import EngineConfig
from .core import EngineCore
from .coalesce import Coalescer
from .scheduler import StepTiming

_END = None  # the core emits None after a stream's last event


def pcm_to_float32(pcm) -> np.ndarray:
    """int16 little-endian bytes, an int16/int32/float array or tensor -> validated float32 samples."""
    pcm = typed_view_as_array(pcm)  # int8 ("b") is then refused as an ndarray is
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        data = pcm if type(pcm) is bytes else bytes(pcm)  # a copy of what the caller may still change
        if len(data) % 2:
            raise AudioError(f"PCM bytes must be 16-bit samples: got an odd byte count ({len(data)})")
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32)
        samples *= 1 / 32768  # a power of two: the same values as dividing, without a second array
        return samples
    return as_float32(pcm)


def engine_config(config: EngineConfig | None) -> EngineConfig:
    """The config an engine runs with: None is the defaults. Anything else than an EngineConfig (a dict
    of its fields, say) failed deep in the engine as an AttributeError, or as an empty dict passed for
    the defaults."""
    if config is None:
        return EngineConfig()
    if not isinstance(config, EngineConfig):
        raise TypeError(f"config must be a monosemantic.EngineConfig or None, got {type(config).__name__}")
    return config


_NOTHING = np.zeros(0, dtype=np.float32)


class _StreamBase:
    """What both front doors share: input conversion, resampling, and the audio accepted but not yet
    written to the engine.

    Audio a push accepted stays in `_pending` until the engine has room for it, and leaves it only once
    written: a push that was cancelled or timed out leaves the rest of its audio to go first at the
    stream's next push or flush, so accepted audio is never lost or reordered. A flush takes the
    resampler's tail only once the engine has room for all of it (core.write_tail), so one that times out
    or is cancelled leaves the resampler as it was: the utterance goes on as one signal. Pushes and
    flushes of one stream are serialized (the resampler and `_pending` are per stream)."""

    def __init__(self, core: EngineCore, sample_rate: int):
        self._core = core
        self.sample_rate = sample_rate
        self._resampler = StreamResampler(sample_rate, core.model.sample_rate)
        self._piece = max(1, core.capacity // 4)  # the most one write asks for at once
        self._pending = _NOTHING  # model-rate samples accepted, not yet written
        # Whether the engine reports voice activity (SpeechStarted/SpeechEnded) on this stream.
        self.vad: bool = core.config.vad is not None
        self.handle: int | None = None
        self.latency_ms: int | None = None
        # When the stream's audio makes work (scheduler.StepTiming); the server tells its clients.
        self.timing: StepTiming | None = None
        # Pushes held until they reach one of those points (coalesce.py): model-rate audio accepted and
        # not yet in `_pending`, all of it newer than what is there.
        self._coalescer: Coalescer | None = None
        self._held: list[np.ndarray] = []
        self._reopen_at: int | None = None  # where the utterance began, once a flush has taken the tail

    def _accept(self, pcm) -> bool:
        """Convert and resample `pcm`, then hold it, or move it with everything held into `_pending`
        (which must be empty); True when there is audio to write now. Invalid audio raises AudioError
        here, before the resampler has seen any of it."""
        self._core.check_open(self.handle)
        samples = self._resampler.push(pcm_to_float32(pcm))
        coalescer = self._coalescer
        if coalescer is not None:
            if not coalescer.add(len(samples), time.monotonic()):
                if len(samples):
                    # The caller may reuse its array meanwhile: a float32 array at the model's rate comes
                    # through unconverted (it, or a view of it), anything else as a new array.
                    self._held.append(samples.copy() if samples is pcm or not samples.flags.owndata else samples)
                return False
            coalescer.mark_sent()
            samples = self._with_held(samples)
        self._pending = samples
        return True

    def _release_held(self) -> None:
        """A flush starts: the audio held back (coalescer) goes on behind what is pending, as at a push
        that reaches a point; the tail follows it (`_take_tail`)."""
        self._core.check_open(self.handle)
        self._reopen_at = None
        if self._held:
            self._pending = np.concatenate((self._pending, *self._held))
            self._held.clear()
            self._coalescer.mark_sent()

    def _take_tail(self) -> np.ndarray:
        """The resampler's tail, counted by the coalescer as the utterance's end (called by the core once
        the engine has room for it)."""
        tail = self._resampler.flush()
        if self._coalescer is not None:
            self._reopen_at = self._coalescer.utterance_start
            self._coalescer.flushed(len(tail))
        return tail

    @property
    def written(self) -> int:
        """Model-rate samples of the stream's audio the engine holds: the stream sample its next audio
        starts at (audio pushed but held back or pending in front of the engine is not counted)."""
        return self._core.written(self.handle)

    def _cuts_inside(self, at: int | None) -> bool:
        """Whether a flush at model-rate sample `at` ends the utterance inside the audio that has passed
        the resampler (written to the engine, or pending): it is then cut there, and the resampler keeps
        its state for the next utterance. A flush at or past that audio's end is a plain flush."""
        return at is not None and at < self._core.written(self.handle) + self._pending.size

    def _cut(self, at: int) -> int:
        """Flush at `at` (the pending audio written): the core moves the point up to where the stream
        can still be cut; the next utterance, and the coalescer's step points, start there."""
        point = self._core.flush(self.handle, at)
        if self._coalescer is not None:
            self._coalescer.cut(point)
        return point

    def _flush_failed(self) -> None:
        """A flush left before reaching the engine (its audio's wait timed out, or it was cancelled): the
        utterance goes on, and so do the step points the coalescer holds pushes up to. (Moved to the
        tail's end, they held the pushes before the next flush to the wrong points: later events.) Only
        a flush that took the tail moved them: one waiting for room for it has not."""
        if self._reopen_at is not None:
            self._coalescer.reopen(self._reopen_at)
            self._reopen_at = None

    def _with_held(self, samples: np.ndarray) -> np.ndarray:
        if not self._held:
            return samples
        self._held.append(samples)
        joined = np.concatenate(self._held)
        self._held.clear()
        return joined

    def _keep_pending(self) -> None:
        """A push or flush is leaving with audio still pending (cancelled, timed out, interrupted): own a
        copy of it. Without a resampler in between, `_pending` is a view of the caller's array, which the
        caller may reuse or change before the next push writes it."""
        if self._pending.size:
            self._pending = self._pending.copy()

    def _accept_late(self, pcm) -> None:
        """A push is leaving (cancelled, interrupted) while it waited for room for an earlier push's audio,
        before it took its own. Take its audio now, behind the earlier audio, so that a push cancelled in
        its turn has always accepted its audio: the caller cannot tell this case from a push cancelled
        while writing its own audio, which is kept. (A push cancelled before its turn, while another push
        or flush of the stream ran, has taken nothing: taking it then would put it ahead of that call's
        audio, or inside the utterance that flush ends.) Pending audio is bounded: past a
        whole buffer of it (pushes cancelled over and over while the engine has no room) the stream is
        refused with Error('overloaded') rather than growing without limit or dropping audio in silence."""
        pending, self._pending = self._pending, _NOTHING
        try:
            if self._accept(pcm):
                pending = np.concatenate((pending, self._pending))  # a copy: the caller may reuse its array
        except (AudioError, StreamError):  # audio never acceptable, or a stream already ended
            pass
        finally:
            self._pending = pending
        if pending.size > self._core.capacity:
            self._core.close(self.handle, Error(
                "overloaded",
                f"{pending.size / self._core.model.sample_rate:.1f} s of audio from pushes cancelled while the engine "
                f"had no room for them waited, more than the stream's buffer holds: the stream was closed (the "
                f"engine is overloaded; await pushes, or cancel them less often)",
            ))

    def _write_at_once(self) -> bool:
        """One write of all the pending audio, the common case (the buffer has room): True if it all
        went. Otherwise what went is taken off, and `_drain` writes the rest as room comes (it tries
        again before it waits, so no room signal is missed)."""
        pending = self._pending
        if pending.size > self._piece:
            return False
        try:
            written = self._core.write(self.handle, pending)
        except BaseException:
            self._keep_pending()
            raise
        self._pending = _NOTHING if written == pending.size else pending[written:]
        return not self._pending.size

    def _drain_waits(self, before_write=None, taken: bool = True, call: str = "push", tail: bool = False):
        """Write the pending audio as the stream's buffer makes room, then (`tail`: a flush) the
        resampler's tail; yields the seconds left to wait for room whenever it is full (the caller waits
        for on_space, or that long), and raises the timeout once `push_timeout_seconds` pass without room.
        `before_write` runs before each write attempt (an asyncio caller clears its room signal there, so
        a signal made after the attempt is kept). `taken`: whether the calling push's (or flush's) own
        audio is among the pending, `call` which of the two it is (for the timeout's message)."""
        deadline = None  # counted from when the buffer stopped taking audio
        while self._pending.size or tail:
            if before_write is not None:
                before_write()
            if self._pending.size:
                written = self._core.write(self.handle, self._pending[: self._piece])
                if written:
                    self._pending = self._pending[written:]
            else:
                rest = self._core.write_tail(self.handle, self._resampler.tail_bound(), self._take_tail)
                written = rest is not None
                if written:
                    self._pending, tail, taken = rest, False, True
            if written:
                deadline = None
                continue
            now = time.monotonic()
            deadline = now + self._core.config.push_timeout_seconds if deadline is None else deadline
            if now >= deadline:
                raise self._timed_out(taken, call)
            yield deadline - now

    def _timed_out(self, taken: bool, call: str) -> PushTimeoutError:
        waiting = f"the stream has {self._core.buffered_seconds(self.handle):.1f} s of audio waiting to be processed"
        if call == "flush":
            # A flush that times out never marked the utterance's end; the audio it accepted is kept.
            return PushTimeoutError(
                f"flush timed out: {waiting} (the engine is overloaded); the utterance was not ended, call "
                f"flush() again (the audio pushed so far is kept)",
                accepted=taken,
            )
        if taken:
            return PushTimeoutError(
                f"push timed out: {waiting} (the engine is overloaded); this call's audio was accepted, and "
                f"what is not yet written goes first at the stream's next push or flush: do not push it again",
                accepted=True,
            )
        return PushTimeoutError(
            f"push timed out before taking this call's audio: an earlier push's accepted audio still waits "
            f"for room ({waiting}; the engine is overloaded); push this audio again",
            accepted=False,
        )

    def _callbacks(self):
        """The (emit, on_space) pair the core keeps for this stream. They hold the stream weakly, so a
        stream dropped without close() is garbage-collected, and then closed by the engine (its slot
        freed) through the finalizer `_register` sets."""
        ref = weakref.ref(self)

        def emit(event) -> None:  # engine thread
            stream = ref()
            if stream is not None:
                stream._post(event)

        def on_space() -> None:  # engine thread
            stream = ref()
            if stream is not None:
                stream._on_space()

        return emit, on_space

    def _register(self, record) -> None:
        self.handle, self.latency_ms = record.handle, record.latency_ms
        self.timing = self._core.scheduler.geometry.step_timing(record.shape, self.vad)
        # With VAD, every 32 ms window's end is a point: most 20 ms pushes reach one, and holding the
        # others saved less than it cost (benchmarks/push_cost.py --vad). A remote client still gathers
        # there: a server's message costs far more than a push.
        if self._core.config.coalesce_pushes and self.timing.vad_window is None:
            rate = self._core.model.sample_rate  # counted after resampling: no shadow needed
            self._coalescer = Coalescer(self.timing, rate, rate)
        finalizer = weakref.finalize(self, self._core.abandon, record.handle)
        finalizer.atexit = False


class _Mailbox:
    """Hands the engine thread's callbacks to one asyncio loop in batches: one loop wake-up for all the
    events of a tick, rather than one `call_soon_threadsafe` (a write to the loop's self-pipe, and a
    wake-up) per event of every stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        # Weakly: the engine keeps a mailbox per loop (keyed weakly by the loop), and a strong reference
        # here would keep every loop that ever opened a stream (each asyncio.run of a shared engine's
        # user) alive for the engine's life.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    def post(self, callback, arg) -> None:  # engine thread
        with self._lock:
            first = not self._items
            self._items.append((callback, arg))
        if first:
            loop = self._loop()
            try:
                if loop is None:
                    raise RuntimeError("the loop is gone")
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop was closed with streams still open: nobody is listening
                with self._lock:
                    self._items.clear()

    def is_open(self) -> bool:  # engine thread: the core closes a stream once its loop has closed
        loop = self._loop()
        return loop is not None and not loop.is_closed()

    def _deliver(self) -> None:  # the asyncio loop
        with self._lock:
            items, self._items = self._items, []
        for callback, arg in items:
            callback(arg)


class EngineStream(_StreamBase):
    """One stream of an Engine, used from its event loop."""

    def __init__(self, core: EngineCore, mailbox: _Mailbox, sample_rate: int):
        super().__init__(core, sample_rate)
        self._mailbox = mailbox
        self._events = EventQueue()  # bounded for a reader far behind (event_queue)
        self._space = asyncio.Event()
        self._lock = asyncio.Lock()
        self._ended = False

    def _post(self, event) -> None:  # engine thread
        self._mailbox.post(self._events.put_nowait, event)

    def _on_space(self) -> None:  # engine thread
        self._mailbox.post(_set_event, self._space)

    def _check_loop(self) -> None:
        # The engine thread wakes this stream's waits through the loop that opened it; awaited from
        # another loop they would never wake (and asyncio's objects are not thread-safe).
        if asyncio.get_running_loop() is not self._mailbox.loop:
            raise StreamError(
                "this stream belongs to the event loop that opened it: push, flush and read it there "
                "(open a stream in each loop, or use monosemantic.SyncEngine from threads)"
            )

    async def push(self, pcm) -> None:
        """Append audio. Waits while the stream has `max_buffered_seconds` unprocessed (throttling a
        producer faster than real time); raises StreamError if the stream is closed or the wait exceeds
        `push_timeout_seconds`, AudioError for invalid audio (the stream stays usable). Audio of a push
        that timed out or was cancelled is not dropped: it goes first at the next push or flush (which
        raise the same timeout, without taking their own audio, while the engine still has no room). A
        push cancelled in its turn has always taken its audio, also while it waited for an earlier push's;
        one cancelled before its turn (another push or flush of this stream still running) has not."""
        self._check_loop()
        async with self._lock:
            if self._pending.size:  # an earlier push's audio, not yet written, goes first
                try:
                    await self._drain(taken=False)
                except asyncio.CancelledError:
                    self._accept_late(pcm)
                    raise
            if self._accept(pcm) and not self._write_at_once():
                await self._drain()

    async def _drain(self, taken: bool = True, call: str = "push", tail: bool = False) -> None:
        try:
            for seconds in self._drain_waits(self._space.clear, taken, call, tail):
                try:
                    await asyncio.wait_for(self._space.wait(), seconds)
                except asyncio.TimeoutError:
                    pass
        except BaseException:
            self._keep_pending()
            raise

    async def flush(self, at: int | None = None) -> int:
        """End the utterance: a Final follows, covering all audio pushed before this call.

        `at`: end it at this sample of the stream instead (model-rate samples from the stream's start,
        the unit of event times, e.g. a SpeechEnded's `sample`), when that lies before the end of the
        audio pushed: the audio after it starts the next utterance. A point inside audio the engine has
        already encoded (or before an earlier flush point) is moved up to the first sample after it,
        so no audio goes into two utterances: cut where the engine is behind the audio (input faster
        than real time), the Final ends exactly at `at`. Returns the flush point, the Final's `end`."""
        at = flush_point(at)
        self._check_loop()
        async with self._lock:
            self._release_held()
            if self._cuts_inside(at):
                await self._drain(taken=False, call="flush")  # (the pending audio; the resampler stays)
                return self._cut(at)
            try:
                await self._drain(taken=False, call="flush", tail=True)
            except BaseException:
                self._flush_failed()
                raise
            return self._core.flush(self.handle)

    async def close(self) -> None:
        """Stop the stream now and free its slot. Audio whose Final has not been sent yet is dropped,
        a flush still in progress included: to keep the last utterance, wait for its Final (after
        `flush()`) before closing. The event iterator ends after the events already produced."""
        self._core.close(self.handle)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        self._check_loop()
        self._core.check_not_orphaned()
        event = await self._events.get()
        if event is _END:
            self._ended = True
            self._events.put_nowait(_END)  # stays last in the queue: another task reading the stream ends too
            raise StopAsyncIteration
        return event


def _set_event(event: asyncio.Event) -> None:
    event.set()


class Engine:
    """Serves many concurrent streams of one model in shared batches, from one loop thread."""

    def __init__(self, model: ASRModel, config: EngineConfig | None = None):
        self.model = model
        self.config = engine_config(config)
        self.core = EngineCore(model, self.config)
        # One mailbox per asyncio loop that opened streams (a shared engine may serve several loops).
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def __aenter__(self) -> "Engine":
        await self._start()
        return self

    async def _start(self) -> None:
        """Start the loop thread (a no-op once started) off the event loop: the start captures the CUDA
        graphs of `warmup_latencies`, seconds on a GPU, which would hold every other task of the loop."""
        if self.core.started:
            self.core.start()  # a no-op, or the shutdown's refusal once the engine is closed
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.core.start)

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> EngineStream:
        """A new stream; raises CapacityError when `max_streams` are open, ValueError for an unknown
        latency mode, AudioError for a sample rate the resampler refuses."""
        await self._start()
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)
        stream = EngineStream(self.core, mailbox, sample_rate)
        stream._register(self.core.open(latency_ms, *stream._callbacks(), alive=mailbox.is_open))
        return stream

    async def aclose(self) -> None:
        """Close every stream (each gets Error('closed')) and stop the loop thread."""
        await asyncio.get_running_loop().run_in_executor(None, self.core.stop)


class SyncStream(_StreamBase):
    """One stream of a SyncEngine; every method may be called from any thread."""

    def __init__(self, core: EngineCore, sample_rate: int):
        super().__init__(core, sample_rate)
        self._events = SyncEventQueue()
        self._space = threading.Condition()
        self._lock = threading.Lock()  # one push or flush at a time

    def _post(self, event) -> None:
        self._events.put(event)

    def _on_space(self) -> None:
        with self._space:
            self._space.notify_all()

    def push(self, pcm) -> None:
        """As EngineStream.push, blocking while the stream's buffer is full."""
        self._core.check_not_orphaned()  # before the lock, which a fork may have copied held (as get())
        with self._lock:
            if self._pending.size:  # an earlier push's audio, not yet written, goes first
                try:
                    self._drain(taken=False)
                except StreamError:  # a timeout says the audio was not taken; a closed stream takes none
                    raise
                except BaseException:  # interrupted (KeyboardInterrupt, say) before taking its audio
                    self._accept_late(pcm)
                    raise
            if self._accept(pcm) and not self._write_at_once():
                self._drain()

    def _drain(self, taken: bool = True, call: str = "push", tail: bool = False) -> None:
        try:
            with self._space:  # held from the write attempt to the wait: no signal of room is missed
                for seconds in self._drain_waits(taken=taken, call=call, tail=tail):
                    self._space.wait(min(seconds, 0.1))
        except BaseException:
            self._keep_pending()
            raise

    def flush(self, at: int | None = None) -> int:
        """As EngineStream.flush."""
        at = flush_point(at)
        self._core.check_not_orphaned()  # before the lock, as push()
        with self._lock:
            self._release_held()
            if self._cuts_inside(at):
                self._drain(taken=False, call="flush")
                return self._cut(at)
            try:
                self._drain(taken=False, call="flush", tail=True)
            except BaseException:
                self._flush_failed()
                raise
            return self._core.flush(self.handle)

    def close(self) -> None:
        self._core.close(self.handle)

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None once the stream has ended (and at every call after). Raises queue.Empty
        after `timeout`."""
        self._core.check_not_orphaned()  # before the queue, whose lock a fork may have copied held
        event = self._events.get(timeout=timeout)
        if event is _END:
            self._events.put(_END)  # stays last in the queue: for the next call, and any other thread
        return event

    def events(self, timeout: float | None = None):
        """Iterate events until the stream ends."""
        while (event := self.get(timeout)) is not _END:
            yield event


class SyncEngine:
    """The engine for threads without an event loop. Use as a context manager or call close()."""

    def __init__(self, model: ASRModel, config: EngineConfig | None = None):
        self.model = model
        self.config = engine_config(config)
        self.core = EngineCore(model, self.config)
        self.core.start()

    def open_stream(self, latency_ms: int | None = None, sample_rate: int = 16000) -> SyncStream:
        stream = SyncStream(self.core, sample_rate)
        stream._register(self.core.open(latency_ms, *stream._callbacks()))
        return stream

    def close(self) -> None:
        self.core.stop()

    def __enter__(self) -> "SyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
