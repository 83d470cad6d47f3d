"""EngineCore: one loop thread that, every tick, plans (scheduler), runs (runner) and routes results.

Callers in any thread open, write to, flush and close streams through thread-safe methods that only
touch host-side bookkeeping under a lock; every tensor operation happens on the loop thread. Events are
handed to each stream's `emit` callback from the loop thread (the asyncio and sync front doors turn
them into queue items).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import forking
from ..asr import ASRModel
from ..errors import StreamError
from ..events import Error, Event, Final, Partial, SpeechEnded, SpeechStarted, Usage
from ..transcript import Token, Word
from .config import EngineConfig
from . import process
from .malloc import keep_freed_memory
from .runner import ModelRunner, RowResult, geometry
from .scheduler import Scheduler, StepRow, StreamRecord, TickPlan

log = logging.getLogger("monosemantic.engine")

SWEEP_SECONDS = 1.0  # how often the loop looks for streams nobody can receive events from


@dataclass
class StreamState:
    """Host-side state of one open stream that the scheduler does not need."""

    record: StreamRecord
    emit: Callable[[Event], None]
    on_space: Callable[[], None]
    labels: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)
    text: str = ""  # the utterance's text so far (decode of labels), extended piece by piece
    policy: object | None = None  # VAD hysteresis (monosemantic.vad.policy), None without VAD
    unreported_samples: int = 0  # processed audio not yet reported in a Usage event
    utterance_counted: int = 0  # audio of the current utterance counted for Usage so far
    waiting_for_space: bool = False  # a write found the buffer full: signal on_space after progress
    closed: bool = False
    alive: Callable[[], bool] | None = None  # False once nobody can receive the events (event loop closed)
    # Held while the loop thread or close() (any thread) updates what the stream is told and emits it:
    # close() sends the end of events under it, and the loop thread emits only while the stream is open,
    # so no event follows the end (a sync reader that saw the end would otherwise get one more event).
    guard: threading.Lock = field(default_factory=threading.Lock)


def _speech_event(transition) -> Event:
    """The event of a VAD policy transition (monosemantic.vad.policy)."""
    return (SpeechStarted if transition.kind == "start" else SpeechEnded)(transition.sample)


@dataclass
class TickStats:
    """What the last tick did (read by metrics and benchmarks)."""

    steps: int = 0
    rows: int = 0
    vad_rows: int = 0
    seconds: float = 0.0


class EngineCore:
    def __init__(self, model: ASRModel, config: EngineConfig):
        if not model.cache_aware:
            raise ValueError(
                f"the engine streams cache-aware models; {model.source} has full-context attention "
                f"(use model.new_stream() for it)"
            )
        if config.vad is not None and model.sample_rate != 16000:
            raise ValueError("Silero VAD runs at 16 kHz; disable VAD (EngineConfig(vad=None)) for this model")
        self.model = model
        self.config = config
        plans = {ms: model.plan(model.context_for(ms)) for ms in model.latency_modes}
        self.default_latency = config.default_latency_ms or model.default_latency_ms
        for latency in (self.default_latency, *config.warmup_latencies):
            model.context_for(latency)  # a bad mode fails here, not at the first open
        g = geometry(model)
        span = max(g.step_read(p.shape.step_mel) for p in plans.values())
        # A stream's buffer holds at least one step's read of its longest mode (plus the VAD windows it
        # may wait for): with less, a window would never become ready and every push would stall.
        self.capacity = max(int(config.max_buffered_seconds * model.sample_rate), span + 2 * g.vad_window)
        ring = self.capacity + span + g.vad_window + g.hop
        skip = None if config.skip_silence_ms is None else config.skip_silence_ms * model.sample_rate // 1000
        wait = config.batch_wait_ms
        # The runner first: it checks that max_streams slots fit in memory before anything is sized by it.
        # A step never holds more rows than there are streams: no graph is captured for larger batches.
        self.runner = ModelRunner(
            model, plans, config.max_streams, ring, vad=config.vad is not None,
            max_batch=min(config.max_batch, config.max_streams), cuda_graphs=config.cuda_graphs,
        )
        self.scheduler = Scheduler(
            config.max_streams, config.max_batch, g, vad=config.vad is not None, skip_silence=skip,
            batch_wait=lambda latency_ms: (latency_ms / 4 if wait is None else wait) / 1000.0,
        )
        self.shapes = {ms: p.shape for ms, p in plans.items()}
        self.streams: dict[int, StreamState] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.pending_resets: list[tuple[int, bool]] = []  # (slot, also VAD) to reset before the next plan
        # An interval below one sample period asks for Usage at every step: at least one sample, so that
        # a count of no audio never sends an empty Usage.
        self.usage_samples = max(1, int(config.usage_interval_seconds * model.sample_rate))
        self.stats = TickStats()
        # Called after every tick with its plan and seconds (engine thread): metrics, benchmarks. A tuple
        # replaced on change, so the loop reads a consistent set while other threads add or remove.
        self.tick_hooks: tuple[Callable[[TickPlan, float], None], ...] = ()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()  # two event loops opening the first streams at once start one loop
        self._stopping = False
        self.orphaned = False  # this process is a fork of the one whose loop thread ran this core
        # Handles of streams whose front-door object was garbage-collected unclosed: the loop closes
        # them. A deque, because a finalizer may run in any thread at any point, including one holding
        # self.lock; appending takes no lock.
        self.abandoned: deque[int] = deque()

    def add_tick_hook(self, hook: Callable[[TickPlan, float], None]) -> None:
        with self.lock:
            self.tick_hooks = (*self.tick_hooks, hook)

    def remove_tick_hook(self, hook: Callable[[TickPlan, float], None]) -> None:
        with self.lock:
            self.tick_hooks = tuple(h for h in self.tick_hooks if h is not hook)

    # ---- lifecycle ---------------------------------------------------------------------------------
    @property
    def shut_down(self) -> bool:
        """stop() was called: the engine takes no more streams and cannot be started again."""
        return self._stopping

    @property
    def started(self) -> bool:
        """Whether the loop thread was started (it may have been stopped since)."""
        return self._thread is not None

    def start(self) -> None:
        with self._start_lock:
            if self._stopping:  # also once started: entering a closed engine again is an error, not a no-op
                raise self._refusal("the engine is shut down")
            if self._thread is not None:
                return
            forking.model_ran()
            self.runner.warmup(list(self.config.warmup_latencies))
            if self.config.freeze_gc:
                gc.freeze()
            if self.config.keep_freed_memory and self.runner.device.type == "cpu":
                keep_freed_memory()
            self._thread = threading.Thread(
                target=_serve, args=(weakref.ref(self),), name="monosemantic-engine", daemon=True
            )
            self._thread.start()
            process.started(self)

    def stop(self) -> None:
        """Stop the loop; every open stream gets Error('closed') and is released, and so is the memory of
        every slot's state."""
        with self.lock:
            self._stopping = True
            states = list(self.streams.values())
        for state in states:
            self.close(state.record.handle, Error("closed", "the engine was shut down"))
        self.wake.set()
        with self._start_lock:
            if self._thread is not None:
                self._thread.join()
            # Every stream is closed and the loop thread has ended: nothing uses the slots any more (a
            # write, flush or open is refused first, under this lock).
            with self.lock:
                self.runner.release()
            process.stopped(self)

    def _orphan(self) -> None:
        """This process is a fork of the one running the loop (engine.process)."""
        self.lock, self._start_lock, self.wake = threading.Lock(), threading.Lock(), threading.Event()
        self._thread, self._stopping = None, True
        self.streams, self.pending_resets = {}, []
        self.orphaned = True

    def _refusal(self, message: str) -> StreamError:
        """The error of a call the engine refuses: in a forked child, whatever the call, the fork's."""
        return StreamError(process.FORKED if self.orphaned else message)

    # ---- stream operations (any thread) ------------------------------------------------------------
    def open(
        self,
        latency_ms: int | None,
        emit: Callable[[Event], None],
        on_space: Callable[[], None],
        alive: Callable[[], bool] | None = None,
    ) -> StreamRecord:
        """Admit a stream. `alive` (optional, polled about once a second from the loop thread) says
        whether its events can still be received; once it returns False the stream is closed."""
        latency = self.default_latency if latency_ms is None else latency_ms
        self.model.context_for(latency)  # ValueError naming the valid modes
        latency = int(latency)  # a numpy integer is a mode too; events and metrics carry a plain int
        with self.lock:
            if self._stopping:
                raise self._refusal("the engine is shut down")
            record = self.scheduler.admit(latency, self.shapes[latency])
            policy = None
            if self.config.vad is not None:
                from ..vad.policy import VADPolicy

                policy = VADPolicy(self.config.vad)
            self.streams[record.handle] = StreamState(record, emit, on_space, policy=policy, alive=alive)
            self.pending_resets.append((record.slot, True))
        self.wake.set()
        return record

    def write(self, handle: int, samples: np.ndarray) -> int:
        """Append model-rate float32 samples, as many as the stream's buffer has room for; returns how
        many (the caller waits for on_space before writing the rest)."""
        with self.lock:
            n, work = self._write(self._live(handle), samples)
        # Already set: the loop clears it before it plans, so the plan after that sees this write.
        if work and not self.wake.is_set():
            self.wake.set()
        return n

    def write_tail(self, handle: int, most: int, produce: Callable[[], np.ndarray]) -> np.ndarray | None:
        """Write the samples `produce()` makes (at most `most`: a resampler's tail) once the stream's
        buffer has room for `most`; returns those not written (none unless `most` was short), or None,
        with `produce` not called, while there is no room (the caller waits for on_space). A flush that
        times out or is cancelled meanwhile has then not flushed its resampler. Where waiting would make
        no room (nothing of the stream's is left to process: a buffer barely above one step of its mode
        and a long tail), the samples are made now, and what does not fit is returned."""
        with self.lock:
            state = self._live(handle)
            record = state.record
            if most and self.capacity - self.scheduler.buffered(record) < most and (
                record.stepping or record.flushes or self.scheduler.has_work(record)
            ):
                state.waiting_for_space = True
                return None
            samples = produce()
            n, work = self._write(state, samples)
        if work and not self.wake.is_set():
            self.wake.set()
        return samples[n:]

    def _write(self, state: StreamState, samples: np.ndarray) -> tuple[int, bool]:
        """As many of `samples` as the buffer has room for (under the lock): (how many, whether the
        stream now holds work)."""
        n = len(samples)
        record = state.record
        room = self.capacity - self.scheduler.buffered(record)
        if room < n:
            state.waiting_for_space = True
            n = max(0, room)
            samples = samples[:n]
        if not n:
            return 0, False
        self.runner.write(record.slot, record.written, samples)
        # Wake the loop only when this write gave the stream work; otherwise every 20 ms frame of
        # every stream would re-plan all streams (quadratic in the number of streams).
        return n, self.scheduler.wrote(record, n)

    def flush(self, handle: int, at: int | None = None) -> int:
        """End the stream's utterance (at stream sample `at`, if earlier than the audio written and the
        stream can still be cut there: Scheduler.flush); returns the flush point."""
        with self.lock:
            self._live(handle)
            point = self.scheduler.flush(handle, at)
        self.wake.set()
        return point

    def written(self, handle: int) -> int:
        """Model-rate samples of the stream's audio in the engine (its next write's first sample)."""
        with self.lock:
            return self._live(handle).record.written

    def close(self, handle: int, reason: Error | None = None) -> None:
        """Release the stream's slot now (mid-step included: its results are dropped) and send it its
        remaining usage, an optional error, and the end of events."""
        with self.lock:
            state = self.streams.pop(handle, None)
            if state is None or state.closed:
                return
            state.closed = True
            self.scheduler.release(handle)
        with state.guard:  # after the loop thread's events of this stream in progress, if any
            if state.policy is not None:
                # Every SpeechStarted gets its SpeechEnded, also when the stream stops mid-speech: the open
                # segment closes where the VAD stopped listening.
                for transition in state.policy.flush():
                    state.emit(_speech_event(transition))
            if state.unreported_samples:
                state.emit(Usage(state.unreported_samples / self.model.sample_rate))
            if reason is not None:
                state.emit(reason)
            state.emit(None)  # end of events
        state.on_space()  # wake a push waiting for room: it will find the stream closed

    def buffered_seconds(self, handle: int) -> float:
        with self.lock:
            state = self.streams.get(handle)
            return self.scheduler.buffered(state.record) / self.model.sample_rate if state else 0.0

    def check_not_orphaned(self) -> None:
        """Raise StreamError in a forked child, where nothing will ever emit this core's events (a
        reader would wait forever)."""
        if self.orphaned:
            raise StreamError(process.FORKED)

    def check_open(self, handle: int) -> None:
        """Raise StreamError if the stream is closed. Without the lock (a dict lookup and an attribute
        read are atomic): a push that writes nothing yet (held, coalesce.py) must not wait for the loop
        thread's planning; a close right after the check is seen by the write, as it was with the lock."""
        self._live(handle)

    def abandon(self, handle: int) -> None:
        """Close the stream soon, from the loop (safe from finalizers: takes no lock)."""
        self.abandoned.append(handle)

    def _live(self, handle: int) -> StreamState:
        state = self.streams.get(handle)
        if state is None or state.closed:
            raise self._refusal("the stream is closed")
        return state

    # ---- the loop ----------------------------------------------------------------------------------
    def _pass(self, next_sweep: float) -> float:
        """One pass of the loop thread (_serve): a tick, or a short wait for work. Returns when the next
        sweep for unreachable streams is due."""
        while self.abandoned:
            self.close(self.abandoned.popleft())
        if time.monotonic() >= next_sweep:
            self._close_unreachable()
            next_sweep = time.monotonic() + SWEEP_SECONDS
        resets, plan = self._plan_tick()
        try:
            if resets:
                self.runner.reset_utterance([slot for slot, _ in resets])
                self.runner.reset_vad([slot for slot, vad in resets if vad])
            if plan.empty:
                self.wake.wait(0.05 if plan.wake_in is None else min(0.05, plan.wake_in))
                self.wake.clear()
                return next_sweep
            started = time.perf_counter()
            self._run(plan)
            elapsed = time.perf_counter() - started
            self.stats = TickStats(len(plan.steps), sum(len(b.rows) for b in plan.steps), len(plan.vad), elapsed)
            for hook in self.tick_hooks:
                self._call_hook(hook, plan, elapsed)
        except Exception as exc:  # past the guarded model calls (a bug, a device failure in a reset)
            # The loop must go on for everyone else: fail only the streams this tick touched.
            log.exception("engine tick failed")
            self._fail_tick(plan, {slot for slot, _ in resets}, exc)
        return next_sweep

    def _call_hook(self, hook: Callable[[TickPlan, float], None], plan: TickPlan, elapsed: float) -> None:
        """An observer's failure (metrics, a benchmark) is its own: it is logged and the observer removed,
        and the tick's streams go on (they used to be failed with it, like a failed tick)."""
        try:
            hook(plan, elapsed)
        except Exception:
            log.exception("tick hook %r failed and was removed", hook)
            self.remove_tick_hook(hook)

    def _plan_tick(self) -> tuple[list[tuple[int, bool]], TickPlan]:
        """The slot resets queued since the last tick, and this tick's plan."""
        with self.lock:
            resets, self.pending_resets = self.pending_resets, []
            plan = self.scheduler.plan()
            skipped = [(self.streams[h], n) for h, n in zip(plan.skipped, plan.skipped_samples) if h in self.streams]
        for state, samples in skipped:
            # Skipped silence is audio processed too: Usage counts it as it goes, as it counts steps.
            with state.guard:
                if not state.closed:
                    self._count_usage(state, samples)
        # Windows skipped as silence freed buffer room with no step result to say so.
        self._signal_space(state for state, _ in skipped)
        return resets, plan

    def _close_unreachable(self) -> None:
        """Close the streams whose events nobody can receive any more (their event loop ended while they
        were open), so their slots return to the pool."""
        with self.lock:
            dead = [h for h, state in self.streams.items() if state.alive is not None and not state.alive()]
        for handle in dead:
            self.close(handle)

    def _fail_tick(self, plan: TickPlan, slots: set[int], exc: Exception) -> None:
        handles = {row.handle for batch in plan.steps for row in batch.rows}
        handles |= {row.handle for row in plan.vad} | {row.handle for row in plan.finals}
        with self.lock:
            handles |= {h for h, state in self.streams.items() if state.record.slot in slots}
        for handle in handles:
            self.close(handle, Error("internal", f"{type(exc).__name__}: {exc}"))

    def _fail_all(self, exc: Exception) -> None:
        """Close every open stream with Error('internal') (a failure no plan ties to some streams)."""
        with self.lock:
            handles = list(self.streams)
        for handle in handles:
            try:
                self.close(handle, Error("internal", f"{type(exc).__name__}: {exc}"))
            except Exception:  # that stream's own callbacks failed: it is released all the same
                log.exception("closing stream %d failed", handle)

    def _run(self, plan: TickPlan) -> None:
        if plan.vad:
            probs = self._guarded(plan.vad, lambda: self.runner.vad(plan.vad))
            if probs is not None:
                self._apply_vad(plan.vad, probs)
        for batch in plan.steps:
            restarts = [(row.slot, row.restart_frames) for row in batch.rows if row.restart_frames]
            if restarts:
                self.runner.restart_encoder(restarts)
            results = self._guarded(batch.rows, lambda: self.runner.step(batch))
            if results is not None:
                self._apply_steps(batch.rows, results)
        for row in plan.finals:
            with self.lock:
                state = self.streams.get(row.handle)
            if state is not None and state.record.generation == row.generation:
                with state.guard:
                    if not state.closed:  # closed since it was planned: no event after the end
                        self._finish_utterance(state, row.utt_start, row.end)

    def _signal_space(self, states) -> None:
        """Wake the writers that found their buffer full, now that the engine has consumed audio."""
        for state in states:
            if state.waiting_for_space:
                state.waiting_for_space = False
                state.on_space()

    def _guarded(self, rows, run):
        """Run a batched call; if it fails, fail (only) the streams in it."""
        try:
            return run()
        except Exception as exc:  # a bug or a device failure must not take down the other streams
            log.exception("engine step failed for %d streams", len(rows))
            for row in rows:
                self.close(row.handle, Error("internal", f"{type(exc).__name__}: {exc}"))
            return None

    def _apply_vad(self, rows, probs) -> None:
        progressed = []
        scheduler = self.scheduler
        with self.lock:
            for row, row_probs in zip(rows, probs):
                record = scheduler.vad_done(row)
                state = self.streams.get(row.handle)
                if record is not None and state is not None:
                    progressed.append((record, state, row_probs))
        voiced = []
        for record, state, row_probs in progressed:
            with state.guard:
                if state.closed:  # closed since: close() has flushed the policy and ended the events
                    continue
                for transition in state.policy.update(row_probs):
                    state.emit(_speech_event(transition))
                voiced.append((record, state.policy.voiced_until))
        if scheduler.skip_silence is not None:
            # Where speech was last heard, as the policy's segments see it: inside a segment only a window
            # below neg_threshold is silence. (Counting only windows above threshold as voice skipped soft
            # speech inside a reported segment.) Before the next plan, which only this thread makes.
            with self.lock:
                for record, end in voiced:
                    scheduler.heard_voice(record, end)
        self._signal_space(state for _, state, _ in progressed)

    def _apply_steps(self, rows: tuple[StepRow, ...], results: list[RowResult]) -> None:
        done = []
        with self.lock:
            for row, result in zip(rows, results):
                record = self.scheduler.step_done(row)
                state = self.streams.get(row.handle)
                if record is not None and state is not None:
                    done.append((row, result, state))
        for row, result, state in done:
            with state.guard:
                if not state.closed:  # closed since: its results are dropped, as mid-step
                    self._apply_result(state, row, result)
        self._signal_space(state for _, _, state in done)

    def _apply_result(self, state: StreamState, row: StepRow, result: RowResult) -> None:
        """One row's step result into its stream's text and events (under state.guard)."""
        if result.labels:
            known = len(state.labels)
            state.labels += result.labels
            state.frames += result.frames
            state.durations += result.durations
            tokenizer = self.model.tokenizer
            state.text = tokenizer.extend(state.text, state.labels, known)
            # Without a character whose byte pieces are still arriving: shown, it would be taken back.
            text = tokenizer.settled(state.text, state.labels)
            state.emit(Partial(text=text, stable_text=text, start=row.utt_start, end=result.end))
        self._count_usage(state, result.samples)
        if row.final:
            self._finish_utterance(state, row.utt_start, row.end)

    def _count_usage(self, state: StreamState, samples: int) -> None:
        """`samples` of the utterance processed (under state.guard): a Usage once enough are unreported."""
        state.unreported_samples += samples
        state.utterance_counted += samples
        if state.unreported_samples >= self.usage_samples:
            state.emit(Usage(state.unreported_samples / self.model.sample_rate))
            state.unreported_samples = 0

    def _finish_utterance(self, state: StreamState, utt_start: int, end: int) -> None:
        """Send the utterance's Final (times in stream samples) and start the next utterance."""
        transcript = self.model.make_transcript(state.labels, state.frames, state.durations)

        def clamp(sample: int) -> int:
            # A last frame (or a TDT duration) can reach past the audio; times stay inside the utterance.
            return min(sample + utt_start, end)

        tokens = [Token(t.id, t.text, clamp(t.start), clamp(t.end)) for t in transcript.tokens]
        words = [Word(w.text, clamp(w.start), clamp(w.end)) for w in transcript.words]
        state.labels, state.frames, state.durations, state.text = [], [], [], ""
        # Steps and skipped windows count the audio they move past; what neither covered (the part of the
        # last feature frame past the hop grid) is counted here: every utterance's audio is reported in
        # full.
        state.unreported_samples += max(0, end - utt_start - state.utterance_counted)
        state.utterance_counted = 0
        # Reset with the tick's other ends, in one batched call before the next plan runs any step.
        with self.lock:
            self.pending_resets.append((state.record.slot, False))
        state.emit(Final(text=transcript.text, tokens=tokens, words=words, start=utt_start, end=end))


def _serve(ref: "weakref.ref[EngineCore]") -> None:
    """The loop thread. It holds its core for one pass at a time, so an engine its owner dropped without
    closing it (no Engine or stream object left to use it) is garbage-collected between two passes, and
    the thread ends with it: its model, slots and thread are not held until the process exits."""
    next_sweep = 0.0
    while True:
        core = ref()
        if core is None or core._stopping:
            return
        try:
            next_sweep = core._pass(next_sweep)
        except Exception as exc:  # outside the tick's guard (planning, closing dropped streams): a bug
            # Ending the thread here left every stream waiting forever (no events, no end) while new
            # streams were still admitted. No plan says which streams it touched: fail them all.
            log.exception("engine loop failed outside a tick")
            core._fail_all(exc)
        del core  # the last reference may be this one: the core is then freed here, between passes
