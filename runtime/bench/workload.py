"""The simulated workload both the engine and the NeMo baseline run, so their figures compare.

Each stream plays real speech in a loop (utterances are the clips, taken in a random order from a random
first clip), pushed in 20 ms frames (as WebRTC delivers them; larger for very many streams) at real-time pace from a random start time in its first second, and
asks for a final (flush) at the end of every utterance, as a voice agent does at each end of turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRAME_MS = 20


@dataclass(frozen=True)
class Utterance:
    """One clip played by one stream."""

    audio: np.ndarray  # float32 16 kHz
    start_s: float  # stream time of its first sample (seconds after the stream's start)


@dataclass(frozen=True)
class StreamPlan:
    """What one simulated stream sends: utterances back to back from `offset_s` after the run starts."""

    index: int
    offset_s: float  # wall-clock delay of the stream's first frame after the run starts
    utterances: list[Utterance]

    def frames(self, sample_rate: int = 16000, frame_ms: int = FRAME_MS):
        """(send time in seconds after the run starts, samples, last frame of its utterance) per frame."""
        step = sample_rate * frame_ms // 1000
        if step < 1:
            raise ValueError(f"frame_ms must give at least one sample per frame, got {frame_ms}")
        for utt in self.utterances:
            n = len(utt.audio)
            for i in range(0, n, step):
                end = min(i + step, n)
                yield self.offset_s + utt.start_s + end / sample_rate, utt.audio[i:end], end == n


def make_workload(clips: list[np.ndarray], streams: int, seconds: float, seed: int = 0, sample_rate: int = 16000) -> list[StreamPlan]:
    """`streams` plans of about `seconds` of audio each (whole utterances), deterministic in `seed`."""
    if not clips:
        raise ValueError("the workload needs at least one clip")
    if not (math.isfinite(seconds) and seconds > 0):  # inf/NaN would loop below forever, growing memory
        raise ValueError(f"the workload needs a finite, positive number of seconds per stream, got {seconds!r}")
    if streams < 1:
        raise ValueError(f"the workload needs at least one stream, got {streams}")
    if not any(len(clip) for clip in clips):  # the loop below would never advance
        raise ValueError("the workload needs audio: every clip is empty")
    rng = np.random.default_rng(seed)
    plans = []
    for index in range(streams):
        order = rng.permutation(len(clips))
        first = int(rng.integers(len(clips)))
        utterances, t = [], 0.0
        k = 0
        while t < seconds:
            audio = clips[order[(first + k) % len(clips)]]
            utterances.append(Utterance(audio=audio, start_s=t))
            t += len(audio) / sample_rate
            k += 1
        plans.append(StreamPlan(index=index, offset_s=float(rng.uniform(0.0, 1.0)), utterances=utterances))
    return plans
