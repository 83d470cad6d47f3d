"""Where `bench` and `loadtest` write their --json reports: checked before a run, so that a typo in the
path costs one line of error instead of the whole run's results."""

from __future__ import annotations

import json
import os

from ..errors import MonosemanticError


def check_writable(path: str, option: str = "--json") -> None:
    """MonosemanticError (one line) unless a file can be written at `path`. Tried for real (opened for
    appending, and removed again when it did not exist): permission bits alone do not tell the truth
    for root, read-only mounts or full disks."""
    if os.path.isdir(path):
        raise MonosemanticError(f"{option} {path}: is a directory, not a file")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise MonosemanticError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None
    if not existed:
        os.unlink(path)


def write_json(path: str, data, option: str = "--json") -> None:
    """Write the report; a failure now (a disk that filled during the run) is one line too."""
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1, default=float)
    except OSError as exc:
        raise MonosemanticError(f"{option} {path}: cannot write the report ({exc.strerror or exc})") from None
