"""Greedy label-looping decoding: equal to NeMo's on arbitrary encoder outputs (RNN-T and TDT, ragged
batches), and chunked decoding with carried state equals decoding the whole sequence."""

from __future__ import annotations

import pytest
import torch

from monosemantic.decoding import greedy
from monosemantic.decoding.greedy import DecoderState, greedy_decode, initial_state


def encoder_outputs(model, audio_clips):
    """Real encoder outputs of all clips as one ragged batch: ([B, T, d], [B])."""
    clips = list(audio_clips.values())
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.zeros(len(clips), int(lengths.max()))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = torch.from_numpy(c)
    with torch.no_grad():
        feats, n = model.module.frontend(batch, lengths)
        return model.module.encoder(feats, n)


def decode(model, encoded, lengths, state=None):
    module = model.module
    state = state or initial_state(module.decoder, module.joint, encoded.shape[0])
    return greedy_decode(module.decoder, module.joint, encoded, lengths, state, *model.decoding_args)


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt", "parakeet_tdt", "parakeet_rnnt"])
def test_labels_and_frames_equal_nemo_decoding(ms_model, nemo_model, audio_clips, variant):
    model, reference = ms_model(variant), nemo_model(variant)
    encoded, lengths = encoder_outputs(model, audio_clips)
    # Perturb so the decoder sees inputs NeMo's transcribe never produced for these clips.
    encoded = encoded + 0.3 * torch.randn(encoded.shape, generator=torch.Generator().manual_seed(3))
    ours, _ = decode(model, encoded, lengths)
    with torch.no_grad():
        hyps = reference.decoding.rnnt_decoder_predictions_tensor(
            encoder_output=encoded.transpose(1, 2), encoded_lengths=lengths, return_hypotheses=True
        )
    for row, hyp in enumerate(hyps):
        assert ours.labels[row] == [int(t) for t in hyp.y_sequence]
        assert ours.frames[row] == [int(t) for t in hyp.timestamp]
    assert sum(map(len, ours.labels)) > 50


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt", "parakeet_tdt"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 16])
def test_chunked_decoding_with_carried_state_equals_whole(ms_model, audio_clips, variant, chunk):
    model = ms_model(variant)
    encoded, lengths = encoder_outputs(model, audio_clips)
    whole, _ = decode(model, encoded, lengths)
    module = model.module
    state = initial_state(module.decoder, module.joint, encoded.shape[0])
    labels = [[] for _ in range(encoded.shape[0])]
    frames = [[] for _ in range(encoded.shape[0])]
    durations = [[] for _ in range(encoded.shape[0])]
    for start in range(0, encoded.shape[1], chunk):
        part = encoded[:, start : start + chunk]
        part_len = torch.clamp(lengths - start, min=0, max=part.shape[1])
        out, state = decode(model, part, part_len, state)
        for row in range(encoded.shape[0]):
            labels[row] += out.labels[row]
            frames[row] += out.frames[row]
            durations[row] += out.durations[row]
    assert labels == whole.labels and frames == whole.frames and durations == whole.durations
    if model.config.is_tdt and chunk == 1:
        assert int(state.time_jump.max()) >= 0


def test_max_symbols_caps_emissions_per_frame(ms_model):
    """A joint biased so a token always beats blank emits exactly max_symbols tokens per frame."""
    model = ms_model("nemotron_rnnt")
    module = model.module
    max_symbols = model.config.decoding.max_symbols
    bias = module.joint.joint_net[-1].bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias[5] += 1e4
        encoded = torch.randn(2, 4, model.config.encoder.d_model)
        out, _ = decode(model, encoded, torch.tensor([4, 2]))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert out.labels[0] == [5] * (4 * max_symbols) and out.labels[1] == [5] * (2 * max_symbols)
    assert out.frames[0] == sorted(out.frames[0]) and out.frames[0].count(3) == max_symbols


def test_state_select_and_cat_round_trip(ms_model):
    model = ms_model("nemotron_tdt")
    module = model.module
    state = initial_state(module.decoder, module.joint, 3)
    state.time_jump = torch.tensor([0, 2, 1])
    joined = DecoderState.cat([state.select(slice(0, 2)), state.select(slice(2, 3))])
    for name in ("h", "c", "pred_out", "time_jump", "frame_offset"):
        assert torch.equal(getattr(joined, name), getattr(state, name))


