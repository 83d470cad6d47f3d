"""What `monosemantic serve`'s event loop spends per audio message: a real server process, fed by
`monosemantic loadtest` (another process) with N real-time streams, and the CPU time of the server's
threads from /proc over the run. The event loop (the process's main thread) receives every message,
converts it and pushes it into the engine, and sends every event back: at 20 ms frames that is 50
messages a second per stream, on one thread, beside the engine's loop thread in the same process.

    python benchmarks/server_ingest.py --model /tmp/tiny.nemo --streams 32 --seconds 15 --frame-ms 20 100
    python benchmarks/server_ingest.py --model /tmp/tiny.nemo --frame-ms 20 --coalesce both --repeat 3 [--vad]
    python benchmarks/server_ingest.py --model /tmp/tiny.nemo --vad --coalesce on --busy 0.5 --switch-interval-ms 5 0.5

`--coalesce both` alternates clients that send every frame as a message with clients that gather frames
up to the server's step points (engine/coalesce.py): the CPU per stream-second of audio compares the two,
and the partial and VAD-event lags (arrival minus when the audio was spoken) show whether gathering
delayed anything. "us per frame" divides by client frames, however many messages carried them.

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


BUSY_SERVER = """
import sys
sys.path.insert(0, {here!r})
from gil_contention import busy_neighbour
from monosemantic.cli import main
share = float(sys.argv.pop(1))
with busy_neighbour(share):
    main()
""".format(here=os.path.dirname(os.path.abspath(__file__)))


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


def one_run(args, frame_ms: int, coalesce: bool, port: int, switch_ms: float | None = None) -> dict:
    cmd = [sys.executable, "-m", "monosemantic", "serve", "--model", args.model, "--device", args.device,
           "--dtype", args.dtype, "--port", str(port), "--max-streams", str(max(args.streams, 1)),
           "--log-level", "warning"]
    cmd += ["--max-batch", str(args.max_batch)] if args.max_batch else []
    cmd += ["--latency-ms", str(args.latency_ms)] if args.latency_ms else []
    cmd += [] if args.vad else ["--no-vad"]
    cmd += ["--switch-interval-ms", str(switch_ms)] if switch_ms else []
    if args.busy:
        # The same server with a thread beside its loops that runs Python for that share of every 10 ms,
        # as a GPU engine's loop thread does between kernel launches (on a CPU it mostly waits in torch
        # ops, without the GIL).
        cmd[1:3] = ["-c", BUSY_SERVER, str(args.busy)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server)
        before = thread_cpu(server.pid)
        with tempfile.NamedTemporaryFile(suffix=".json") as summary_file:
            subprocess.run(
                [sys.executable, "-m", "monosemantic", "loadtest", "--url", f"ws://127.0.0.1:{port}",
                 "--streams", str(args.streams), "--duration", str(args.seconds), "--frame-ms", str(frame_ms),
                 "--json", summary_file.name] + ([] if coalesce else ["--no-coalesce"]),
                check=False, stdout=subprocess.DEVNULL,  # past capacity it fails; the figures still count
            )
            summary = json.load(open(summary_file.name))
        after = thread_cpu(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    frames = summary["audio_sent_s"] * 1000 / frame_ms  # client frames; coalesced, fewer messages carry them
    loop = after.get(server.pid, 0.0) - before.get(server.pid, 0.0)
    others = sum(v - before.get(t, 0.0) for t, v in after.items() if t != server.pid)
    return {"frame_ms": frame_ms, "coalesce": coalesce, "frames": frames, "audio_s": summary["audio_sent_s"],
            "errors": summary["errors"], "loop_s": loop, "others_s": others,
            "partial_lag": summary["partial_lag_ms"], "vad_lag": summary["vad_lag_ms"],
            "ttf": summary["time_to_final_ms"], "covered": summary["all_audio_covered"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--frame-ms", type=int, nargs="+", default=[20, 100])
    p.add_argument("--vad", action="store_true", help="run the server's VAD (default: --no-vad)")
    p.add_argument("--coalesce", choices=["on", "off", "both"], default="off",
                   help="the client gathers frames up to the server's step points (loadtest's default), or not")
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting, alternated")
    p.add_argument("--port", type=int, default=18777)
    p.add_argument("--device", default="cpu", help="the server's device (cuda: the GPU's capacity of one server)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=0, help="the server's --max-batch (default: its own)")
    p.add_argument("--latency-ms", type=int, default=0, help="the server's latency mode (default: the checkpoint's)")
    p.add_argument("--switch-interval-ms", type=float, nargs="+", default=[None],
                   help="the server's --switch-interval-ms; several values alternate (default: Python's 5 ms)")
    p.add_argument("--busy", type=float, default=0.0,
                   help="a thread in the server process runs Python for this share of every 10 ms (0-1)")
    args = p.parse_args()
    settings = {"on": [True], "off": [False], "both": [False, True]}[args.coalesce]
    print(f"{'frame':>6} {'coalesce':>8} {'frames':>7} {'errors':>6}   event loop: s CPU, us per frame, ms per stream-second"
          f"   other threads: s CPU   partial lag p50/p95 ms   VAD event lag p50/p95 ms   time to final p50/p95 ms")
    for _ in range(args.repeat):
        for frame_ms, coalesce, switch_ms in [(f, c, w) for f in args.frame_ms for c in settings for w in args.switch_interval_ms]:
            r = one_run(args, frame_ms, coalesce, args.port, switch_ms)
            pl, vl = r["partial_lag"], r["vad_lag"]
            switch = f"switch {switch_ms:g} ms  " if switch_ms else ""
            print(f"{switch}{frame_ms:>4}ms {'on' if coalesce else 'off':>8} {r['frames']:>7.0f} {r['errors']:>6}   {r['loop_s']:6.2f} s "
                  f"{r['loop_s'] / r['frames'] * 1e6:7.1f} us {r['loop_s'] / r['audio_s'] * 1e3:7.2f} ms   {r['others_s']:6.2f} s"
                  f"   {pl['p50']:6.1f} / {pl['p95']:6.1f}   {vl['p50']:6.1f} / {vl['p95']:6.1f}"
                  f"   {r['ttf']['p50']:6.1f} / {r['ttf']['p95']:6.1f}{'' if r['covered'] else '   AUDIO NOT COVERED'}", flush=True)


if __name__ == "__main__":
    main()
