"""The search for the most streams sustained in real time, against a fake system with a known edge."""

from __future__ import annotations

import pytest

from monosemantic.bench.command import find_max_interleaved, find_max_streams
from monosemantic.bench.result import BenchResult


def system(edge: int):
    """A trial that is sustained up to `edge` streams (p95 below the 160 ms chunk), and which ones ran."""
    tried: list[int] = []

    def trial(n: int) -> BenchResult:
        tried.append(n)
        latency = 100.0 if n <= edge else 300.0
        return BenchResult("fake", n, 160, 1.0, 1.0, 0.1, chunk_latency_ms=[latency] * 20)

    return trial, tried


@pytest.mark.parametrize("edge", [0, 1, 3, 7, 8, 9, 15, 40, 100])
def test_finds_the_edge_from_above_or_below_the_start(edge):
    trial, tried = system(edge)
    found, results = find_max_streams(trial, start=8, limit=64, log=lambda res: None)
    assert len(results) == len(tried) and len(set(tried)) == len(tried)  # no count tried twice
    assert found <= min(edge, 64) and all(results[tried.index(n)].sustained for n in tried if n <= found)
    # Within 12.5% of the edge (or of the limit), from a start above the edge as well as below it.
    target = min(edge, 64)
    assert target - found <= max(1, found // 8)


def test_interleaved_searches_take_turns_and_find_each_edge():
    """Side by side, each system's search tries what it would alone, its trials alternating with the other's."""
    edges = {"engine": 27, "nemo": 9}
    order: list[str] = []

    def recorded(name: str):
        trial, _ = system(edges[name])

        def run(n: int) -> BenchResult:
            order.append(name)
            return trial(n)

        return run

    found, results = find_max_interleaved({name: recorded(name) for name in edges}, start=8, limit=64, log=lambda res: None)
    for name, edge in edges.items():
        trial, tried = system(edge)
        alone, _ = find_max_streams(trial, start=8, limit=64, log=lambda res: None)
        assert found[name] == alone
        assert [r.streams for r in results[name]] == tried
    # Turns: while both searches run, no system runs twice in a row.
    both = 2 * min(len(r) for r in results.values())
    assert order[:both] == ["engine", "nemo"] * (both // 2)
