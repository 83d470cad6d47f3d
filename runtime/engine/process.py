"""Running engines and their process: each is stopped at interpreter exit, and shut down in a child
forked while it ran.

- Exit: an engine's loop thread is a daemon (it must not keep a process alive), and a daemon thread still
  inside a torch op when the interpreter finalizes aborts the process ("terminate called without an
  active exception", SIGABRT). So every running engine is stopped at exit, also one its owner never
  closed.
- Fork: a child gets a copy of each engine but not its loop thread, and the engine's locks as they were
  at the fork (perhaps held). The child's copies are shut down with fresh locks (EngineCore._orphan), so
  they refuse streams with an error naming the fork instead of taking audio that nobody would step.
  (The child's torch threads are monosemantic.forking's part.)
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref

_log = logging.getLogger("monosemantic.engine")

FORKED = (
    "this engine was started in the process this one was forked from, and its loop thread runs only there: "
    "create the engine after the fork (get_engine() in this process builds a new one on the loaded model)"
)

_running: weakref.WeakSet = weakref.WeakSet()  # EngineCores whose loop thread runs


def started(core) -> None:
    _running.add(core)


def stopped(core) -> None:
    _running.discard(core)


@atexit.register
def _stop_running() -> None:
    for core in list(_running):
        try:
            core.stop()
        except Exception:  # the others still get theirs: a loop thread left running outlives the exit
            _log.exception("stopping an engine at exit failed")


def _orphan_running() -> None:
    for core in list(_running):
        core._orphan()
    _running.clear()


os.register_at_fork(after_in_child=_orphan_running)
