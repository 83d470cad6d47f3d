"""The user-facing API of a loaded model: inputs, latency modes, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

import monosemantic


def test_single_and_list_inputs(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    a, b = audio_clips["jfk.wav"], audio_clips["61-70968-0000.flac"]
    both = model.transcribe([a, b])
    assert [t.token_ids for t in both] == [model.transcribe(a).token_ids, model.transcribe(b).token_ids]
    assert isinstance(model.transcribe(a), monosemantic.Transcript)


def test_int16_input_and_empty_and_tiny_audio(ms_model, audio_clips):
    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    pcm = np.round(audio * 32767).astype(np.int16)
    assert len(model.transcribe(pcm).tokens) > 0
    assert model.transcribe(np.zeros(0, dtype=np.float32)).text == ""
    assert model.transcribe(np.zeros(100, dtype=np.float32)).tokens == []


def test_other_sample_rates_are_resampled(ms_model, audio_clips):
    from monosemantic.audio import resample

    model = ms_model("nemotron_rnnt")
    audio8 = resample(audio_clips["jfk.wav"], 16000, 8000)
    result = model.transcribe(audio8, sample_rate=8000)
    assert result.sample_rate == 16000 and len(result.tokens) > 0
    with pytest.raises(monosemantic.AudioError, match="sample rate"):
        model.transcribe(audio8, sample_rate=12.5)


def test_latency_modes(ms_model):
    nemotron = ms_model("nemotron_rnnt")
    assert nemotron.latency_modes == [1120, 560, 160, 80] and nemotron.default_latency_ms == 1120
    assert nemotron.context_for(160) == (70, 1) and nemotron.context_for(None) == (70, 13)
    with pytest.raises(ValueError, match="choose one of: 1120, 560, 160, 80"):
        nemotron.context_for(200)
    parakeet = ms_model("parakeet_tdt")
    assert parakeet.latency_modes == [] and not parakeet.cache_aware
    with pytest.raises(ValueError, match="full-context"):
        parakeet.transcribe(np.zeros(1600, dtype=np.float32), latency_ms=160)
    with pytest.raises(ValueError, match="positive integer"):
        parakeet.new_stream(latency_ms=0)
    assert "RNN-T" in repr(nemotron) and "TDT" in repr(parakeet)


def test_two_contexts_with_one_latency_keep_the_default_and_warn(nemo_checkpoint_dir, tmp_path):
    """Modes are chosen by latency, which is the right context alone: (70, 6) and (35, 6) are both 560 ms.
    The later context silently replaced the default one under that latency, so default_latency_ms led to
    (35, 6) while latency_ms=None used (70, 6), and (70, 6) could not be chosen by latency at all. The first
    (the checkpoint's default comes first) is kept and the load warns that the other cannot be chosen."""
    from dataclasses import replace

    from _support.nemo_checkpoints import VARIANTS, build_model, get_tokenizer_dir, quiet_nemo

    variant = replace(VARIANTS["nemotron_rnnt"], name="same_latency", att_context_size=((70, 6), (35, 6), (70, 1)))
    path = tmp_path / "same_latency.nemo"
    with quiet_nemo():
        build_model(variant, get_tokenizer_dir(nemo_checkpoint_dir)).save_to(str(path))
    with pytest.warns(UserWarning, match=r"\[35, 6\] .*same 560 ms latency as \[70, 6\]"):
        model = monosemantic.load_model(path, device="cpu")
    assert model.latency_modes == [560, 160] and model.default_latency_ms == 560
    assert model.context_for(560) == model.context_for(None) == (70, 6)


def test_full_context_stream_partials_and_final(ms_model, audio_clips):
    model = ms_model("parakeet_tdt")
    audio = audio_clips["jfk.wav"]
    stream = model.new_stream(latency_ms=500)
    updates = 0
    for start in range(0, len(audio), 320):
        updates += stream.feed(audio[start : start + 320]) > 0
    assert updates > 2
    assert stream.finalize().token_ids == model.transcribe(audio).token_ids
    assert stream.transcript().text == ""  # reset for the next utterance


@pytest.mark.parametrize("variant", ["nemotron_rnnt", "nemotron_tdt"])
def test_long_audio_takes_the_chunked_path_with_the_same_tokens(ms_model, audio_clips, variant, monkeypatch):
    """Clips above CHUNKED_ABOVE_FRAMES are encoded chunk by chunk (bounded memory): same tokens."""
    import monosemantic.asr as asr

    model = ms_model(variant)
    clips = list(audio_clips.values())
    for latency in (1120, 80):
        expected = [t.token_ids for t in model.transcribe(clips, latency_ms=latency)]
        monkeypatch.setattr(asr, "CHUNKED_ABOVE_FRAMES", 10)
        calls = []
        original = asr.decode_chunked
        monkeypatch.setattr(asr, "decode_chunked", lambda *a, **k: calls.append(1) or original(*a, **k))
        got = [t.token_ids for t in model.transcribe(clips + [np.zeros(0, dtype=np.float32)], latency_ms=latency)]
        monkeypatch.undo()
        assert calls and got == expected + [[]]


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, None, True])
def test_a_batch_size_that_is_not_a_positive_integer_is_named(ms_model, batch_size):
    """0 and -1 used to reach torch.stft as an empty batch (an MKL error), 2.0 and None a TypeError."""
    with pytest.raises(ValueError, match="batch_size"):
        ms_model("nemotron_rnnt").transcribe([np.zeros(1600, dtype=np.float32)], batch_size=batch_size)


