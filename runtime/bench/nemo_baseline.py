"""The NeMo baseline of `monosemantic bench`: NeMo's own multi-stream cache-aware streaming pipeline.

`run_nemo` drives NeMo 3.0's `CacheAwareRNNTPipeline` (built by `nemo.collections.asr.inference.factory`,
the code path behind NeMo's `asr_streaming_inference` example) with the same simulated workload
(`workload.StreamPlan`) the engine runs, in this process, on a monotonic clock, and measures what
`result.BenchResult` defines.

How the pipeline is fed (what NeMo's own `ContinuousBatchedRequestStreamer` would do, but in real time):

* Every utterance of every plan is one NeMo stream (a new stream id): its first chunk carries
  `is_first=True` and request options, its last `is_last=True`, which makes the pipeline finalize the
  utterance (`final_transcript`) and free the stream's cache slot.
* The pipeline consumes exactly one model chunk per stream and step (`chunk_size_in_secs` of audio:
  (right context + 1) x 80 ms for the Nemotron family), so the workload's 20 ms frames are gathered per
  stream into chunks; the last chunk of an utterance is zero-padded, its valid length given in
  `Frame.length`.
* The loop sleeps until the next frame is due, takes every frame whose send time has passed, and runs
  one `transcribe_step` on the oldest pending chunk of every stream that has one (one batch across
  streams, as the pipeline batches its slots). A stream that falls behind queues its chunks; they are
  processed in later steps, so the backlog shows in the latencies.
* NeMo's own end-of-utterance detector is off (`endpointing.stop_history_eou=-1`): the workload flushes
  at each utterance end, as a voice agent with its own turn detection does, so finals come only from
  `is_last` -- the same finals the engine is asked for.

Metrics (see result.BenchResult), all on the run's clock from the scheduled send times (so time a frame
waits while the loop is busy in NeMo counts): a chunk's latency runs from the send time of its last sample
(NeMo's pipeline needs no sample past the chunk: its mel is computed from the chunk and 10 ms before it)
to the end of the `transcribe_step` that processed it, for every chunk but an utterance's last (the
zero-padded `is_last` chunk), whose latency is the time to final -- as the engine bench counts. Time to
final runs from the send time of an utterance's last frame to the end of the step that processed its
`is_last` chunk. compute_seconds is the wall time inside `transcribe_step`; audio_seconds the valid audio
fed. memory_per_stream_mb is the state NeMo keeps per stream (the encoder's attention and convolution
caches, the pipeline's feature and audio buffers, the prediction network's LSTM state), i.e. what each
added stream costs beyond the shared weights; transient activations are not included (on CPU they cannot
be attributed to a stream).
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import tarfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import ModelLoadError, UnsupportedModelError, missing_dependency
from .result import BenchResult
from .workload import FRAME_MS, StreamPlan

SAMPLE_RATE = 16000
WARMUP_CHUNKS = 3  # chunks per warm-up stream (the last one is_last), run before the clock starts
MIN_DRAIN_S = 10.0  # after the last frame is due, keep processing at least this long (or the plan's duration)


@dataclass
class NemoRun:
    """A baseline run with what NeMo transcribed: `finals[plan][utterance]` is the final transcript of
    that utterance (None where no final came back)."""

    result: BenchResult
    finals: list[list[str | None]] = field(default_factory=list)


def run_nemo(
    model_path: str,
    plans: list[StreamPlan],
    latency_ms: int,
    *,
    device: str = "cpu",
    compute_threads: int | None = None,
    frame_ms: int = FRAME_MS,
) -> BenchResult:
    """Run `plans` through NeMo's cache-aware streaming pipeline in real time; see the module docstring.

    model_path: a cache-aware `.nemo` checkpoint (RNN-T, TDT or hybrid RNN-T/CTC);
    latency_ms: the mode's chunk duration ((right context + 1) x subsampling x hop, e.g. 160 for [70, 1]);
    device: "cpu", "cuda" or "cuda:N"; compute_threads: torch intra-op threads for the run (None: as is);
    frame_ms: the client's frame size, as the engine's trial is fed.
    """
    return run_nemo_detailed(model_path, plans, latency_ms, device=device, compute_threads=compute_threads, frame_ms=frame_ms).result


def run_nemo_detailed(
    model_path: str,
    plans: list[StreamPlan],
    latency_ms: int,
    *,
    device: str = "cpu",
    compute_threads: int | None = None,
    frame_ms: int = FRAME_MS,
) -> NemoRun:
    """`run_nemo`, also returning the final transcripts NeMo produced (for checks)."""
    if not plans:
        raise ValueError("the NeMo baseline needs at least one stream plan")
    model_path = os.fspath(model_path)
    if not model_path.endswith(".nemo") or not os.path.isfile(model_path):
        raise ModelLoadError(f"the NeMo baseline needs a local .nemo file, got {model_path!r}")
    att_context, max_symbols = _pick_mode(model_path, latency_ms)
    device_name, device_id = _parse_device(device)

    import torch

    previous_threads = torch.get_num_threads()
    previous_precision = torch.get_float32_matmul_precision()
    with _quiet_nemo(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if compute_threads is not None:
                torch.set_num_threads(int(compute_threads))
            pipe = _build_pipeline(model_path, att_context, max_symbols, device_name, device_id, num_slots=len(plans))
            chunk_ms = pipe.chunk_size_in_secs * 1000.0
            if not math.isclose(chunk_ms, latency_ms, abs_tol=0.5):
                raise UnsupportedModelError(
                    f"NeMo's pipeline runs att_context_size {att_context} with {chunk_ms:g} ms chunks, "
                    f"not the requested {latency_ms} ms"
                )
            runner = _Runner(pipe, plans, latency_ms, device_name, frame_ms)
            runner.warm_up()
            run = runner.run()
        finally:
            torch.set_num_threads(previous_threads)
            torch.set_float32_matmul_precision(previous_precision)

    import nemo

    result = run.result
    result.system = (
        f"nemo {getattr(nemo, '__version__', '?')} CacheAwareRNNTPipeline "
        f"(att_context_size {list(att_context)}, {device_name}, float32)"
    )
    return run


# ----------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------


def _read_nemo_config(model_path: str) -> dict:
    """model_config.yaml of a .nemo archive (a tar, possibly compressed), without loading the model."""
    import yaml

    try:
        with tarfile.open(model_path, "r:*") as tar:
            for member in tar:
                if os.path.basename(member.name) == "model_config.yaml":
                    data = tar.extractfile(member).read()
                    return yaml.safe_load(data) or {}
    except (tarfile.TarError, OSError) as exc:
        raise ModelLoadError(f"{model_path}: not a readable .nemo archive ({exc})") from exc
    raise ModelLoadError(f"{model_path}: no model_config.yaml in the archive")


def _pick_mode(model_path: str, latency_ms: int) -> tuple[list[int], int | None]:
    """(att_context_size whose chunk lasts `latency_ms`, the checkpoint's greedy max_symbols)."""
    cfg = _read_nemo_config(model_path)
    encoder = cfg.get("encoder") or {}
    preprocessor = cfg.get("preprocessor") or {}
    contexts = encoder.get("att_context_size")
    if contexts and not isinstance(contexts[0], (list, tuple)):
        contexts = [contexts]
    contexts = [[int(x) for x in c] for c in (contexts or [])]
    if not contexts or any(c[0] < 0 for c in contexts):
        raise UnsupportedModelError(
            f"{model_path}: encoder att_context_size {contexts or None} is not cache-aware "
            "(NeMo's cache-aware streaming pipeline needs a finite left context)"
        )
    if encoder.get("att_context_style", "regular") != "chunked_limited":
        raise UnsupportedModelError(
            f"{model_path}: att_context_style {encoder.get('att_context_style')!r}; the baseline maps "
            "latency modes for chunked_limited (Nemotron-style) encoders only"
        )
    frame_ms = int(encoder.get("subsampling_factor", 8)) * float(preprocessor.get("window_stride", 0.01)) * 1000.0
    modes = {int(round((c[1] + 1) * frame_ms)): c for c in contexts}
    if latency_ms not in modes:
        raise ValueError(f"latency_ms={latency_ms!r} is not a mode of this model; choose one of: {sorted(modes)}")
    greedy = ((cfg.get("decoding") or {}).get("greedy")) or {}
    max_symbols = greedy.get("max_symbols", greedy.get("max_symbols_per_step"))
    return modes[latency_ms], (int(max_symbols) if max_symbols is not None else None)


def _parse_device(device: str) -> tuple[str, int]:
    device = str(device).strip()
    if device == "cpu":
        return "cpu", 0
    if device == "cuda":
        return "cuda", 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return "cuda", int(device[5:])
    raise ValueError(f"device must be cpu, cuda or cuda:N for the NeMo baseline, got {device!r}")


@contextlib.contextmanager
def _quiet_nemo() -> Iterator[None]:
    """Silence NeMo's logger (and the import-time chatter of its dependencies) for the block."""
    import logging

    noisy = [logging.getLogger(name) for name in ("nemo_logger", "nv_one_logger", "one_logger", "lightning", "pytorch_lightning")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        from nemo.utils import logging as nemo_logging
    except ImportError as exc:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)
        raise missing_dependency("nemo_toolkit", "nemo", "the NeMo baseline") from exc
    previous = nemo_logging.get_verbosity()
    nemo_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        nemo_logging.set_verbosity(previous)
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)


