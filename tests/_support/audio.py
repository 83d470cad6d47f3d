"""Test audio built from the real speech clips of tests/data."""

from __future__ import annotations

import numpy as np


def speech_with_silences(audio_clips, gaps=(1.5, 2.0, 1.2), tail=1.5) -> np.ndarray:
    """Three real speech clips separated by near-silent gaps (noise at -80 dBFS), after 0.5 s of silence:
    audio on which a VAD must find three (or more) speech segments."""
    rng = np.random.default_rng(0)
    clips = [audio_clips[k] for k in ("jfk.wav", "sense_and_sensibility_01_austen_64kb-0880.wav", "61-70968-0000.flac")]
    parts = [np.zeros(8000, dtype=np.float32)]
    for clip, gap in zip(clips, gaps):
        parts += [clip, (rng.standard_normal(int(gap * 16000)) * 1e-4).astype(np.float32)]
    parts.append(np.zeros(int(tail * 16000), dtype=np.float32))
    return np.concatenate(parts)
