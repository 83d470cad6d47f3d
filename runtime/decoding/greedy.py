"""Batched greedy transducer decoding by label looping (NeMo's GreedyBatchedRNNTLoopLabelsComputer and
GreedyBatchedTDTLoopLabelsComputer, arXiv 2406.06220), with the decoder state carried across chunks.

The loop finds, for every stream at once, the next non-blank label (advancing time over blanks, or by the
predicted duration for TDT), then runs one batched prediction-network step for all streams that found a
label. Its rules follow NeMo's exactly, including the max_symbols cap and TDT's duration handling, so the
labels equal NeMo's. Decoding a chunk needs nothing from later chunks; what crosses a chunk boundary is
the prediction-network state and, for TDT, how far the last duration jumped past the chunk's end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.precision import exact_fp32
from ..models.transducer import Joint, PredictionNetwork


@dataclass
class DecoderState:
    """Per-stream transducer decoding state, batch-first so an engine can keep it slot-indexed."""

    h: torch.Tensor  # [layers, B, pred_hidden] LSTM hidden state
    c: torch.Tensor  # [layers, B, rnn_hidden] LSTM cell state
    pred_out: torch.Tensor  # [B, joint_hidden] projected prediction output for the last label (or SOS)
    time_jump: torch.Tensor  # [B] long: frames to skip at the next chunk's start (TDT overshoot)
    frame_offset: torch.Tensor  # [B] long: encoder frames decoded before the next chunk

    @staticmethod
    def cat(states: list["DecoderState"]) -> "DecoderState":
        """Join the streams of several states into one batch, in order."""
        return DecoderState(
            h=torch.cat([s.h for s in states], dim=1),
            c=torch.cat([s.c for s in states], dim=1),
            pred_out=torch.cat([s.pred_out for s in states]),
            time_jump=torch.cat([s.time_jump for s in states]),
            frame_offset=torch.cat([s.frame_offset for s in states]),
        )

    def write_rows(self, rows: torch.Tensor, src: "DecoderState") -> None:
        """Store `src` (one row per entry of `rows`) into these rows, in place."""
        self.h.index_copy_(1, rows, src.h)
        self.c.index_copy_(1, rows, src.c)
        for dst, new in ((self.pred_out, src.pred_out), (self.time_jump, src.time_jump), (self.frame_offset, src.frame_offset)):
            dst.index_copy_(0, rows, new)

    def select(self, rows: torch.Tensor | slice) -> "DecoderState":
        """The state of a subset of the streams."""
        return DecoderState(
            h=self.h[:, rows],
            c=self.c[:, rows],
            pred_out=self.pred_out[rows],
            time_jump=self.time_jump[rows],
            frame_offset=self.frame_offset[rows],
        )


def initial_state(prediction: PredictionNetwork, joint: Joint, batch: int, device=None) -> DecoderState:
    """State after the start-of-sequence step: one LSTM step on the blank (zero) embedding from zeros."""
    blank = torch.full((batch,), prediction.cfg.vocab_size, dtype=torch.long, device=device)
    with exact_fp32(torch.float32):
        out, (h, c) = prediction.step(blank, prediction.zero_state(batch, device))
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    return DecoderState(h=h, c=c, pred_out=joint.project_prediction(out), time_jump=zeros, frame_offset=zeros.clone())


@dataclass
class DecodedChunk:
    """Labels found in one chunk, per stream, with absolute encoder-frame times."""

    labels: list[list[int]]
    frames: list[list[int]]  # frame at which each label was emitted
    durations: list[list[int]]  # TDT: predicted duration in frames; RNN-T: 1


class _Store:
    """Growable [B, N] result buffers, read back once at the end of the chunk."""

    def __init__(self, batch: int, capacity: int, device, bounded: bool):
        """bounded: `capacity` is known to hold every label of the chunk, so `add` never checks (the
        check reads the counts back from the device: a sync per decoding step)."""
        self.bounded = bounded
        self.found = torch.zeros(batch, capacity, 3, dtype=torch.long, device=device)  # label, frame, duration
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)

    def add(self, mask: torch.Tensor, labels, frames, durations):
        if not self.bounded and int(self.count.max()) + 1 >= self.found.shape[1]:
            self.found = torch.cat((self.found, torch.zeros_like(self.found)), dim=1)
        # Every row writes at its count, and only the rows in `mask` count it: another row's write is
        # overwritten by its next label, or lies past its count. Three kernels, where a masked write of
        # each buffer took ten.
        self.found[self.rows, self.count] = torch.stack((labels, frames, durations), dim=1)
        self.count += mask

    def to_lists(self, offsets: torch.Tensor) -> DecodedChunk:
        count = self.count.tolist()
        found = self.found.cpu().numpy()  # [B, N, 3], one copy from the device
        frames = found[:, :, 1] + offsets.cpu().numpy()[:, None]
        return DecodedChunk(
            labels=[row[:n] for row, n in zip(found[:, :, 0].tolist(), count)],
            frames=[row[:n] for row, n in zip(frames.tolist(), count)],
            durations=[row[:n] for row, n in zip(found[:, :, 2].tolist(), count)],
        )


@torch.no_grad()
def greedy_decode(
    prediction: PredictionNetwork,
    joint: Joint,
    encoded: torch.Tensor,
    lengths: torch.Tensor,
    state: DecoderState,
    durations: tuple[int, ...] = (),
    max_symbols: int | None = 10,
) -> tuple[DecodedChunk, DecoderState]:
    """Decode one chunk of encoder output for a batch of streams.

    encoded: [B, T, d] encoder frames; lengths: [B] valid frames per stream; state: carried from the
    previous chunk (or `initial_state`). Returns the labels found and the state for the next chunk.
    """
    with exact_fp32(torch.float32):
        compact = encoded.device.type == "cpu"
        return _decode(prediction, joint, encoded, lengths, state, durations, max_symbols, compact)


def _decode(prediction, joint, encoded, lengths, state, durations, max_symbols, compact):
    """compact: the host loop (`_decode_on_host`), which runs the joint and the prediction network on
    the rows that need them only; otherwise every row runs and the others are masked out (on a GPU,
    masking costs no sync and launches the same kernels whatever the rows). The same labels either way."""
    if compact:
        return _decode_on_host(prediction, joint, encoded, lengths, state, durations, max_symbols)
    return _decode_masked(prediction, joint, encoded, lengths, state, durations, max_symbols)


def _decode_on_host(prediction, joint, encoded, lengths, state, durations, max_symbols):
    """The label loop with its control on the host: which rows are active, their times and the
    max_symbols counters are numpy arrays, the found labels Python lists, and torch runs only the joint
    and the prediction network, each on the rows that need it.

    On a CPU a torch call on a tensor of a few dozen elements costs microseconds of dispatch, numpy's
    a fraction of that, and the masked loop spent most of its time on such calls (about a hundred per
    label, and a step of many streams runs a label loop as long as its busiest row's); a loaded engine
    also hands the GIL over at each of them. The rules are `_decode_masked`'s, row by row."""
    batch, _, _ = encoded.shape
    device = encoded.device
    blank = prediction.cfg.vocab_size
    tdt = len(durations) > 0
    num_dur = len(durations)
    dur_values = np.array(durations if tdt else [1], dtype=np.int64)

    enc_proj = joint.project_encoder(encoded)  # [B, T, joint_hidden]
    lengths = lengths.to(device="cpu", dtype=torch.long).numpy()  # [B]
    time = state.time_jump.to("cpu").numpy().copy()  # [B]
    h, c, pred_out = state.h, state.c, state.pred_out
    out_labels: list[list[int]] = [[] for _ in range(batch)]
    out_frames: list[list[int]] = [[] for _ in range(batch)]
    out_durations: list[list[int]] = [[] for _ in range(batch)]
    last_nb_time = np.full(batch, -1, dtype=np.int64)
    last_nb_count = np.zeros(batch, dtype=np.int64)

    def joint_at(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label, duration) [len(rows)] each, of those rows at their current times."""
        index = torch.from_numpy(rows).to(device)
        frame = torch.from_numpy(time[rows]).to(device)
        logits = joint(enc_proj[index, frame], pred_out[index])  # [R, V+1(+D)]
        if not tdt:
            return logits.argmax(dim=-1).cpu().numpy(), np.ones(len(rows), dtype=np.int64)
        label = logits[:, :-num_dur].argmax(dim=-1).cpu().numpy()
        dur = dur_values[logits[:, -num_dur:].argmax(dim=-1).cpu().numpy()]
        # A blank must move time forward, even when its predicted duration is 0.
        dur[(label == blank) & (dur == 0)] = 1
        return label, dur

    active = np.flatnonzero(time < lengths)  # rows still inside the chunk
    while len(active):
        labels, dur = joint_at(active)  # [A] each
        label_time = time[active]
        is_blank = labels == blank
        time[active] += dur if tdt else is_blank
        # Rows that passed a blank and are still inside the chunk look again at their new frame.
        advance = np.flatnonzero((time[active] < lengths[active]) & is_blank)  # positions in `active`
        while len(advance):
            rows = active[advance]
            label_time[advance] = time[rows]
            labels[advance], dur[advance] = joint_at(rows)
            is_blank[advance] = labels[advance] == blank
            # TDT moves by the new label's duration, blank or not; RNN-T only past a blank.
            time[rows] += dur[advance] if tdt else is_blank[advance]
            advance = advance[(time[rows] < lengths[rows]) & is_blank[advance]]
        # RNN-T: a row still inside the chunk holds a non-blank label. TDT: the label's duration may
        # have carried the row past its end, and it still counts.
        took = ~is_blank if tdt else time[active] < lengths[active]  # over `active`
        found = active[took]  # [F]
        found_labels, found_times = labels[took], label_time[took]
        for row, label, frame, d in zip(found.tolist(), found_labels.tolist(), found_times.tolist(), dur[took].tolist()):
            out_labels[row].append(label)
            out_frames[row].append(frame)
            out_durations[row].append(d)
        same_frame = last_nb_time[found] == found_times
        last_nb_count[found] = np.where(same_frame, last_nb_count[found] + 1, 1)
        last_nb_time[found] = found_times

        if len(found):
            # Only the rows that found a label step the LSTM: in a step of many streams most rows are
            # done after a label or two while the loop runs on for the busiest, and on a CPU the LSTM's
            # matrix products over every row were most of the decoding time.
            index = torch.from_numpy(found).to(device)
            out, (h_new, c_new) = prediction.step(torch.from_numpy(found_labels).to(device), (h[:, index], c[:, index]))
            h = h.index_copy(1, index, h_new)
            c = c.index_copy(1, index, c_new)
            pred_out = pred_out.index_copy(0, index, joint.project_prediction(out))
            if max_symbols is not None:
                # A row that emitted max_symbols labels at the frame it is on moves past that frame.
                force = found[(last_nb_count[found] >= max_symbols) & (last_nb_time[found] == time[found])]
                time[force] += 1
        active = active[time[active] < lengths[active]]

    offsets = state.frame_offset.to("cpu").tolist()
    decoded = DecodedChunk(
        labels=out_labels,
        frames=[[f + offset for f in row] for row, offset in zip(out_frames, offsets)],
        durations=out_durations,
    )
    # Only TDT can jump past a chunk's end; an RNN-T stream always stops exactly at it.
    jump = time - lengths if tdt else np.zeros_like(time)
    lengths_t = torch.from_numpy(lengths).to(state.frame_offset.device)
    new_state = DecoderState(
        h=h,
        c=c,
        pred_out=pred_out,
        time_jump=torch.from_numpy(jump).to(state.time_jump.device),
        frame_offset=state.frame_offset + lengths_t,
    )
    return decoded, new_state


def _decode_masked(prediction, joint, encoded, lengths, state, durations, max_symbols):
    batch, max_time, _ = encoded.shape
    device = encoded.device
    blank = prediction.cfg.vocab_size
    tdt = len(durations) > 0
    num_dur = len(durations)
    dur_values = torch.tensor(durations if tdt else [1], dtype=torch.long, device=device)

    enc_proj = joint.project_encoder(encoded)  # [B, T, joint_hidden]
    rows = torch.arange(batch, device=device)
    lengths = lengths.to(device=device, dtype=torch.long)
    last_t = torch.clamp(lengths - 1, min=0)
    time = state.time_jump.clone()
    h, c, pred_out = state.h, state.c, state.pred_out
    # With max_symbols, a frame emits at most that many labels, so T * max_symbols bounds the chunk's.
    store = _Store(batch, max(1, max_time * (max_symbols or 2)) + 1, device, bounded=max_symbols is not None)
    last_nb_time = torch.full((batch,), -1, dtype=torch.long, device=device)
    last_nb_count = torch.zeros(batch, dtype=torch.long, device=device)

    def joint_at(t: torch.Tensor):
        logits = joint(enc_proj[rows, torch.minimum(t, last_t)], pred_out)  # [B, V+1(+D)]
        if not tdt:
            return logits.argmax(dim=-1), dur_values.expand(batch)
        label = logits[:, :-num_dur].argmax(dim=-1)
        dur = dur_values[logits[:, -num_dur:].argmax(dim=-1)]
        # A blank must move time forward, even when its predicted duration is 0.
        dur = torch.where((label == blank) & (dur == 0), torch.ones_like(dur), dur)
        return label, dur

    active = time < lengths
    while bool(active.any()):
        active_before = active.clone()
        labels, dur = joint_at(time)
        label_time = time.clone()
        is_blank = labels == blank
        time = time + (dur if tdt else is_blank.long()) * active
        active = time < lengths
        advance = active & is_blank
        while bool(advance.any()):
            label_time = torch.where(advance, time, label_time)
            more_labels, more_dur = joint_at(time)
            labels = torch.where(advance, more_labels, labels)
            dur = torch.where(advance, more_dur, dur)
            is_blank = labels == blank
            # TDT moves by the new label's duration, blank or not; RNN-T only past a blank.
            time = time + (dur if tdt else is_blank.long()) * advance
            active = time < lengths
            advance = active & is_blank
        # RNN-T: an active stream here holds a non-blank label. TDT: the label's duration may have
        # carried the stream past its end, and it still counts.
        found = (active_before & ~is_blank) if tdt else active
        store.add(found, labels, label_time, dur)
        same_frame = found & (last_nb_time == label_time)
        last_nb_count = torch.where(same_frame, last_nb_count + 1, torch.where(found, 1, last_nb_count))
        last_nb_time = torch.where(found, label_time, last_nb_time)

        out, (h_new, c_new) = prediction.step(labels, (h, c))
        keep = found[None, :, None]
        h = torch.where(keep, h_new, h)
        c = torch.where(keep, c_new, c)
        pred_out = torch.where(found[:, None], joint.project_prediction(out), pred_out)

        if max_symbols is not None:
            force = active & ~is_blank & (last_nb_count >= max_symbols) & (last_nb_time == time)
            time = time + force.long()
            active = time < lengths

    decoded = store.to_lists(state.frame_offset)
    # Only TDT can jump past a chunk's end; an RNN-T stream always stops exactly at it.
    time_jump = time - lengths if tdt else torch.zeros_like(time)
    new_state = DecoderState(
        h=h, c=c, pred_out=pred_out, time_jump=time_jump, frame_offset=state.frame_offset + lengths
    )
    return decoded, new_state
