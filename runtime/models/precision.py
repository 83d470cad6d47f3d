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
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        # torch >= 2.9: only the fp32_precision API is touched. Reading the legacy allow_tf32 flags raises
        # once the user has set TF32 through this API, as PyTorch recommends.
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    # Older torch: the legacy flags. Not `cudnn.flags(...)`, which also resets cudnn.benchmark and
    # cudnn.deterministic for its duration.
    saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
