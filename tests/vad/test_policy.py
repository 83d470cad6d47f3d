"""VADPolicy: the hysteresis on synthetic probabilities, equality with Silero's offline state machine, and
SileroVAD + VADPolicy online on real speech against `silero_vad.get_speech_timestamps`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from monosemantic.errors import StreamError
from monosemantic.vad.policy import WINDOW, VADConfig, VADPolicy, VADTransition

S, E = "start", "end"
PAD = 480  # 30 ms
SPEECH, SILENCE, MAYBE = 0.9, 0.05, 0.4  # MAYBE lies between neg_threshold (0.35) and threshold (0.5)


def run(probs, config=None, step=1):
    """Feed `probs` `step` at a time; return [(kind, sample, position when reported)]."""
    policy = VADPolicy(config)
    out = []
    for i in range(0, len(probs), step):
        out += [(t.kind, t.sample, policy.position) for t in policy.update(probs[i : i + step])]
    return out, policy


# --- synthetic sequences ---------------------------------------------------------------------------


def test_start_is_reported_once_min_speech_is_certain_and_dated_back():
    probs = [SILENCE] * 10 + [SPEECH] * 20
    out, policy = run(probs)
    # Speech begins at window 10 (sample 5120). 250 ms = 4000 samples is exceeded once 8 speech windows
    # (4096 samples) are seen, i.e. after window 17 (position 9216).
    assert out == [(S, 5120 - PAD, 9216)]
    assert policy.in_speech


def test_speech_not_longer_than_min_speech_is_dropped():
    seven = [SILENCE] * 5 + [SPEECH] * 7 + [SILENCE] * 10  # 3584 samples <= 4000
    assert run(seven)[0] == []
    eight = [SILENCE] * 5 + [SPEECH] * 8 + [SILENCE] * 10  # 4096 samples > 4000
    assert [(k, s) for k, s, _ in run(eight)[0]] == [(S, 5 * WINDOW - PAD), (E, 13 * WINDOW + PAD)]
    # min_speech_ms=0 keeps a single window.
    one = [SILENCE] * 5 + [SPEECH] + [SILENCE] * 10
    assert [(k, s) for k, s, _ in run(one, VADConfig(min_speech_ms=0))[0]] == [(S, 2080), (E, 3072 + PAD)]


def test_end_needs_min_silence_and_is_dated_back():
    probs = [SPEECH] * 20 + [SILENCE] * 4
    out, policy = run(probs)
    assert [k for k, _, _ in out] == [S]  # 4 silent windows: 3 * 512 = 1536 < 1600 samples after it began
    out, policy = run(probs + [SILENCE])
    # The 5th silent window lies 2048 >= 1600 samples after the silence began at window 20.
    assert out[-1] == (E, 20 * WINDOW + PAD, 25 * WINDOW)
    assert not policy.in_speech
    # A longer min_silence waits longer.
    out, _ = run(probs + [SILENCE] * 6, VADConfig(min_silence_ms=300))  # 4800 samples: 10 windows
    assert [k for k, _, _ in out] == [S]
    out, _ = run(probs + [SILENCE] * 7, VADConfig(min_silence_ms=300))
    assert out[-1] == (E, 20 * WINDOW + PAD, 31 * WINDOW)


def test_hysteresis_between_thresholds():
    # In speech, MAYBE windows neither begin a silence ...
    out, _ = run([SPEECH] * 20 + [MAYBE] * 20)
    assert [k for k, _, _ in out] == [S]
    # ... nor cancel one: the silence still counts from its first silent window.
    out, _ = run([SPEECH] * 20 + [SILENCE] + [MAYBE] * 3 + [SILENCE])
    assert out[-1] == (E, 20 * WINDOW + PAD, 25 * WINDOW)
    # Speech (>= threshold) does cancel it, and the silence restarts from scratch.
    out, _ = run([SPEECH] * 20 + [SILENCE] * 3 + [SPEECH] + [SILENCE] * 4)
    assert [k for k, _, _ in out] == [S]
    # Out of speech, MAYBE does not open a segment.
    assert run([MAYBE] * 30)[0] == []
    # The exit threshold is configurable: with neg_threshold=0.45 MAYBE (0.4) is silence.
    out, _ = run([SPEECH] * 20 + [MAYBE] * 5, VADConfig(neg_threshold=0.45))
    assert out[-1] == (E, 20 * WINDOW + PAD, 25 * WINDOW)
    # threshold itself counts as speech (>=), like Silero.
    assert run([0.5] * 10)[0] == [(S, 0, 8 * WINDOW)]


def test_thresholds_and_config_validation():
    assert VADConfig().exit_threshold == pytest.approx(0.35)
    assert VADConfig(threshold=0.1).exit_threshold == pytest.approx(0.01)
    assert VADConfig(threshold=0.7, neg_threshold=0.2).exit_threshold == 0.2
    for bad in (
        dict(threshold=1.5),
        dict(neg_threshold=0.6),
        dict(min_speech_ms=-1),
        dict(min_silence_ms=1.5),
        dict(speech_pad_ms=True),
        # not numbers: these used to fail with a TypeError from the comparison
        dict(threshold="0.5"),
        dict(threshold=None),
        dict(threshold=[0.5]),
        dict(threshold=float("nan")),
        dict(neg_threshold="0.3"),
        dict(threshold=True),
    ):
        with pytest.raises(ValueError):
            VADConfig(**bad)


def test_pads_are_clamped_to_the_stream():
    out, _ = run([SPEECH] * 20 + [SILENCE] * 5, VADConfig(speech_pad_ms=100))
    # The start cannot precede sample 0; the end (silence start + 1600) cannot pass what was seen.
    assert [(k, s) for k, s, _ in out] == [(S, 0), (E, min(20 * WINDOW + 1600, 25 * WINDOW))]
    # With a pad longer than min_silence allows, the next start is clamped to the previous end.
    cfg = VADConfig(speech_pad_ms=100, min_silence_ms=0, min_speech_ms=0)
    out, _ = run([SPEECH] * 3 + [SILENCE] + [SPEECH] * 3 + [SILENCE], cfg)
    samples = [s for _, s, _ in out]
    assert samples == sorted(samples) and samples[1] == samples[2] == 4 * WINDOW


def test_flush_closes_open_speech_at_the_last_sample():
    policy = VADPolicy()
    assert [t.kind for t in policy.update([SPEECH] * 20)] == [S]
    assert policy.flush(end_sample=20 * WINDOW - 100) == [VADTransition(E, 20 * WINDOW - 100)]
    with pytest.raises(StreamError):
        policy.update([SPEECH])
    with pytest.raises(StreamError):
        policy.flush()

    # A pending silence does not matter at flush: like Silero, the segment ends at the last sample.
    policy = VADPolicy()
    policy.update([SPEECH] * 20 + [SILENCE] * 2)
    assert policy.flush() == [VADTransition(E, 22 * WINDOW)]

    # A segment never reported yet but long enough by the end is reported whole at flush.
    policy = VADPolicy()
    assert policy.update([SILENCE] * 2 + [SPEECH] * 7) == []
    assert policy.flush([SPEECH]) == [VADTransition(S, 2 * WINDOW - PAD), VADTransition(E, 10 * WINDOW)]

    # The final window is zero-padded: judged with the true length, 7 windows + 100 samples is too short.
    policy = VADPolicy()
    assert policy.update([SILENCE] * 2 + [SPEECH] * 7) == []
    assert policy.flush([SPEECH], end_sample=9 * WINDOW + 100) == []

    # No speech, nothing to close; reset starts a new stream at sample 0.
    policy = VADPolicy()
    assert policy.flush([SILENCE] * 3) == []
    policy.reset()
    assert policy.position == 0 and [t.kind for t in policy.update([SPEECH] * 9)] == [S]

    with pytest.raises(ValueError):
        VADPolicy().flush([SPEECH] * 2, end_sample=WINDOW)  # not inside the last window
    with pytest.raises(ValueError):
        VADPolicy().flush([SPEECH], end_sample=WINDOW + 1)


def _blocky(rng, n):
    """Probabilities in runs, with levels on both sides of and between the thresholds."""
    probs = []
    while len(probs) < n:
        level = rng.choice([0.02, 0.3, 0.4, 0.45, 0.55, 0.8, 0.97, rng.random()])
        probs += list(np.clip(level + rng.normal(0, 0.04, int(rng.integers(1, 16))), 0, 1))
    return [float(p) for p in probs[:n]]


def test_equals_silero_offline_state_machine_for_any_chunking():
    """Online, fed in random pieces, the policy returns exactly what Silero's offline
    `get_speech_timestamps_from_probs` returns for the whole sequence (when 2 pad <= min_silence + 32 ms)."""
    rng = np.random.default_rng(1234)
    configs = [
        VADConfig(),
        VADConfig(threshold=0.3, min_speech_ms=100, min_silence_ms=300, speech_pad_ms=60),
        VADConfig(threshold=0.7, neg_threshold=0.5, min_speech_ms=0, min_silence_ms=32, speech_pad_ms=0),
        VADConfig(min_speech_ms=500, min_silence_ms=0, speech_pad_ms=10),
    ]
    segments = 0
    for trial in range(400):
        cfg = configs[trial % len(configs)]
        n = int(rng.integers(1, 160))
        probs = _blocky(rng, n)
        length = n * WINDOW - int(rng.integers(0, WINDOW))  # the last window is zero-padded audio
        want = _silero(probs, cfg, length)
        assert _in_random_pieces(probs, cfg, length, rng) == want, (trial, cfg)
        segments += len(want)
    assert segments > 300  # the sequences did exercise the machine


def test_policy_module_imports_without_torch():
    runtime = Path(__file__).resolve().parents[2] / "runtime"
    code = textwrap.dedent(
        f"""
        import sys, types
        sys.modules["torch"] = None  # any import of torch now fails
        for name, path in (("monosemantic", {str(runtime)!r}), ("monosemantic.vad", {str(runtime / "vad")!r})):
            package = types.ModuleType(name)
            package.__path__ = [path]  # a bare package: its __init__ (which imports torch) is not run
            sys.modules[name] = package
        import monosemantic.vad.policy as policy
        assert policy.VADPolicy().update([0.9] * 9)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_window_and_rate_match_the_model():
    pytest.importorskip("torch")
    from monosemantic.vad import policy, silero

    assert (policy.WINDOW, policy.SAMPLE_RATE) == (silero.WINDOW, silero.SAMPLE_RATE)


