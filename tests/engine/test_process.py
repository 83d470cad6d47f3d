"""What the process does with its running engines at exit and at fork (runtime/engine/process.py)."""

from __future__ import annotations

import weakref

from monosemantic.engine import process


class _Core:
    def __init__(self, fails: bool = False):
        self.fails = fails
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        process.stopped(self)
        if self.fails:
            raise RuntimeError("a stop that failed")


def test_every_running_engine_is_stopped_at_exit_when_one_stop_fails(monkeypatch, caplog):
    """The exit hook stopped the engines one after the other and gave up at the first that raised: the
    ones after it kept their loop threads (and a GPU's work) to the interpreter's end."""
    cores = [_Core(fails=True), _Core(), _Core(fails=True), _Core()]
    monkeypatch.setattr(process, "_running", weakref.WeakSet())
    for core in cores:
        process.started(core)
    process._stop_running()
    assert all(core.stopped for core in cores)
    assert sum("a stop that failed" in r.getMessage() or (r.exc_info and "a stop that failed" in str(r.exc_info[1])) for r in caplog.records) == 2

