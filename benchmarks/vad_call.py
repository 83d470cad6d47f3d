"""One batched VAD call (`SileroVAD.forward_windows`, what the engine runs once a tick) by its shape:
`--rows` streams with `--windows` windows each, and `--behind` of them with `--behind-windows` (a stream
catching up after a burst of audio, up to MAX_VAD_WINDOWS = 32 in one tick). Median of `--repeat` calls.

    python benchmarks/vad_call.py --rows 50 200 --windows 2 --behind 1 --behind-windows 32

Timings depend on the machine and what runs beside it: compare code versions side by side, alternated.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from monosemantic.vad.silero import WINDOW, SileroVAD, VADState


def time_call(model: SileroVAD, rows: int, windows: int, behind: int, behind_windows: int, repeat: int) -> float:
    counts = np.full(rows, windows)
    counts[:behind] = behind_windows
    state = VADState.zeros(rows)
    audio = torch.randn(rows, int(counts.max()) * WINDOW) * 0.1  # [B, W * 512]
    for _ in range(3):
        model.forward_windows(audio, counts, state)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.forward_windows(audio, counts, state)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[50])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--behind", type=int, default=1, help="rows far behind (0: none)")
    p.add_argument("--behind-windows", type=int, default=32)
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    model = SileroVAD.from_package()
    for rows in args.rows:
        for behind in sorted({0, min(args.behind, rows)}):
            ms = time_call(model, rows, args.windows, behind, args.behind_windows, args.repeat) * 1e3
            print(f"rows={rows} windows={args.windows} behind={behind}x{args.behind_windows}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
