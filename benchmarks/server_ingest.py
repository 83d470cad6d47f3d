"""What `monosemantic serve`'s event loop spends per audio message: a real server process, fed by
`monosemantic loadtest` (another process) with N real-time streams, and the CPU time of the server's
threads from /proc over the run. The event loop (the process's main thread) receives every message,
converts it and pushes it into the engine, and sends every event back: at 20 ms frames that is 50
messages a second per stream, on one thread, beside the engine's loop thread in the same process.

    python benchmarks/server_ingest.py --model /tmp/tiny.nemo --streams 32 --seconds 15 --frame-ms 20 100

Linux only (/proc). Use a small model with --no-vad (the default here) to keep the engine's share small;
it is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def wait_ready(port: int, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with status {server.returncode}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not become ready")


def one_run(args, frame_ms: int, port: int) -> dict:
    cmd = [sys.executable, "-m", "monosemantic", "serve", "--model", args.model, "--device", "cpu",
           "--port", str(port), "--max-streams", str(max(args.streams, 1)), "--log-level", "warning"]
    server = subprocess.Popen(cmd + ([] if args.vad else ["--no-vad"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server)
        before = thread_cpu(server.pid)
        with tempfile.NamedTemporaryFile(suffix=".json") as summary_file:
            subprocess.run(
                [sys.executable, "-m", "monosemantic", "loadtest", "--url", f"ws://127.0.0.1:{port}",
                 "--streams", str(args.streams), "--duration", str(args.seconds), "--frame-ms", str(frame_ms),
                 "--json", summary_file.name],
                check=True, stdout=subprocess.DEVNULL,
            )
            summary = json.load(open(summary_file.name))
        after = thread_cpu(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    messages = summary["audio_sent_s"] * 1000 / frame_ms
    loop = after.get(server.pid, 0.0) - before.get(server.pid, 0.0)
    others = sum(v - before.get(t, 0.0) for t, v in after.items() if t != server.pid)
    return {"frame_ms": frame_ms, "messages": messages, "audio_s": summary["audio_sent_s"],
            "errors": summary["errors"], "loop_s": loop, "others_s": others}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--frame-ms", type=int, nargs="+", default=[20, 100])
    p.add_argument("--vad", action="store_true", help="run the server's VAD (default: --no-vad)")
    p.add_argument("--port", type=int, default=18777)
    args = p.parse_args()
    print(f"{'frame':>6} {'messages':>9} {'errors':>6}   event loop: s CPU, us per message, ms per stream-second   other threads: s CPU")
    for frame_ms in args.frame_ms:
        r = one_run(args, frame_ms, args.port)
        print(f"{frame_ms:>4}ms {r['messages']:>9.0f} {r['errors']:>6}   {r['loop_s']:6.2f} s {r['loop_s'] / r['messages'] * 1e6:7.1f} us "
              f"{r['loop_s'] / r['audio_s'] * 1e3:7.2f} ms   {r['others_s']:6.2f} s")


if __name__ == "__main__":
    main()
