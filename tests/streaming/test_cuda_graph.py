"""The batch buckets CUDA graphs are captured for (pure arithmetic, runs on CPU)."""

from __future__ import annotations

import pytest

from monosemantic.streaming.cuda_graph import bucket_sizes


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5, 8, 9, 100, 256, 257, 1000, 1024])
def test_buckets_cover_every_batch_with_less_than_a_third_padding(limit):
    sizes = bucket_sizes(limit)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] >= limit and (len(sizes) == 1 or sizes[-2] < limit)  # none past the one that holds `limit`
    for rows in range(1, limit + 1):
        bucket = next(b for b in sizes if b >= rows)
        assert (bucket - rows) / bucket < 1 / 3


def test_buckets_are_powers_of_two_and_their_halfway_points():
    assert bucket_sizes(1024) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
