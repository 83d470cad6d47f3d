"""The model side of the engine: every stream's state in preallocated slot-indexed tensors, and batched
frontend + encoder + decoder steps and VAD calls over the rows the scheduler planned.

Audio arrives in a host ring buffer per slot (that is where it lands from the network or the caller); a
step gathers each row's analysis window from it with one fancy-indexing operation, pre-emphasises and
masks it, and copies the batch to the device once. Encoder caches (SlotCache: attention caches as rings,
of which a step writes back only the new frames), decoder state and VAD state live on the device,
indexed by slot; a step gathers its rows, runs, and writes them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..asr import ASRModel
from ..decoding.greedy import DecoderState, greedy_decode, initial_state
from ..streaming.cuda_graph import SlotGraphedEncoderStep, bucket_sizes
from ..streaming.slot_cache import SlotCache, slot_encoder_step
from ..streaming.plan import ChunkPlan
from ..streaming.shape import ModeShape
from .memory import SlotBytes, available_device_memory, available_host_memory, check_slots_fit
from .scheduler import MAX_VAD_WINDOWS, AudioGeometry, StepBatch, StepRow, VADRow


@dataclass
class RowResult:
    """What one row's step produced: labels with utterance-relative frame times."""

    labels: list[int]
    frames: list[int]
    durations: list[int]
    samples: int  # audio samples this step consumed (for usage accounting)
    end: int = 0  # stream sample up to which the utterance has now been transcribed


