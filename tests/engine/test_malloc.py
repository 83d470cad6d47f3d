"""Allocator thresholds: after keep_freed_memory, a freed block of a step's size is reused without the
kernel mapping its pages in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from monosemantic.engine.malloc import keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults_touching(nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(nbytes // 4, dtype=torch.float32)
    block.fill_(1.0)  # every page written once
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_stay_mapped():
    assert keep_freed_memory()
    assert keep_freed_memory()  # again: a no-op that still reports the thresholds set
    nbytes = 24 << 20  # a step's largest temporaries at batch 32 are about 10 MB
    pages = nbytes // resource.getpagesize()
    _faults_touching(nbytes)  # the first time maps the pages in
    # Default glibc would hand a block this size back to the kernel on free and fault in every page again.
    assert _faults_touching(nbytes) < pages // 20