# --- real speech: SileroVAD + VADPolicy online vs get_speech_timestamps offline ----------------------


def test_online_segments_bracket_speech_like_get_speech_timestamps(audio_clips):
    torch = pytest.importorskip("torch")
    silero_vad = pytest.importorskip("silero_vad", reason="silero-vad (the reference) is not installed")
    from monosemantic.vad.silero import SileroVAD, VADState

    torch.set_num_threads(1)
    rng = np.random.default_rng(7)
    names = ["jfk.wav", "sense_and_sensibility_01_austen_64kb-0880.wav", "61-70968-0000.flac"]
    parts, gaps, pos = [], [], 0
    for k, name in enumerate(names):
        seconds = 1.0 + k * 0.5
        quiet = np.zeros(int(16000 * seconds), np.float32) if k % 2 == 0 else rng.normal(0, 1e-3, int(16000 * seconds))
        parts += [quiet.astype(np.float32), audio_clips[name]]
        gaps.append((pos, pos + len(quiet)))
        pos += len(quiet) + len(audio_clips[name])
    parts.append(rng.normal(0, 1e-3, 16000 + 123).astype(np.float32))  # ends mid-window, in silence
    gaps.append((pos, pos + len(parts[-1])))
    audio = np.concatenate(parts)

    cfg = VADConfig()
    reference = silero_vad.get_speech_timestamps(
        torch.from_numpy(audio),
        silero_vad.load_silero_vad(),
        threshold=cfg.threshold,
        min_speech_duration_ms=cfg.min_speech_ms,
        min_silence_duration_ms=cfg.min_silence_ms,
        speech_pad_ms=cfg.speech_pad_ms,
        return_seconds=False,
    )

    # Online, as the engine runs it: one window per tick, the final window zero-padded and given to flush.
    model, policy = SileroVAD.from_package(), VADPolicy(cfg)
    padded = np.concatenate([audio, np.zeros(-len(audio) % WINDOW, np.float32)])
    windows = torch.from_numpy(padded).view(-1, WINDOW)
    state, transitions, reported_at = VADState.zeros(1), [], []
    with torch.no_grad():
        for i, window in enumerate(windows):
            prob, state = model(window[None], state)
            new = policy.update([prob.item()]) if i < len(windows) - 1 else policy.flush([prob.item()], len(audio))
            transitions += new
            reported_at += [policy.position] * len(new)

    assert [t.kind for t in transitions] == [S, E] * (len(transitions) // 2)
    starts, ends = [t.sample for t in transitions[::2]], [t.sample for t in transitions[1::2]]
    assert len(starts) == len(reference) >= len(names)
    for (start, end), ref in zip(zip(starts, ends), reference):
        assert abs(start - ref["start"]) <= 1600 and abs(end - ref["end"]) <= 1600, (start, end, ref)

    # The inserted silences are outside every segment (apart from the pads): the segments bracket the
    # speech, and something was found between each pair of silences.
    for lo, hi in gaps:
        middle = (lo + hi) // 2
        assert not any(s < middle < e for s, e in zip(starts, ends)), (lo, hi)
    for (_, hi), (lo, _) in zip(gaps, gaps[1:]):
        assert any(hi <= s < lo for s in starts)

    # Online: each transition was reported soon after the audio made it certain, not at the end.
    for t, seen in zip(transitions[:-1], reported_at[:-1]):
        if t.kind == S:
            assert seen <= t.sample + PAD + 4000 + 2 * WINDOW
        else:
            assert seen <= t.sample - PAD + 1600 + 2 * WINDOW



def _in_random_pieces(probs, cfg, length, rng):
    """The policy's segments ({start, end}, as Silero's) with `probs` fed in random pieces of 1..8, the
    last window at the flush."""
    policy, got, i, n = VADPolicy(cfg), [], 0, len(probs)
    while i < n - 1:
        k = int(min(rng.integers(1, 9), n - 1 - i))
        got += policy.update(probs[i : i + k])
        i += k
    got += policy.flush(probs[i:], end_sample=length)
    assert [t.kind for t in got] == [S, E] * (len(got) // 2)
    return [{"start": a.sample, "end": b.sample} for a, b in zip(got[::2], got[1::2])]


def _silero(probs, cfg, length):
    silero_vad = pytest.importorskip("silero_vad", reason="silero-vad (the reference) is not installed")
    return silero_vad.get_speech_timestamps_from_probs(
        probs,
        threshold=cfg.threshold,
        neg_threshold=cfg.neg_threshold,
        min_speech_duration_ms=cfg.min_speech_ms,
        min_silence_duration_ms=cfg.min_silence_ms,
        speech_pad_ms=cfg.speech_pad_ms,
        audio_length_samples=length,
    )


def _online(probs, cfg, length):
    policy = VADPolicy(cfg)
    got = []
    for p in probs[:-1]:
        got += policy.update([p])
    got += policy.flush(probs[-1:], end_sample=length)
    return [{"start": a.sample, "end": b.sample} for a, b in zip(got[::2], got[1::2])]


@pytest.mark.parametrize(
    "cfg, probs",
    [
        # threshold below 0.01: the default exit threshold (0.01) lies above it, so a window in
        # [threshold, 0.01) is speech and silence at once; Silero cancels a pending silence there and
        # begins a new one at that window.
        (VADConfig(threshold=0.005), [0.9] * 20 + [0.007] + [0.0] * 10),
        (VADConfig(threshold=0.005), [0.9] * 20 + [0.007] * 3 + [0.0] * 10),
        (VADConfig(threshold=0.005, min_silence_ms=0), [0.9] * 20 + [0.007] * 3 + [0.9] * 10),
        (VADConfig(threshold=0.0, min_silence_ms=0), [0.9] * 20 + [0.0] * 10),
    ],
)
def test_threshold_below_the_default_exit_threshold_equals_silero(cfg, probs):
    """The policy promises Silero's segments for any valid config; threshold < 0.01 with the default
    neg_threshold (max(threshold - 0.15, 0.01)) gave ends a window or more later, or none at all."""
    length = len(probs) * WINDOW - 100
    assert _online(probs, cfg, length) == _silero(probs, cfg, length)


def test_low_thresholds_equal_silero_on_random_sequences():
    """The same, on random probabilities around the thresholds, fed in random pieces."""
    rng = np.random.default_rng(99)
    configs = [VADConfig(threshold=0.005), VADConfig(threshold=0.0, min_silence_ms=0, min_speech_ms=0, speech_pad_ms=0),
               VADConfig(threshold=0.008, min_silence_ms=32, min_speech_ms=64, speech_pad_ms=10)]
    segments = 0
    for trial in range(300):
        cfg = configs[trial % len(configs)]
        n = int(rng.integers(2, 120))
        levels = rng.choice([0.0, 0.003, 0.006, 0.009, 0.5, 0.9], size=n)
        probs = [float(p) for p in np.repeat(levels, rng.integers(1, 6, size=n))[:n]]
        length = n * WINDOW - int(rng.integers(0, WINDOW))
        pairs = _in_random_pieces(probs, cfg, length, rng)
        assert pairs == _silero(probs, cfg, length), (trial, cfg, probs)
        segments += len(pairs)
    assert segments > 100
