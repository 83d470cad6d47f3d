"""SileroVAD (explicit state) against the silero-vad package's own models, window by window on real
speech; batch invariance across slots, offsets and resets; state gather/scatter; loader errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

silero_vad = pytest.importorskip("silero_vad", reason="silero-vad (the reference) is not installed")

from monosemantic.errors import MissingDependencyError, ModelLoadError  # noqa: E402
from monosemantic.vad import silero  # noqa: E402
from monosemantic.vad.silero import CONTEXT, WINDOW, SileroVAD, VADState  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> SileroVAD:
    torch.set_num_threads(1)
    return SileroVAD.from_package()


def _windows(audio: np.ndarray) -> torch.Tensor:
    """[N, 512] full windows of a clip (the trailing partial window is dropped)."""
    n = len(audio) // WINDOW
    return torch.from_numpy(np.ascontiguousarray(audio[: n * WINDOW])).view(n, WINDOW)


@torch.no_grad()
def _ours_alone(model: SileroVAD, windows: torch.Tensor) -> np.ndarray:
    state, probs = VADState.zeros(1), []
    for w in windows:
        p, state = model(w[None], state)
        probs.append(p.item())
    return np.array(probs)


@torch.no_grad()
def _package(ref, windows: torch.Tensor) -> np.ndarray:
    ref.reset_states()
    return np.array([ref(w, silero.SAMPLE_RATE).item() for w in windows])


def test_matches_package_jit_model_window_by_window(model, audio_clips):
    ref = silero_vad.load_silero_vad()
    for name, audio in audio_clips.items():
        windows = _windows(audio)
        ours, theirs = _ours_alone(model, windows), _package(ref, windows)
        assert ours.shape == theirs.shape == (len(windows),)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL, err_msg=name)
        # Real speech: the comparison must cover both decisions, not a clip the model calls all-silence.
        assert (theirs > 0.5).any() and (theirs < 0.5).any(), name


def test_matches_package_onnx_model(model, audio_clips):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    ref = silero_vad.load_silero_vad(onnx=True)
    audio = audio_clips["jfk.wav"]
    windows = _windows(audio)
    np.testing.assert_allclose(_ours_alone(model, windows), _package(ref, windows), rtol=0, atol=TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_matches_package_model_despite_tf32_defaults(audio_clips, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default; the model must override it
    windows = _windows(audio_clips["jfk.wav"])
    model = SileroVAD.from_package("cuda")
    state, probs = VADState.zeros(1, "cuda"), []
    for w in windows.cuda():
        p, state = model(w[None], state)
        probs.append(p)
    ours = torch.cat(probs).cpu().numpy()
    np.testing.assert_allclose(ours, _package(silero_vad.load_silero_vad(), windows), rtol=0, atol=TOL)


@torch.no_grad()
def test_batch_invariance_offsets_and_slot_reuse(model, audio_clips):
    """Four slots run as one batch every tick: streams open at different ticks, idle slots carry zeros,
    and slot 1 is reused mid-way by a new stream (reset row). Every stream's probabilities equal those
    of the same stream run alone."""
    clips = list(audio_clips.values())
    n = 40  # windows per stream
    # (slot, first tick, clip): slot 1 hosts two streams in turn, the second one right after the first.
    streams = [(0, 0, clips[0]), (1, 3, clips[1]), (2, 9, clips[2]), (3, 1, clips[3]), (1, 3 + n, clips[4])]
    alone = [_ours_alone(model, _windows(audio)[:n]) for _, _, audio in streams]

    state = VADState.zeros(4)
    # A stale non-zero state in every slot, so a missing reset would show.
    state.h.fill_(0.3), state.c.fill_(-0.2), state.context.fill_(0.1)
    got: list[list[float]] = [[] for _ in streams]
    for tick in range(3 + 2 * n):
        windows = torch.zeros(4, WINDOW)
        reset = torch.zeros(4, dtype=torch.bool)
        active = []
        for k, (slot, first, audio) in enumerate(streams):
            i = tick - first
            if 0 <= i < n:
                windows[slot] = torch.from_numpy(audio[i * WINDOW : (i + 1) * WINDOW])
                reset[slot] |= i == 0
                active.append((k, slot))
        state.reset_(reset)
        probs, state = model(windows, state)
        assert probs.shape == (4,)
        for k, slot in active:
            got[k].append(probs[slot].item())
    for k in range(len(streams)):
        np.testing.assert_allclose(np.array(got[k]), alone[k], rtol=0, atol=TOL, err_msg=f"stream {k}")


@torch.no_grad()
def test_state_select_cat_assign_round_trip(model, audio_clips):
    clips = list(audio_clips.values())[:3]
    state = VADState.zeros(3)
    for i in range(5):  # a non-trivial state
        _, state = model(torch.stack([torch.from_numpy(c[i * WINDOW : (i + 1) * WINDOW]) for c in clips]), state)
    assert state.h.shape == state.c.shape == (3, 128) and state.context.shape == (3, CONTEXT)

    rows = VADState.cat([state.select([i]) for i in range(3)])
    for a, b in ((rows.h, state.h), (rows.c, state.c), (rows.context, state.context)):
        assert torch.equal(a, b)

    # Gather a permutation, scatter it back in the same order: the original comes back.
    perm = [2, 0, 1]
    scratch = VADState.zeros(3).assign_(perm, state.select(perm))
    assert torch.equal(scratch.h, state.h) and torch.equal(scratch.context, state.context)

    # Continuing a gathered sub-batch equals continuing the full batch, for those rows.
    nxt = torch.stack([torch.from_numpy(c[5 * WINDOW : 6 * WINDOW]) for c in clips])
    full, _ = model(nxt, state)
    part, _ = model(nxt[[2, 0]], state.select([2, 0]))
    torch.testing.assert_close(part, full[[2, 0]], rtol=0, atol=TOL)

    # reset_ zeroes exactly the masked rows.
    kept = state.clone().reset_(torch.tensor([False, True, False]))
    assert torch.count_nonzero(kept.h[1]) == 0 and torch.count_nonzero(kept.context[1]) == 0
    assert torch.equal(kept.h[[0, 2]], state.h[[0, 2]])


@torch.no_grad()
def test_forward_leaves_input_state_untouched_and_checks_shapes(model):
    state = VADState.zeros(2)
    state.h.fill_(0.5)
    before = state.clone()
    probs, new = model(torch.randn(2, WINDOW) * 0.1, state)
    assert torch.equal(state.h, before.h) and torch.equal(state.context, before.context)
    assert not torch.equal(new.h, state.h)
    assert ((probs >= 0) & (probs <= 1)).all()
    with pytest.raises(ValueError, match="512"):
        model(torch.zeros(2, 256), state)
    with pytest.raises(ValueError, match="2 streams"):
        model(torch.zeros(3, WINDOW), state)


def test_missing_package_model_file_names_silero_vad(monkeypatch, tmp_path):
    monkeypatch.setattr(silero, "package_file", lambda name: tmp_path / name)
    with pytest.raises(MissingDependencyError, match="silero-vad") as info:
        SileroVAD.from_package()
    assert str(tmp_path / "silero_vad.jit") in str(info.value)
    assert isinstance(info.value, ImportError)  # callers catching ImportError still see it


def test_loading_the_model_leaves_torch_threads_alone():
    """Importing the silero_vad package sets torch's thread count to 1 for the whole process; the model
    loads without importing it, so an engine with VAD leaves the application's setting as it was (in a
    fresh interpreter: this one imported the package above)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "torch.set_num_threads(3)\n"
        "from monosemantic.vad.silero import SileroVAD, VADState\n"
        "model = SileroVAD.from_package()\n"
        "model(torch.zeros(2, 512), VADState.zeros(2))\n"
        "print(torch.get_num_threads(), 'silero_vad' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "False"]