def _pipeline_config(model_path, att_context, max_symbols, device, device_id, num_slots) -> dict:
    """NeMo's examples/asr/conf/asr_streaming_inference/cache_aware_rnnt.yaml, for this run: float32 without
    autocast, no ITN/NMT/biasing, NeMo's endpointer off (finals at flush only), one slot per stream."""
    greedy = {
        "use_cuda_graph_decoder": False,  # as in NeMo's cache_aware_rnnt.yaml
        "enable_per_stream_biasing": False,
        "preserve_frame_confidence": False,
    }
    if max_symbols is not None:
        greedy["max_symbols"] = max_symbols
    return {
        "asr": {
            "model_name": model_path,
            "device": device,
            "device_id": device_id,
            "compute_dtype": "float32",
            "use_amp": False,
            "decoding": {"strategy": "greedy_batch", "preserve_alignments": False, "fused_batch_size": -1, "greedy": greedy},
        },
        "itn": {
            "input_case": "lower_cased",
            "whitelist": None,
            "overwrite_cache": False,
            "max_number_of_permutations_per_split": 729,
            "left_padding_size": 4,
            "batch_size": 32,
            "n_jobs": 1,
        },
        "confidence": {
            "exclude_blank": True,
            "aggregation": "mean",
            "method_cfg": {"name": "entropy", "entropy_type": "tsallis", "alpha": 0.5, "entropy_norm": "exp"},
        },
        "endpointing": {"stop_history_eou": -1, "residue_tokens_at_end": 0},
        "streaming": {
            "sample_rate": SAMPLE_RATE,
            "batch_size": num_slots,
            "num_slots": num_slots,
            "word_boundary_tolerance": 4,
            "att_context_size": list(att_context),
            "use_cache": True,
            "use_feat_cache": True,
            "chunk_size_in_secs": None,
            "request_type": "frame",
        },
        "matmul_precision": "highest",
        "log_level": 40,
        "pipeline_type": "cache_aware",
        "asr_decoding_type": "rnnt",
        "enable_itn": False,
        "enable_nmt": False,
        "asr_output_granularity": "segment",
        "cache_dir": None,
        "lang": "en",
        "return_tail_result": False,
    }


