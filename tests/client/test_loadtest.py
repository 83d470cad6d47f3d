"""`monosemantic loadtest` as a user runs it: Ctrl-C mid-run ends it quietly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)


def test_ctrl_c_mid_run_exits_130_without_asyncio_noise(ms_model):
    """Ctrl-C while streams run: exit status 130 and nothing but asyncio-free output (it printed
    "_GatheringFuture exception was never retrieved" and a CancelledError traceback)."""
    from _support.server import RunningServer, with_default_sigint

    with RunningServer(ms_model("nemotron_rnnt")) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monosemantic", "loadtest", "--url", f"ws://127.0.0.1:{server.port}",
             "--streams", "2", "--duration", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=with_default_sigint,
        )
        try:
            assert server.wait_until(lambda: server.open_streams() >= 1, timeout=60)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, stderr
    assert "never retrieved" not in stderr and "Traceback" not in stderr, stderr