class ModelRunner:
    def __init__(
        self,
        model: ASRModel,
        plans: dict[int, ChunkPlan],
        slots: int,
        ring_samples: int,
        vad: bool,
        max_batch: int = 64,
        cuda_graphs: bool = True,
    ):
        self.model = model
        self.plans = plans
        self.device = model.device
        # Encoder steps replay CUDA graphs, one per (mode, batch bucket), captured on first use, that read
        # and write the slot caches in place; padding rows use a scratch slot (index `slots`) nobody reads.
        self.graphs: dict[tuple[int, int], SlotGraphedEncoderStep] | None = {} if cuda_graphs and self.device.type == "cuda" else None
        self.buckets = bucket_sizes(max_batch)
        self.scratch = slots
        self._pool = torch.cuda.graph_pool_handle() if self.graphs is not None else None
        cfg = model.config.frontend
        self.preemph = cfg.preemph
        self.geometry = geometry(model)
        lefts = {p.shape.cache_frames for p in plans.values()}
        if len(lefts) != 1:
            raise ValueError(f"the engine needs every latency mode to keep the same left context, got {sorted(lefts)}")
        module = model.module
        # Host audio per slot: a ring of `ring_samples`, followed by a mirror of its first samples, as
        # long as the longest read (a step's analysis span, or the VAD's most windows in one tick).
        self.ring_samples = ring_samples
        self.mirror = max(
            max(self.geometry.step_read(p.shape.step_mel) for p in plans.values()),
            MAX_VAD_WINDOWS * self.geometry.vad_window,
        )
        cache_frames = lefts.pop()
        self._fresh_decoder = initial_state(module.decoder, module.joint, 1, self.device)
        make_vad_state = None  # VADState.zeros, imported only with VAD on
        if vad:
            from ..vad.silero import VADState

            make_vad_state = VADState.zeros
        # What one slot holds, from one slot's state, so that too many slots fail here with the sizes
        # and not in the allocator below.
        one = [SlotCache.zeros(module.encoder, cache_frames, 1, self.device), self._fresh_decoder]
        if make_vad_state is not None:
            one.append(make_vad_state(1, self.device))
        self.slot_bytes = SlotBytes(
            device=sum(state_bytes(state) for state in one),
            host=(ring_samples + self.mirror) * np.dtype(np.float32).itemsize,
        )
        scratch = state_bytes(one[0])  # the encoder-cache row past the slots, allocated below
        check_slots_fit(
            slots, self.slot_bytes, self.device, available_host_memory(), available_device_memory(self.device), scratch
        )
        self.ring = np.zeros((slots, ring_samples + self.mirror), dtype=np.float32)
        self.cache = SlotCache.zeros(module.encoder, cache_frames, slots + 1, self.device)  # + scratch row
        self.decoder = initial_state(module.decoder, module.joint, slots, self.device)
        self.vad_model = self.vad_state = None
        if make_vad_state is not None:
            from ..vad.silero import SileroVAD

            self.vad_model = SileroVAD.from_package(device=self.device)
            self.vad_state = make_vad_state(slots, self.device)

    def release(self) -> None:
        """Let go of every slot's state, and the CUDA graphs that write it, once the engine has stopped
        (its loop thread ended, every stream closed): a stopped engine someone still holds (a user's
        variable) no longer keeps max_streams slots of memory from a new engine. Nothing may step, write
        or reset a slot after this; the engine refuses every such call first."""
        self.ring = self.cache = self.decoder = self.vad_state = self.vad_model = None
        if self.graphs is not None:
            self.graphs, self._pool = {}, None
        if self.device.type == "cuda":
            # The next engine's memory check reads the device's free memory, which does not count blocks
            # still cached by PyTorch's allocator.
            torch.cuda.empty_cache()

    # ---- audio -------------------------------------------------------------------------------------
    def write(self, slot: int, position: int, samples: np.ndarray) -> None:
        """Store samples at absolute stream position `position` in the slot's ring."""
        cap = self.ring_samples
        start = position % cap
        # Most writes lie inside the ring and clear of the mirror: stored here, without _store's call and
        # the slice (0.4-0.5 us of a 10 us push, benchmarks/push_cost.py --vad).
        if self.mirror <= start <= cap - len(samples):
            self.ring[slot, start : start + len(samples)] = samples
            return
        first = min(len(samples), cap - start)
        self._store(slot, start, samples[:first])
        if first < len(samples):
            self._store(slot, 0, samples[first:])

    def _store(self, slot: int, start: int, samples: np.ndarray) -> None:
        """Write ring positions [start, start + len) (inside the ring), and their copy in the mirror."""
        self.ring[slot, start : start + len(samples)] = samples
        if start < self.mirror:
            end = min(start + len(samples), self.mirror)
            self.ring[slot, self.ring_samples + start : self.ring_samples + end] = samples[: end - start]

    def _gather(self, slots: np.ndarray, first: np.ndarray, length: int) -> np.ndarray:
        """Samples [first, first + length) of each slot's stream -> [B, length]. The ring's first `mirror`
        samples are repeated after its end, so every read is one contiguous slice: one strided copy for
        the whole batch, with no index arithmetic per sample."""
        windows = np.lib.stride_tricks.sliding_window_view(self.ring, length, axis=1)  # [slots, n, length] view
        return windows[slots, first % self.ring_samples]

    # ---- state resets ------------------------------------------------------------------------------
    def reset_utterance(self, slots: list[int]) -> None:
        """Fresh encoder caches and decoder state: these slots start an utterance."""
        if not slots:
            return
        rows = torch.tensor(slots, device=self.device)
        self.cache.reset_rows(rows)
        fresh = DecoderState.cat([self._fresh_decoder] * len(slots))
        self.decoder.write_rows(rows, fresh)

    def restart_encoder(self, restarts: list[tuple[int, int]]) -> None:
        """(slot, skipped frames): empty the encoder caches after skipped silence; the decoder keeps its
        context, its clock moves past the skipped frames, and a TDT jump into them is dropped."""
        rows = torch.tensor([slot for slot, _ in restarts], device=self.device)
        skipped = torch.tensor([frames for _, frames in restarts], device=self.device)
        self.cache.reset_rows(rows)
        self.decoder.frame_offset.index_add_(0, rows, skipped)
        self.decoder.time_jump.index_fill_(0, rows, 0)

    def reset_vad(self, slots: list[int]) -> None:
        if slots and self.vad_state is not None:
            mask = torch.zeros(self.vad_state.batch_size, dtype=torch.bool, device=self.device)
            mask[torch.tensor(slots, device=self.device)] = True
            self.vad_state.reset_(mask)

    # ---- steps -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: StepBatch) -> list[RowResult]:
        plan = self.plans[batch.latency_ms]
        shape, g = plan.shape, self.geometry
        rows = batch.rows
        slots = np.array([r.slot for r in rows])
        utt = np.array([r.utt_start for r in rows])
        end = np.array([r.end for r in rows])
        window = np.array([r.window for r in rows])
        length = g.step_read(shape.step_mel)
        first = g.step_first(utt, window)  # [B]
        audio = self._gather(slots, first, length)  # [B, length]
        # Row-relative bounds of the utterance's audio: samples outside it read as zeros.
        lo_col, hi_col = (utt - first)[:, None], (end - first)[:, None]  # [B, 1] each
        cols = np.arange(length)[None, :]
        edge = bool((lo_col > 0).any() or (hi_col < length).any())  # only first and last windows
        if edge:
            audio = np.where((cols >= lo_col) & (cols < hi_col), audio, np.float32(0.0))
        if self.preemph is not None:
            audio = audio[:, 1:] - np.float32(self.preemph) * audio[:, :-1]
        else:
            audio = audio[:, 1:]
        if edge:  # as offline, pre-emphasised samples past the utterance's end are zero
            audio = np.where(cols[:, 1:] < hi_col, audio, np.float32(0.0))
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        module = self.model.module
        mel = module.frontend.frames(torch.from_numpy(audio).to(self.device))  # [B, n_mels, step_mel]
        lo = hi = None
        if any(r.lo for r in rows):
            lo = torch.tensor([r.lo for r in rows], device=self.device)
        if any(r.hi <= shape.step_mel for r in rows):
            hi = torch.tensor([r.hi for r in rows], device=self.device)
        index = torch.from_numpy(slots).to(self.device)
        encoded, length = self._encode(batch.latency_ms, plan, mel.transpose(1, 2), index, lo, hi)
        decoded, state = greedy_decode(
            module.decoder, module.joint, encoded, length, self.decoder.select(index), *self.model.decoding_args
        )
        self.decoder.write_rows(index, state)
        results = []
        for i, row in enumerate(rows):
            moved, reached = row_span(row, shape, g)
            results.append(RowResult(decoded.labels[i], decoded.frames[i], decoded.durations[i], moved, reached))
        return results

    def _encode(self, latency_ms: int, plan: ChunkPlan, mel: torch.Tensor, index: torch.Tensor, lo, hi):
        """Encoder step for the rows `index` (slots), updating their caches: on CUDA replayed from the
        graph of the smallest bucket that holds the batch (every graph takes masks, so rows starting or
        ending an utterance batch with the rest), else eagerly."""
        rows = index.shape[0]
        if self.graphs is None:
            return slot_encoder_step(self.model.module.encoder, plan, mel, self.cache, index, lo, hi)
        bucket = next(b for b in self.buckets if b >= rows)
        return self._graph(latency_ms, bucket)(mel, index, lo, hi)

    def _graph(self, latency_ms: int, bucket: int) -> SlotGraphedEncoderStep:
        graph = self.graphs.get((latency_ms, bucket))
        if graph is None:
            graph = self.graphs[(latency_ms, bucket)] = SlotGraphedEncoderStep(
                self.model.module.encoder, self.plans[latency_ms], bucket, self.cache, self.scratch, pool=self._pool
            )
        return graph

    def warmup(self, latencies: list[int]) -> None:
        """Capture the CUDA graphs of these modes for every batch bucket up to max_batch, ahead of traffic."""
        if self.graphs is None:
            return
        for latency in latencies:
            for bucket in self.buckets:
                self._graph(latency, bucket)

    @torch.no_grad()
    def vad(self, rows: tuple[VADRow, ...]) -> list[list[float]]:
        """Speech probabilities of each row's windows, in order, from one batched call over every row's
        windows (the VAD's convolutions run on all windows at once, its LSTM window by window)."""
        width = self.geometry.vad_window
        slots = np.array([r.slot for r in rows])
        counts = np.array([r.windows for r in rows])
        first = np.array([r.start for r in rows])
        audio = self._gather(slots, first, int(counts.max()) * width)  # [B, windows * 512]
        index = torch.from_numpy(slots).to(self.device)
        probs, state = self.vad_model.forward_windows(torch.from_numpy(audio).to(self.device), counts, self.vad_state.select(index))
        self.vad_state.assign_(index, state)
        return [row[:n] for row, n in zip(probs.tolist(), counts.tolist())]


def row_span(row: StepRow, shape: ModeShape, g: AudioGeometry) -> tuple[int, int]:
    """(samples the row's step moved past, stream sample the utterance is transcribed up to after it).
    For Usage: the window starts before the utterance on its first step and its last step reaches past
    the flush point, so both are clamped to the utterance's audio."""
    consumed = shape.step_mel if row.hi > shape.step_mel else max(0, row.hi - 1)
    begin = row.utt_start + g.hop * row.window
    reached = max(min(begin + consumed * g.hop, row.end), row.utt_start)
    return max(0, reached - max(begin, row.utt_start)), reached


def state_bytes(state) -> int:
    """Bytes of the tensors (and lists of tensors) a state dataclass holds."""
    total = 0
    for value in vars(state).values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def geometry(model: ASRModel) -> AudioGeometry:
    cfg = model.config.frontend
    half = cfg.n_fft // 2
    lead = (cfg.n_fft - cfg.win_length) // 2
    return AudioGeometry(hop=cfg.hop_length, n_fft=cfg.n_fft, reach=lead + cfg.win_length - half)
