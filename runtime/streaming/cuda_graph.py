"""CUDA-graph replay of the streaming encoder step.

A streaming step of a 24-layer encoder on a few frames launches several hundred small kernels; on a GPU
its time is launch overhead, not arithmetic. The step has static shapes per (latency mode, batch size),
so it is captured once into a CUDA graph and replayed: inputs are copied into the graph's static
buffers, the graph runs, and its outputs are views of static buffers valid until the next replay.

`GraphedEncoderStep` takes and returns caches (a caller's own state). `SlotGraphedEncoderStep` serves an
engine whose caches live in slot-indexed tensors: the graph reads its rows' caches from the slots and
writes them back itself, so per step only the row indices, mel frames and masks cross into the graph.
"""

from __future__ import annotations

import torch

from ..models.conformer import ConformerEncoder
from .encoder_step import EncoderCache, encoder_step
from .plan import ChunkPlan
from .slot_cache import SlotCache, slot_encoder_step


def _copy_cache(dst: EncoderCache, src: EncoderCache) -> None:
    for d, s in zip(dst.keys + dst.values + dst.conv + dst.sub, src.keys + src.values + src.conv + src.sub):
        if d is not s:
            d.copy_(s)
    if dst.length is not src.length:
        dst.length.copy_(src.length)


class GraphedEncoderStep:
    """encoder_step for a fixed batch size and mode, replayed from a CUDA graph.

    masked=False captures the steady-state step (every window full, no stream starting): callers run
    first and last steps eagerly, or capture a masked=True graph, which takes lo/hi for every row."""

    def __init__(
        self, encoder: ConformerEncoder, plan: ChunkPlan, batch: int, masked: bool = False, warmup: int = 3, pool=None
    ):
        """pool: a CUDA graph memory pool (torch.cuda.graph_pool_handle()) shared with other graphs that
        are never replayed concurrently with this one, so their intermediate memory is shared."""
        device = encoder.pre_encode.out.weight.device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.encoder, self.plan, self.batch, self.masked = encoder, plan, batch, masked
        shape = plan.shape
        self.mel = torch.zeros(batch, shape.step_mel, encoder.cfg.feat_in, device=device)
        self.cache = EncoderCache.zeros(encoder, shape.cache_frames, batch, device)
        self.lo = torch.zeros(batch, dtype=torch.long, device=device) if masked else None
        self.hi = torch.full((batch,), shape.step_mel + 1, dtype=torch.long, device=device) if masked else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # lets cuBLAS/cuDNN pick and allocate their workspaces before capture
                encoder_step(encoder, plan, self.mel, self.cache, self.lo, self.hi)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a caller transcribing on the same GPU) may launch work meanwhile.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out, self.out_len, self.next_cache = encoder_step(encoder, plan, self.mel, self.cache, self.lo, self.hi)

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor, cache: EncoderCache, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
        """Same contract as encoder_step; the returned tensors are overwritten by the next call."""
        if not self.masked and (lo is not None or hi is not None):
            raise ValueError("this graph was captured for full windows; pass lo/hi only to a masked graph")
        self.mel.copy_(mel)
        _copy_cache(self.cache, cache)
        if self.masked:
            self.lo.copy_(lo if lo is not None else torch.zeros_like(self.lo))
            self.hi.copy_(hi if hi is not None else torch.full_like(self.hi, self.plan.shape.step_mel + 1))
        self.graph.replay()
        return self.out, self.out_len, self.next_cache


def bucket_sizes(limit: int) -> list[int]:
    """Batch sizes graphs are captured for, up to the first at or above `limit`: powers of two and 1.5x
    powers of two, so a batch is padded by less than a third instead of up to half, for about twice
    the graphs."""
    sizes, size = [1, 2, 3], 4
    while sizes[-1] < limit:
        sizes += [size, size * 3 // 2]
        size *= 2
    return sizes[: next(i for i, s in enumerate(sizes) if s >= limit) + 1]


class SlotGraphedEncoderStep:
    """slot_encoder_step for up to `batch` rows of the slot caches `slots`, replayed from a CUDA graph that
    gathers the rows' caches, steps them and writes the new frames back to the same slots.

    No cache is copied into or out of the graph (an engine with hundreds of 14 MB caches would otherwise
    copy each row's three times per step), and the graph holds no cache buffers of its own: its
    intermediates live in `pool`, shared by graphs that never replay concurrently. Rows past the call's
    count point at `scratch`, a slot nobody reads."""

    def __init__(
        self, encoder: ConformerEncoder, plan: ChunkPlan, batch: int, slots: SlotCache, scratch: int,
        warmup: int = 3, pool=None,
    ):
        device = encoder.pre_encode.out.weight.device
        if device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.encoder, self.plan, self.batch, self.slots, self.scratch = encoder, plan, batch, slots, scratch
        shape = plan.shape
        self.steady = shape.step_mel + 1
        self.mel = torch.zeros(batch, shape.step_mel, encoder.cfg.feat_in, device=device)  # [N, step_mel, F]
        self.index = torch.full((batch,), scratch, dtype=torch.long, device=device)  # [N] slots
        self.lo = torch.zeros(batch, dtype=torch.long, device=device)  # [N]
        self.hi = torch.full((batch,), self.steady, dtype=torch.long, device=device)  # [N]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # every row at the scratch slot: the warm-up touches no stream's state
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.out, self.out_len = self._body()

    def _body(self):
        return slot_encoder_step(self.encoder, self.plan, self.mel, self.slots, self.index, self.lo, self.hi)

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor, index: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None):
        """mel: [n, step_mel, F] new frames of the n <= batch rows; index: [n] their slots; lo, hi: [n]
        as for encoder_step (None: unmasked). Steps the rows and updates their slot caches in place.
        Returns (encoded [n, T, d], valid frames [n]), overwritten by the next call."""
        n = index.shape[0]
        if n > self.batch:
            raise ValueError(f"{n} rows do not fit a graph captured for {self.batch}")
        self.mel[:n].copy_(mel)
        self.index[:n].copy_(index)
        self.index[n:].fill_(self.scratch)
        if lo is None:
            self.lo.zero_()
        else:
            self.lo[:n].copy_(lo)
        self.hi.fill_(self.steady)
        if hi is not None:
            self.hi[:n].copy_(hi)
        self.graph.replay()
        return self.out[:n], self.out_len[:n]