def test_foreign_or_incomplete_weights_are_load_errors(tmp_path):
    class NotSilero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x)

    class WrongInside(torch.nn.Module):  # shaped like the package's wrapper, another network inside
        def __init__(self):
            super().__init__()
            self._model = NotSilero()

        def forward(self, x):
            return self._model(x)

    foreign = tmp_path / "foreign.jit"
    torch.jit.script(NotSilero()).save(str(foreign))
    with pytest.raises(ModelLoadError, match="foreign.jit"):
        SileroVAD.from_package(path=foreign)
    wrong = tmp_path / "wrong.jit"
    torch.jit.script(WrongInside()).save(str(wrong))
    with pytest.raises(ModelLoadError, match=r"unexpected \['lin.bias', 'lin.weight'\]"):
        SileroVAD.from_package(path=wrong)


@torch.no_grad()
def test_forward_windows_equals_window_by_window(model, audio_clips):
    """Several windows per stream in one call (the engine's VAD call), different counts per row and per
    call, equal each stream run window by window; the state carries over between calls."""
    clips = list(audio_clips.values())[:4]
    n = 30
    alone = [_ours_alone(model, _windows(audio)[:n]) for audio in clips]
    plans = [[1, 5, 2, 8, 3, 11], [4, 4, 4, 4, 4, 10], [7, 1, 1, 12, 6, 3], [2, 9, 1, 1, 16, 1]]
    state = VADState.zeros(len(clips))
    got: list[list[float]] = [[] for _ in clips]
    done = [0] * len(clips)
    for call in range(6):
        counts = [plan[call] for plan in plans]
        width = max(counts)
        audio = torch.full((len(clips), width * WINDOW), 7.0)  # junk past each row's windows must not matter
        for k, clip in enumerate(clips):
            piece = clip[done[k] * WINDOW : (done[k] + counts[k]) * WINDOW]
            audio[k, : len(piece)] = torch.from_numpy(piece)
        probs, state = model.forward_windows(audio, counts, state)
        assert probs.shape == (len(clips), width)
        for k in range(len(clips)):
            got[k] += probs[k, : counts[k]].tolist()
            done[k] += counts[k]
    for k in range(len(clips)):
        assert len(got[k]) == n
        np.testing.assert_allclose(np.array(got[k]), alone[k], rtol=0, atol=TOL, err_msg=f"stream {k}")


def test_forward_windows_checks_shapes(model):
    state = VADState.zeros(2)
    with pytest.raises(ValueError, match="W \\* 512"):
        model.forward_windows(torch.zeros(2, 500), [1, 1], state)
    with pytest.raises(ValueError, match="counts"):
        model.forward_windows(torch.zeros(2, 2 * WINDOW), [1, 3], state)
    with pytest.raises(ValueError, match="counts"):
        model.forward_windows(torch.zeros(2, 2 * WINDOW), [0, 1], state)


def test_loading_the_weights_prints_no_torchscript_deprecation():
    """Every model load printed torch's 'torch.jit.load is deprecated' FutureWarning: the package's
    weights come from its TorchScript file, but nothing of TorchScript runs, and nothing is for a user to
    change."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SileroVAD.from_package()
