"""Full fp32 arithmetic on CUDA for the float32 encoder.

PyTorch lets cuDNN convolutions use TF32 by default (and matmuls when the user asks for it), which keeps
only 10 mantissa bits: enough to flip near-tied argmaxes, so float32 results would differ from NeMo's
CPU reference and between CPU and GPU. Inside this context a float32 model runs real fp32 arithmetic;
reduced-precision dtypes are left alone.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def exact_fp32(dtype: torch.dtype):
    if dtype != torch.float32:
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
