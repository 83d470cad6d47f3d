"""`monosemantic serve`: one engine shared by WebSocket clients until SIGTERM.

    monosemantic serve --model M [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--max-streams N]
"""

from __future__ import annotations

import argparse
import os

from .config import ServerConfig


def add_parser(sub) -> None:
    from ..asr import DEFAULT_MODEL

    d = ServerConfig()
    p = sub.add_parser("serve", help="serve many streams from one engine over WebSocket (docs/server.md)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face repo id, .nemo file or checkpoint dir (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="encoder precision: auto, float32, bfloat16, float16")
    p.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host}: loopback only)")
    p.add_argument("--port", type=int, default=d.port, help=f"TCP port (default {d.port}; 0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require this key from clients (default: $MONOSEMANTIC_API_KEY; unset: no key)")
    p.add_argument("--max-streams", type=int, default=d.max_streams, help=f"streams served at once (default {d.max_streams})")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"most streams in one encoder step (default {d.max_batch})")
    p.add_argument("--latency-ms", type=int, default=None, help="latency mode of clients that do not ask for one (default: the checkpoint's)")
    p.add_argument("--vad", action=argparse.BooleanOptionalAction, default=d.vad, help="voice activity events (default on)")
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes, help=f"largest WebSocket message (default {d.max_frame_bytes})")
    p.add_argument("--max-buffered-seconds", type=float, default=d.max_buffered_seconds, help=f"unprocessed audio per stream before backpressure (default {d.max_buffered_seconds:g} s)")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_seconds, help=f"close connections silent for this many seconds (default {d.idle_timeout_seconds:g})")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_seconds, help=f"on SIGTERM, seconds given to open streams for their finals (default {d.drain_timeout_seconds:g})")
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="Python's thread switch interval while serving (default: Python's 5 ms; docs/server.md)")
    p.add_argument("--usage-interval", type=float, default=d.usage_interval_seconds, help=f"seconds of processed audio between usage messages (default {d.usage_interval_seconds:g})")
    p.add_argument("--log-format", choices=["text", "json"], default="text", help="default text")
    p.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"], help="default info")


def run(args) -> int:
    from ..errors import missing_dependency

    try:
        import aiohttp  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise missing_dependency(exc.name or "aiohttp", "server", "monosemantic serve") from None
    import asyncio

    from .app import serve
    from .logs import configure_logging

    configure_logging(args.log_format, args.log_level)
    config = ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("MONOSEMANTIC_API_KEY") or None,
        max_streams=args.max_streams,
        max_batch=args.max_batch,
        default_latency_ms=args.latency_ms,
        vad=args.vad,
        max_frame_bytes=args.max_frame_bytes,
        max_buffered_seconds=args.max_buffered_seconds,
        idle_timeout_seconds=args.idle_timeout,
        drain_timeout_seconds=args.drain_timeout,
        usage_interval_seconds=args.usage_interval,
        switch_interval_ms=args.switch_interval_ms,
    )
    return asyncio.run(serve(config))