def _build_pipeline(model_path, att_context, max_symbols, device, device_id, num_slots):
    try:
        from omegaconf import OmegaConf

        from nemo.collections.asr.inference.factory.pipeline_builder import PipelineBuilder
    except ImportError as exc:
        raise missing_dependency("nemo_toolkit", "nemo", "the NeMo baseline") from exc
    cfg = OmegaConf.create(_pipeline_config(model_path, att_context, max_symbols, device, device_id, num_slots))
    try:
        return PipelineBuilder.build_pipeline(cfg)
    except RuntimeError as exc:
        raise ModelLoadError(f"NeMo could not build its cache-aware pipeline from {model_path}: {exc}") from exc


def _state_bytes_per_slot(pipe) -> int | None:
    """Bytes NeMo keeps per stream: encoder caches + feature buffer + audio buffer + LSTM state."""
    try:
        cm, buf = pipe.context_manager, pipe.bufferer
        per_slot = sum(t.numel() * t.element_size() for t in (cm.cache_last_channel, cm.cache_last_time, cm.cache_last_channel_len))
        per_slot += buf.feature_buffer.numel() * buf.feature_buffer.element_size()
        per_slot //= cm.num_slots
        audio = buf.audio_bufferers[0].sample_buffer
        per_slot += audio.numel() * audio.element_size()
    except AttributeError:
        return None
    # The previous hypothesis of each stream holds the prediction network's LSTM (h, c).
    decoder = getattr(getattr(pipe.asr_model, "asr_model", None), "decoder", None)
    layers, hidden = getattr(decoder, "pred_rnn_layers", None), getattr(decoder, "pred_hidden", None)
    if layers and hidden:
        per_slot += 2 * int(layers) * int(hidden) * 4
    return per_slot