@pytest.mark.parametrize("audio", [[0.0] * 1600, (0.0, 0.1), [np.zeros(1600, dtype=np.float32), np.float32(0.5)]])
def test_a_list_of_numbers_is_told_it_is_read_as_a_batch_of_clips(ms_model, audio):
    """A list is a batch of clips; a list of samples used to fail on its first 'clip' as a 0-D array."""
    with pytest.raises(monosemantic.AudioError, match="batch of clips: pass one clip as a 1-D numpy array"):
        ms_model("nemotron_rnnt").transcribe(audio)


def test_reversed_float32_audio_is_transcribed_not_a_torch_stride_error(ms_model, audio_clips):
    """A float32 array with a negative stride (`audio[::-1]`, `np.flip`) came through as_float32 as the
    same view, and `torch.from_numpy` refused it with a ValueError about negative strides, offline and
    in a stream's feed."""
    model = ms_model("nemotron_rnnt")
    backwards = audio_clips["jfk.wav"][::-1]
    expected = model.transcribe(backwards.copy()).token_ids
    assert model.transcribe(backwards).token_ids == expected
    assert [t.token_ids for t in model.transcribe([backwards])] == [expected]
    stream = model.new_stream(latency_ms=160)
    stream.feed(backwards)
    assert stream.finalize().token_ids == model.transcribe(backwards.copy(), latency_ms=160).token_ids


def test_read_only_float32_audio_is_transcribed_without_a_warning(ms_model, audio_clips):
    """float32 samples read from bytes (`np.frombuffer`) are a read-only array, on which
    `torch.from_numpy` warned 'The given NumPy array is not writable' at every call, offline and in a
    stream's feed."""
    import warnings

    model = ms_model("nemotron_rnnt")
    audio = audio_clips["jfk.wav"]
    frozen = np.frombuffer(audio.astype(np.float32).tobytes(), dtype=np.float32)
    assert not frozen.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.transcribe(frozen).token_ids == model.transcribe(audio).token_ids
        stream = model.new_stream(latency_ms=160)
        stream.feed(frozen)
        assert stream.finalize().token_ids == model.transcribe(audio, latency_ms=160).token_ids


def test_no_cuda_error_names_the_api_argument_and_the_cli_flag(monkeypatch):
    """The refusal said only `use device='cpu'`, which a CLI user (`monosemantic transcribe/serve
    --device cuda`) cannot type: it names both spellings now."""
    import torch

    from monosemantic.asr import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available") as info:
        resolve_device("cuda")
    assert "device='cpu'" in str(info.value) and "--device cpu" in str(info.value)


@pytest.mark.parametrize("device", ["cuda:1", "cuda:7", 3])
def test_a_cuda_index_past_the_last_gpu_is_named(monkeypatch, device):
    """cuda:N with N past the machine's GPUs passed the check and failed later, in the model's move to
    the device, as torch's 'CUDA error: invalid device ordinal' RuntimeError."""
    import torch

    from monosemantic.asr import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"this machine has 1 CUDA device \(cuda:0\)"):
        resolve_device(device)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("dtype", [["float32"], {"dtype": "fp16"}, "torch.int8", 16])
def test_every_bad_dtype_is_refused_with_the_choices(dtype):
    """An unhashable dtype (a list) escaped as TypeError 'unhashable type', and a torch dtype we do not
    run (torch.int8) was refused without the choices."""
    import torch

    from monosemantic.asr import resolve_dtype

    dtype = torch.int8 if dtype == "torch.int8" else dtype
    with pytest.raises(ValueError, match="dtype .*: use 'auto', 'float32', 'bfloat16' or 'float16'"):
        resolve_dtype(dtype)


def test_a_full_context_stream_takes_a_numpy_integer_interval(ms_model, audio_clips):
    """A cache-aware model takes latency_ms=np.int64(160) (any integral number); a full-context model's
    new_stream refused np.int64(500) as 'latency_ms must be a positive integer ..., got np.int64(500)'."""
    model = ms_model("parakeet_tdt")
    audio = audio_clips["jfk.wav"][:32000]
    stream = model.new_stream(latency_ms=np.int64(500))
    assert stream.feed(audio) >= 0 and stream.finalize().token_ids == model.transcribe(audio).token_ids
    for bad in (np.int64(0), np.float64(500.0), 500.0):
        with pytest.raises(ValueError, match="positive integer"):
            model.new_stream(latency_ms=bad)


def test_a_file_name_passed_to_transcribe_is_told_to_be_read_first(ms_model):
    model = ms_model("nemotron_rnnt")
    with pytest.raises(monosemantic.AudioError, match=r"audio\[0\] is a file name, not samples"):
        model.transcribe(["tests/data/jfk.wav"])
    with pytest.raises(monosemantic.AudioError, match="audio is a file name, not samples"):
        model.new_stream(latency_ms=160).feed("tests/data/jfk.wav")


def test_a_cpu_index_is_refused():
    """'cpu:1' was accepted as the CPU: the runtime has one CPU device, and an index there is a typo
    for a GPU or a misunderstanding."""
    from monosemantic.asr import resolve_device

    with pytest.raises(ValueError, match="invalid device 'cpu:1'"):
        resolve_device("cpu:1")
    assert str(resolve_device("cpu")) == "cpu"


@pytest.mark.parametrize("shape", [(2, 16000), (16000, 2)])
def test_a_2d_array_is_told_it_may_be_a_batch_as_a_list(ms_model, shape):
    """model.transcribe(np.stack(clips)) (a batch as a 2-D array, as a padded batch tensor is) was told
    only to downmix 'several channels' with audio.mean, which would average the clips into one: a batch
    is a list of 1-D arrays."""
    with pytest.raises(monosemantic.AudioError, match=r"list of 1-D arrays") as info:
        ms_model("nemotron_rnnt").transcribe(np.zeros(shape, dtype=np.float32))
    assert "mean(axis=" in str(info.value)  # still the advice for a stereo array
