"""Linear layers and depthwise convolutions on few rows, taken the way that is fastest on CPU.

A streaming step runs its layers on a few rows (2 encoder frames per stream at 160 ms), where the CPU
kernels behind `F.linear` and `F.conv1d` are at their worst:
- `F.linear` calls BLAS with the weight transposed. Taken as `weight @ x^T`, which walks the row-major
  weight in order, the product of 2 rows with a 1024 x 256 feed-forward weight took 103 us instead of
  221. The 256 x 256 attention weights gain nothing alone (23 us against 35 at 2 rows, with this
  function's own overhead), but a step with them taken the same way was no slower than one without.
- A depthwise `F.conv1d` costs over 100 us whatever its size below a few dozen rows (oneDNN's set-up);
  the same sums as a batched product of the unfolded windows with the kernels cost 25 us for one
  stream and 64 us for sixteen.
A step at 1 to 16 streams ran 1.08-1.33x faster with both (BENCHMARKS.md, "Few-row products"). Each
output is the same sum of the same products either way; only the order the kernel adds them in differs.
Larger inputs (offline encoding, big batches) keep the library calls, and other devices always do: a
GPU step is bound by kernel launches, not by these.
"""

from __future__ import annotations

import torch
from torch import nn

# Above these many rows the library calls measured as fast or faster.
LINEAR_ROWS = 256
DEPTHWISE_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] -> [..., N]. On CPU the result is
    a transposed view (its rows strided), which elementwise ops and the next product read as they are."""
    k = x.shape[-1]
    if x.device.type != "cpu" or x.numel() > LINEAR_ROWS * k:
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(-1, k).t()  # [K, M]
    if bias is None:
        out = torch.mm(weight, flat)  # [N, M]
    else:
        out = torch.addmm(bias[:, None], weight, flat)
    return out.t().reshape(*x.shape[:-1], weight.shape[0])  # a view: M splits along a unit stride


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, groups=C)` without padding: x [B, C, L], weight [C, 1, k], bias [C]
    -> [B, C, L - k + 1]."""
    b, c, length = x.shape
    size = weight.shape[-1]
    if x.device.type != "cpu" or b * (length - size + 1) > DEPTHWISE_ROWS:
        return nn.functional.conv1d(x, weight, bias, groups=c)
    windows = x.unfold(2, size, 1)  # [B, C, T, k], a view
    out = torch.matmul(windows, weight[:, 0, :, None]).squeeze(-1)  # [B, C, T]
    return out if bias is None else out + bias[:, None]
