"""Linear layers and depthwise convolutions on few rows, taken the way that is fastest on CPU.

A streaming step runs its layers on a few rows (2 encoder frames per stream at 160 ms), where the CPU
kernels behind `F.linear` and `F.conv1d` are at their worst:
- `F.linear` calls BLAS with the weight transposed, and reads the weights at 4-5 GB/s. Taken as
  `weight @ rows^T` with the rows row-major, the product of 2-4 rows streams the weights at 11-13
  GB/s, near this machine's memory bandwidth (1024 x 256 weights, 48 MB of them: 81 us instead of 201
  for 2 rows). From 8 rows the gain falls to 10-40%.
- A depthwise `F.conv1d` costs over 100 us whatever its size below a few dozen rows (oneDNN's set-up);
  the same sums as a batched product of the unfolded windows with the kernels cost 25-40 us for one or
  two streams.
A step at 1 to 4 streams ran 1.1-1.45x faster with both, at 8 to 32 streams 1.0-1.15x
(BENCHMARKS.md, "Few-row products"). Each output is the same sum of the same products either way;
only the order the kernel adds them in differs. Larger inputs (offline encoding, big batches) keep the
library calls, and other devices always do: a GPU step is bound by kernel launches, not by these.
"""

from __future__ import annotations

import torch
from torch import nn

# Above these many rows the few-row forms stopped winning consistently (the library calls are no longer
# bound by reading the weights).
LINEAR_ROWS = 64
DEPTHWISE_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] -> [..., N], contiguous."""
    k = x.shape[-1]
    if x.device.type != "cpu" or x.numel() > LINEAR_ROWS * k:
        return nn.functional.linear(x, weight, bias)
    # BLAS streams the weight at near memory speed only when the rows arrive row-major and transposed
    # (12 against 5 GB/s for 2-4 rows); a copy of a few rows costs far less.
    rows = x.reshape(-1, k).contiguous().t()  # [K, M]
    if bias is None:
        out = torch.mm(weight, rows)  # [N, M]
    else:
        out = torch.addmm(bias[:, None], weight, rows)
    return out.t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


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
