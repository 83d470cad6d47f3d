"""Incremental log-mel features equal the offline features frame for frame, whatever the piece sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monosemantic.streaming.frontend import IncrementalFrontend


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_frames_equal_offline(ms_model, audio_clips, seed):
    model = ms_model("nemotron_rnnt")
    frontend = model.module.frontend
    audio = audio_clips["sense_and_sensibility_01_austen_64kb-0880.wav"]
    expected, n = frontend(torch.from_numpy(audio)[None], torch.tensor([len(audio)]))
    expected = expected[0, :, : int(n[0])]
    inc = IncrementalFrontend(frontend)
    rng = np.random.default_rng(seed)
    frames, start = [], 0
    while start < len(audio):
        size = int(rng.choice([1, 7, 159, 160, 161, 320, 999, 4000]))
        frames.append(inc.push(torch.from_numpy(audio[start : start + size])))
        start += size
    frames.append(inc.flush())
    got = torch.cat(frames, dim=1)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_refuses_models_with_utterance_normalization(ms_model):
    with pytest.raises(ValueError, match="normalization"):
        IncrementalFrontend(ms_model("parakeet_tdt").module.frontend)
