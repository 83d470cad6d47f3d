"""Torch's OpenMP thread pool across os.fork.

GNU OpenMP (torch's intra-op pool on Linux) does not survive a fork: a child forked after its parent ran
a multithreaded op waits forever at its own first one, for workers that exist only in the parent. This
happens with multiprocessing's default start method on Linux before Python 3.14, and with gunicorn
`--preload`, whenever the parent transcribed before forking or ran an engine. So once this process has
run a model (`model_ran`), a child forked from it runs one intra-op thread, which does not use the pool,
and is told so. A parent that only loaded its model keeps every thread in its children: loading runs no
parallel op, unless it converts weights on the host (a checkpoint stored in half precision, or an
encoder dtype other than float32 on the CPU), which counts as running one.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("monosemantic")

_ran = False  # this process has run a model (transcribe, a stream, an engine)


def model_ran() -> None:
    """Note that this process is about to run model code (called before the first op, so the note is
    there whatever happens after)."""
    global _ran
    _ran = True


def _after_fork_in_child() -> None:
    if not _ran:
        return
    import torch

    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        log.warning(
            "this process was forked after its parent ran a model: it runs one torch intra-op thread (torch's "
            "OpenMP pool does not survive a fork, and more threads would wait forever); start worker "
            "processes with the 'spawn' or 'forkserver' method, or fork before running a model, to keep them all"
        )


os.register_at_fork(after_in_child=_after_fork_in_child)
