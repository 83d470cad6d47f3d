"""Full fp32 arithmetic on CUDA for the float32 encoder.

PyTorch lets cuDNN convolutions use TF32 by default (and matmuls when the user asks for it), which keeps
only 10 mantissa bits: enough to flip near-tied argmaxes, so float32 results would differ from NeMo's
CPU reference and between CPU and GPU. Inside this context a float32 model runs real fp32 arithmetic;
reduced-precision dtypes are left alone.

The TF32 switches are process-wide while one model may run in several threads at once (engines sharing
a loaded model each have a loop thread; `model.transcribe` may run in the user's thread meanwhile). So
the contexts are counted across threads: the first entry saves the user's settings and turns TF32 off,
the last exit gives them back. While any float32 model call runs, other torch code in the process also
sees TF32 off, and a TF32 setting the user changes during that time is replaced by the saved one.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

import torch

_lock = threading.Lock()
_depth = 0  # exact_fp32 contexts open now, in all threads
_saved: tuple[object, object] | None = None  # the user's settings, taken by the first entry


def _new_api() -> tuple[object, object] | None:
    """(matmul, cudnn conv) backends when torch >= 2.9's fp32_precision API is there, else None."""
    matmul = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return matmul, conv
    return None


_BACKENDS = _new_api()  # looked up once: hasattr on torch's backend modules costs microseconds a call


def _save_and_set_exact() -> tuple[object, object]:
    backends = _BACKENDS
    if backends is not None:
        # torch >= 2.9: only the fp32_precision API is touched. Reading the legacy allow_tf32 flags raises
        # once the user has set TF32 through this API, as PyTorch recommends.
        matmul, conv = backends
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        return saved
    # Older torch: the legacy flags. Not `cudnn.flags(...)`, which also resets cudnn.benchmark and
    # cudnn.deterministic for its duration.
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return saved


def _restore(saved: tuple[object, object]) -> None:
    backends = _BACKENDS
    if backends is not None:
        matmul, conv = backends
        matmul.fp32_precision, conv.fp32_precision = saved
    else:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _after_fork_in_child() -> None:
    """A child forked while a thread of its parent was inside has none inside: give the user's settings
    back, and take a fresh lock (one held by a parent thread at the fork would never be released)."""
    global _lock, _depth, _saved
    _lock, _depth = threading.Lock(), 0
    saved, _saved = _saved, None
    if saved is not None:
        _restore(saved)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def exact_fp32(dtype: torch.dtype) -> Iterator[None]:
    global _depth, _saved
    if dtype != torch.float32:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = _save_and_set_exact()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                saved, _saved = _saved, None
                _restore(saved)
