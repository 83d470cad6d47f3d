"""Allocator thresholds: after keep_freed_memory, a freed block of a step's size is reused without the
kernel mapping its pages in again."""

from __future__ import annotations

import ctypes
import resource
import sys

import pytest

from monosemantic.engine.malloc import keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults_touching(nbytes: int) -> int:
    """Page faults of malloc, write every page, free. glibc's own malloc, not a torch tensor: torch asks
    for 64-byte aligned blocks, and whether a freed block can serve the next aligned request of the same
    size depends on where it fell in the heap (on what the process allocated before), which made this
    test pass or fail with the imports before it; the thresholds are what is tested here."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(nbytes)
    assert block
    ctypes.memset(block, 1, nbytes)  # every page written once
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_blocks_stay_mapped():
    assert keep_freed_memory()
    assert keep_freed_memory()  # again: a no-op that still reports the thresholds set
    nbytes = 24 << 20  # a step's largest temporaries at batch 32 are about 10 MB
    pages = nbytes // resource.getpagesize()
    _faults_touching(nbytes)  # the first time maps the pages in
    # Default glibc would hand a block this size back to the kernel on free and fault in every page again.
    assert _faults_touching(nbytes) < pages // 20