def decode_both_ways(module, part, lengths, states, durations, max_symbols):
    """One chunk through the host loop and the masked loop, each from its own carried state (`states`
    keyed by compact, updated): the same labels, frames and durations, and the same state up to float
    rounding (a matrix product over fewer rows may round differently). Returns the chunk's labels."""
    out = {}
    for compact in (True, False):
        out[compact], states[compact] = greedy._decode(
            module.decoder, module.joint, part, lengths, states[compact], durations, max_symbols, compact
        )
    assert out[True] == out[False]
    for a, b in zip(vars(states[True]).values(), vars(states[False]).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return out[True]


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
def test_stepping_only_the_rows_that_found_a_label_equals_masking_the_others(ms_model, audio_clips, variant):
    """The CPU path (`_decode_on_host`) keeps the loop's control in numpy and runs the joint and the
    prediction network on the rows that need them only; the GPU path steps every row and masks. Same
    labels, frames and durations chunk after chunk, and the same carried state up to float rounding (a
    matrix product over fewer rows may round differently)."""
    model = ms_model(variant)
    module = model.module
    encoded, lengths = encoder_outputs(model, audio_clips)
    encoded = encoded + 0.3 * torch.randn(encoded.shape, generator=torch.Generator().manual_seed(5))
    states = {mode: initial_state(module.decoder, module.joint, encoded.shape[0]) for mode in (True, False)}
    emitted = 0
    for start in range(0, encoded.shape[1], 2):  # 2 frames: a 160 ms chunk
        part = encoded[:, start : start + 2]
        part_len = torch.clamp(lengths - start, min=0, max=part.shape[1])
        decoded = decode_both_ways(module, part, part_len, states, *model.decoding_args)
        emitted += sum(map(len, decoded.labels))
    assert emitted > 50


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
@pytest.mark.parametrize("max_symbols", [1, 3, None])
def test_host_loop_equals_masked_loop_on_edge_cases(ms_model, variant, max_symbols):
    """The host loop against the masked one where their bookkeeping differs most: rows of zero length
    and rows ending at different frames, chunks of 1 to 4 frames, TDT jumps carried past a chunk's end,
    a joint biased towards tokens (the max_symbols cap binds) and towards blank in turn."""
    model = ms_model(variant)
    module = model.module
    durations = model.decoding_args[0]
    gen = torch.Generator().manual_seed(11)
    d = model.config.encoder.d_model
    bias = module.joint.joint_net[-1].bias
    saved = bias.detach().clone()
    emitted = 0
    try:
        # Plain, tokens favoured, blank favoured. Without max_symbols an RNN-T joint that never picks
        # blank would never move past a frame (in NeMo too), so that case runs capped only.
        shifts = (0.0, -3.0) if max_symbols is None else (0.0, 3.0, -3.0)
        for shift in shifts:
            with torch.no_grad():
                bias.copy_(saved)
                bias[: module.joint.cfg.num_classes] += shift
            states = {mode: initial_state(module.decoder, module.joint, 6) for mode in (True, False)}
            for chunk in (1, 4, 2, 3, 1, 4):
                part = torch.randn(6, chunk, d, generator=gen)
                lengths = torch.randint(0, chunk + 1, (6,), generator=gen)
                lengths[0] = 0  # a row with nothing in this chunk
                decoded = decode_both_ways(module, part, lengths, states, durations, max_symbols)
                emitted += sum(map(len, decoded.labels))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert emitted > 10


# Chunked greedy decoding with carried state against NeMo's own label-looping computer fed the same chunks
# with its `prev_batched_state`: labels, absolute frames and, for TDT, the overshoot carried into the next
# chunk (`time_jumps`), on ragged batches with rows of zero valid frames and joints biased towards tokens,
# towards blank, and towards long durations.
@pytest.mark.parametrize("variant", ["nemotron_tdt", "nemotron_rnnt"])
@pytest.mark.parametrize("compact", [True, False])
def test_chunked_decoding_equals_nemo_with_carried_state(ms_model, nemo_model, variant, compact):
    model, reference = ms_model(variant), nemo_model(variant)
    module = model.module
    computer = reference.decoding.decoding.decoding_computer
    durations, max_symbols = model.decoding_args
    assert computer.max_symbols == max_symbols
    d = model.config.encoder.d_model
    gen = torch.Generator().manual_seed(21)
    ours_bias, ref_bias = module.joint.joint_net[-1].bias, reference.joint.joint_net[-1].bias
    saved_ours, saved_ref = ours_bias.detach().clone(), ref_bias.detach().clone()
    emitted = jumps = 0
    try:
        for trial in range(16):
            shift = (0.0, 2.0, -2.0, 4.0)[trial % 4]
            duration_shift = 3 * torch.randn(len(durations), generator=gen) if durations else None
            with torch.no_grad():
                for bias, saved in ((ours_bias, saved_ours), (ref_bias, saved_ref)):
                    bias.copy_(saved)
                    bias[: module.joint.cfg.num_classes] += shift
                    if durations:
                        bias[-len(durations) :] += duration_shift
            batch, time = 5, int(torch.randint(1, 12, (1,), generator=gen))
            encoded = torch.randn(batch, time, d, generator=gen)  # [B, T, d]
            lengths = torch.randint(0, time + 1, (batch,), generator=gen)  # [B]
            chunk = int(torch.randint(1, 5, (1,), generator=gen))
            state, ref_state = initial_state(module.decoder, module.joint, batch), None
            for start in range(0, time, chunk):
                part = encoded[:, start : start + chunk]
                part_len = torch.clamp(lengths - start, min=0, max=part.shape[1])
                ours, state = greedy._decode(
                    module.decoder, module.joint, part, part_len, state, durations, max_symbols, compact
                )
                with torch.no_grad():
                    hyps, ref_state = computer(part, part_len, ref_state)
                for row in range(batch):
                    n = int(hyps.current_lengths[row])
                    assert ours.labels[row] == hyps.transcript[row, :n].tolist()
                    assert ours.frames[row] == hyps.timestamps[row, :n].tolist()
                    emitted += n
                assert torch.equal(state.frame_offset, ref_state.decoded_lengths)
                if durations:
                    assert torch.equal(state.time_jump, ref_state.time_jumps)
                    jumps += int((state.time_jump > 0).sum())
    finally:
        with torch.no_grad():
            ours_bias.copy_(saved_ours)
            ref_bias.copy_(saved_ref)
    assert emitted > 50
    assert jumps > 0 or not durations  # some durations did jump past a chunk's end
