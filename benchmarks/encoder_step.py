"""Encoder streaming-step time per chunk: monosemantic vs NeMo's `cache_aware_stream_step`.

Both run the same random weights (a NeMo model built here, saved to .nemo and loaded by our real loader),
the same batch size and the same steady-state input: a full window of mel frames, with caches already
full (70 frames of left context), as a stream is after its first 5.6 s. Timings alternate between the two
implementations in one process, so machine noise hits both; the figure that counts is the ratio.

    python benchmarks/encoder_step.py --arch reduced --device cpu --batch 1 32
    python benchmarks/encoder_step.py --arch full --device cuda --batch 1 32

Needs the `nemo` extra (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _support.nemo_checkpoints import VARIANTS, model_config, quiet_nemo, train_tokenizer  # noqa: E402
from _support.nemo_reference import nemo_cache_aware_step_fn  # noqa: E402
from archs import ARCHS  # noqa: E402

import monosemantic  # noqa: E402
from monosemantic.streaming.cuda_graph import GraphedEncoderStep  # noqa: E402
from monosemantic.streaming.encoder_step import EncoderCache, encoder_step  # noqa: E402

def build_models(arch: str, device: str, workdir: Path):
    """A NeMo model with NeMo's default random init, and the same weights loaded by monosemantic."""
    from omegaconf import OmegaConf

    variant = replace(VARIANTS["nemotron_rnnt"], name=f"bench_{arch}", **ARCHS[arch])
    tokenizer = train_tokenizer(workdir / "tokenizer")
    with quiet_nemo():
        from nemo.collections.asr.models import EncDecRNNTBPEModel

        torch.manual_seed(0)
        nemo_model = EncDecRNNTBPEModel(cfg=OmegaConf.create(model_config(variant, tokenizer)))
        nemo_model.eval()
        path = workdir / f"{variant.name}.nemo"
        nemo_model.save_to(str(path))
    nemo_model = nemo_model.to(device)
    ours = monosemantic.load_model(str(path), device=device)
    return nemo_model, ours


def our_step_fn(model, latency_ms: int, batch: int, graphed: bool = False):
    """A zero-arg callable running one steady-state encoder step of `model` (caches full, carried),
    eagerly or replayed from a CUDA graph."""
    plan = model.plan(model.context_for(latency_ms))
    shape = plan.shape
    encoder = model.module.encoder
    gen = torch.Generator().manual_seed(0)
    mel = torch.randn(batch, shape.step_mel, encoder.cfg.feat_in, generator=gen).to(model.device)
    cache = EncoderCache.zeros(encoder, shape.cache_frames, batch, model.device)
    for t in cache.keys + cache.values + cache.conv + cache.sub:
        t.copy_(torch.randn(t.shape, generator=gen))
    cache.length.fill_(shape.cache_frames)
    state = {"cache": cache}
    run = GraphedEncoderStep(encoder, plan, batch) if graphed else partial(encoder_step, encoder, plan)

    def step():
        out, _, state["cache"] = run(mel, state["cache"])
        return out

    return step


def timed(fn, device: str, iters: int) -> float:
    """Mean seconds per call over `iters` calls."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def compare(fns: list, device: str, rounds: int, iters: int) -> list[float]:
    """Median per-step seconds of each callable, measured in alternating rounds."""
    for fn in fns:
        timed(fn, device, 3)
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            out.append(timed(fn, device, iters))
    return [statistics.median(s) for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="reduced")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--latency", type=int, nargs="+", help="latency modes in ms (default: all)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        nemo_model, ours = build_models(args.arch, args.device, Path(tmp))
        machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        print(f"# encoder step, arch={args.arch} ({ours.config.encoder.n_layers}x{ours.config.encoder.d_model}), "
              f"device={args.device} ({machine}), fp32, torch {torch.__version__}")
        graphs = args.device.startswith("cuda")
        header = f"{'latency':>8} {'batch':>5} {'nemo ms':>9} {'ours ms':>9} {'speedup':>8}"
        print(header + (f" {'graph ms':>9} {'speedup':>8}" if graphs else ""))
        rows = []
        for latency in args.latency or ours.latency_modes:
            context = list(ours.context_for(latency))
            for batch in args.batch:
                fns = [nemo_cache_aware_step_fn(nemo_model, context, batch), our_step_fn(ours, latency, batch)]
                if graphs:
                    fns.append(our_step_fn(ours, latency, batch, graphed=True))
                times = compare(fns, args.device, args.rounds, args.iters)
                row = {"latency_ms": latency, "batch": batch, "nemo_ms": times[0] * 1e3, "ours_ms": times[1] * 1e3,
                       "speedup": times[0] / times[1]}
                line = f"{latency:>8} {batch:>5} {times[0] * 1e3:>9.2f} {times[1] * 1e3:>9.2f} {times[0] / times[1]:>7.2f}x"
                if graphs:
                    row.update(graph_ms=times[2] * 1e3, graph_speedup=times[0] / times[2])
                    line += f" {times[2] * 1e3:>9.2f} {times[0] / times[2]:>7.2f}x"
                rows.append(row)
                print(line, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"arch": args.arch, "device": args.device, "machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