# ----------------------------------------------------------------------------------------------------
# The real-time loop
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    samples: np.ndarray  # exactly chunk_samples long (the last chunk of an utterance zero-padded)
    valid: int
    stream_id: int
    is_first: bool
    is_last: bool
    sent_s: float  # send time of its last real sample (run clock)
    plan: int  # index of its plan
    utterance: int  # index of the utterance in its plan


class _Runner:
    def __init__(self, pipe, plans: list[StreamPlan], latency_ms: int, device: str, frame_ms: int = FRAME_MS):
        self.pipe = pipe
        self.frame_ms = frame_ms
        self.plans = plans
        self.latency_ms = latency_ms
        self.device = device
        self.chunk_samples = int(round(pipe.chunk_size_in_secs * SAMPLE_RATE))
        self.next_stream_id = 0

    # -- NeMo calls ------------------------------------------------------------------------------------

    def _frames(self, chunks: list[_Chunk]):
        import torch

        from nemo.collections.asr.inference.streaming.framing.request import Frame
        from nemo.collections.asr.inference.streaming.framing.request_options import ASRRequestOptions

        return [
            Frame(
                samples=torch.from_numpy(c.samples),
                stream_id=c.stream_id,
                is_first=c.is_first,
                is_last=c.is_last,
                length=c.valid,
                options=ASRRequestOptions(enable_itn=False, enable_nmt=False, stop_history_eou=-1) if c.is_first else None,
            )
            for c in chunks
        ]

    def _step(self, chunks: list[_Chunk]):
        frames = self._frames(chunks)
        outputs = self.pipe.transcribe_step(frames)
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        return outputs

    def _forget(self, stream_id: int) -> None:
        """After a failed step: drop what the pipeline holds for the stream (best effort)."""
        pipe = self.pipe
        with contextlib.suppress(Exception):
            pipe.delete_state(stream_id)
        with contextlib.suppress(Exception):
            cm = pipe.context_manager
            if stream_id in cm.streamidx2slotidx:
                cm._reset_slots([cm.streamidx2slotidx[stream_id]])
        with contextlib.suppress(Exception):
            buf = pipe.bufferer
            if stream_id in buf.streamidx2slotidx:
                buf.free_slots([buf.streamidx2slotidx[stream_id]])

    def warm_up(self) -> None:
        """A few chunks of low noise on every slot at once, then a fresh session (not timed)."""
        rng = np.random.default_rng(0)
        streams = []
        for _ in self.plans:
            sid = self._new_stream_id()
            streams.append(sid)
        self.pipe.open_session()
        for k in range(WARMUP_CHUNKS):
            chunks = [
                _Chunk(
                    samples=(rng.standard_normal(self.chunk_samples) * 1e-3).astype(np.float32),
                    valid=self.chunk_samples,
                    stream_id=sid,
                    is_first=k == 0,
                    is_last=k == WARMUP_CHUNKS - 1,
                    sent_s=0.0,
                    plan=-1,
                    utterance=-1,
                )
                for sid in streams
            ]
            self._step(chunks)
        self.pipe.open_session()

    def _new_stream_id(self) -> int:
        self.next_stream_id += 1
        return self.next_stream_id

    # -- feeding ---------------------------------------------------------------------------------------

    def run(self) -> NemoRun:
        plans = self.plans
        n = self.chunk_samples
        # Every frame of every plan, in send order: (send_s, plan, seq, samples, last_of_utterance).
        events: list = []
        iters = [p.frames(SAMPLE_RATE, self.frame_ms) for p in plans]
        seq = 0

        def push_next(i: int) -> None:
            nonlocal seq
            item = next(iters[i], None)
            if item is not None:
                seq += 1
                heapq.heappush(events, (item[0], i, seq, item[1], item[2]))

        for i in range(len(plans)):
            push_next(i)

        plan_end = max(
            (p.offset_s + (p.utterances[-1].start_s + len(p.utterances[-1].audio) / SAMPLE_RATE) if p.utterances else 0.0)
            for p in plans
        )
        deadline = plan_end + max(MIN_DRAIN_S, plan_end)

        # Per plan: samples gathered for the next chunk, the current utterance's stream id and index.
        gathered: list[list[np.ndarray]] = [[] for _ in plans]
        gathered_len = [0] * len(plans)
        stream_ids: list[int | None] = [None] * len(plans)
        utterance_index = [0] * len(plans)
        first_pending = [True] * len(plans)
        pending: list[deque[_Chunk]] = [deque() for _ in plans]
        dead: set[int] = set()  # stream ids of utterances abandoned after an exception
        exceptions: list[str] = []

        finals: list[list[str | None]] = [[None] * len(p.utterances) for p in plans]
        final_parts: dict[int, list[str]] = {}
        chunk_latency_ms: list[float] = []
        final_latency_ms: list[float] = []
        compute_s = 0.0
        audio_samples = 0
        steps = 0
        batch_sizes_total = 0
        max_batch = 0
        unprocessed_chunks = 0

        def cut(i: int, samples: np.ndarray, valid: int, last: bool, sent_s: float) -> None:
            if stream_ids[i] is None:
                stream_ids[i] = self._new_stream_id()
                first_pending[i] = True
            if valid < n:
                samples = np.concatenate([samples, np.zeros(n - valid, dtype=np.float32)])
            if stream_ids[i] not in dead:
                pending[i].append(
                    _Chunk(
                        samples=np.ascontiguousarray(samples, dtype=np.float32),
                        valid=valid,
                        stream_id=stream_ids[i],
                        is_first=first_pending[i],
                        is_last=last,
                        sent_s=sent_s,
                        plan=i,
                        utterance=utterance_index[i],
                    )
                )
            first_pending[i] = False
            if last:
                stream_ids[i] = None
                utterance_index[i] += 1

        def ingest(send_s: float, i: int, samples: np.ndarray, last: bool) -> None:
            gathered[i].append(np.asarray(samples, dtype=np.float32))
            gathered_len[i] += len(samples)
            while gathered_len[i] >= n and not (last and gathered_len[i] == n):
                audio = np.concatenate(gathered[i])
                cut(i, audio[:n], n, False, send_s)
                gathered[i] = [audio[n:]] if len(audio) > n else []
                gathered_len[i] = len(audio) - n
            if last:
                audio = np.concatenate(gathered[i]) if gathered[i] else np.zeros(0, dtype=np.float32)
                gathered[i], gathered_len[i] = [], 0
                cut(i, audio, len(audio), True, send_s)

        t0 = time.monotonic()
        clock = lambda: time.monotonic() - t0  # noqa: E731
        while True:
            now = clock()
            while events and events[0][0] <= now:
                send_s, i, _, samples, last = heapq.heappop(events)
                ingest(send_s, i, samples, last)
                push_next(i)
            batch = [q.popleft() for q in pending if q]
            if not batch:
                if not events:
                    break
                wait = events[0][0] - clock()
                if wait > 0:
                    time.sleep(wait)
                continue
            if now > deadline:
                unprocessed_chunks = len(batch)
                break
            started = clock()
            try:
                outputs = self._step(batch)
                failed = None
            except Exception as exc:  # noqa: BLE001 -- a failed step is counted, not fatal
                outputs, failed = None, exc
            done = clock()
            compute_s += done - started
            steps += 1
            batch_sizes_total += len(batch)
            max_batch = max(max_batch, len(batch))
            if failed is not None:
                # The utterances in the batch are lost: drop what NeMo holds for them and the rest of
                # their audio; their finals are missing (counted below).
                exceptions.append(f"{type(failed).__name__}: {failed}")
                for c in batch:
                    dead.add(c.stream_id)
                    self._forget(c.stream_id)
                    pending[c.plan] = deque(x for x in pending[c.plan] if x.stream_id != c.stream_id)
                continue
            for c, out in zip(batch, outputs):
                audio_samples += c.valid
                if not c.is_last:  # the flush chunk's latency is the time to final, as for the engine
                    chunk_latency_ms.append((done - c.sent_s) * 1000.0)
                text = out.final_transcript or ""
                if text:
                    final_parts.setdefault(c.stream_id, []).append(text)
                if c.is_last:
                    final_latency_ms.append((done - c.sent_s) * 1000.0)
                    finals[c.plan][c.utterance] = "".join(final_parts.pop(c.stream_id, [])).strip()

        wall_s = clock()
        # Chunks still gathered or queued when the run stopped never reached NeMo.
        unprocessed_chunks += sum(len(q) for q in pending)
        # errors: utterances without a final (a failed step loses every utterance in its batch).
        missing = sum(f is None for per_plan in finals for f in per_plan)

        state_bytes = _state_bytes_per_slot(self.pipe)
        notes = [
            f"NeMo's CacheAwareRNNTPipeline.transcribe_step fed Frame chunks of {n} samples "
            f"({self.pipe.chunk_size_in_secs * 1000:g} ms; each utterance is one NeMo stream id, is_first/is_last; "
            "last chunk zero-padded with Frame.length); NeMo endpointer off, finals at is_last only",
            f"{steps} steps, batch mean {batch_sizes_total / steps if steps else 0:.2f} max {max_batch} "
            f"of {len(plans)} slots",
            "features per chunk by NeMo's BatchedCacheFeatureBufferer (mel of the chunk + 10 ms look-back, "
            "so the mel frames at chunk edges differ from whole-utterance mel; finals are not NeMo-offline-exact)",
            "chunk latency: every chunk but each utterance's is_last one (that is the time to final)",
            "memory_per_stream_mb: NeMo's per-stream state (encoder caches, feature and audio buffers, "
            "LSTM state), weights and transient activations excluded",
        ]
        if unprocessed_chunks:
            notes.append(f"{unprocessed_chunks} chunks not processed: the run hit its drain limit ({deadline:.1f} s)")
        if missing:
            notes.append(f"{missing} utterances without a final")
        if exceptions:
            notes.append(f"{len(exceptions)} failed steps, first: {exceptions[0]}")
        result = BenchResult(
            system="nemo CacheAwareRNNTPipeline",
            streams=len(plans),
            latency_ms=self.latency_ms,
            audio_seconds=audio_samples / SAMPLE_RATE,
            wall_seconds=wall_s,
            compute_seconds=compute_s,
            chunk_latency_ms=chunk_latency_ms,
            final_latency_ms=final_latency_ms,
            errors=missing,
            memory_per_stream_mb=(state_bytes / 2**20) if state_bytes is not None else None,
            notes="; ".join(notes),
        )
        return NemoRun(result=result, finals=finals)
