"""exact_fp32: float32 model code runs without TF32 and gives the user's torch settings back."""

from __future__ import annotations

import pytest


_PRECISION_SCRIPT = r"""
import sys, torch
import monosemantic
from monosemantic.models.precision import exact_fp32

if sys.argv[1] == "new_api":
    # PyTorch's recommended TF32 switch since 2.9; reading the legacy allow_tf32 flag afterwards raises.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    model = monosemantic.load_model(sys.argv[2], device="cpu")
    assert model.transcribe(torch.zeros(16000).numpy()) is not None
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # the user's setting is back
else:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = True
    with exact_fp32(torch.float32):
        assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark, "cuDNN flags reset"
    assert torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
print("OK")
"""


@pytest.mark.parametrize("case", ["new_api", "cudnn_flags"])
def test_exact_fp32_leaves_the_users_torch_settings_alone(nemo_checkpoint, case):
    """exact_fp32 read `torch.backends.cuda.matmul.allow_tf32`, which raises RuntimeError ("mix of the
    legacy and new APIs") once the user has set TF32 the way PyTorch >= 2.9 recommends: every float32
    encoder call failed, on CPU too. It also entered `torch.backends.cudnn.flags(...)`, which resets
    cudnn.deterministic and cudnn.benchmark to False inside. Run in a subprocess: these flags are global."""
    import subprocess
    import sys

    import torch

    if case == "new_api" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    result = subprocess.run(
        [sys.executable, "-c", _PRECISION_SCRIPT, case, str(nemo_checkpoint("nemotron_rnnt"))],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
