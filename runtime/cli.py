"""Command line: `monosemantic transcribe FILE... [--model M] [--device D] [--dtype T] [--latency-ms N]
[--stream [--realtime]] [--json]`,
`monosemantic bench`, `monosemantic serve` (WebSocket server) and `monosemantic loadtest` (its load test).

Every error a user can cause prints one line on stderr and exits non-zero; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import MonosemanticError

PIECE_MS = 20  # --stream feeds audio in pieces of this size, as a WebRTC track delivers it


def _parser() -> argparse.ArgumentParser:
    from .asr import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="monosemantic", description="Streaming speech recognition runtime.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("transcribe", help="transcribe audio files (wav, flac, ogg/opus, mp3: what libsndfile reads; any rate and channel count)")
    tr.add_argument("files", nargs="+", metavar="FILE")
    tr.add_argument("--model", default=DEFAULT_MODEL, help=f"Hugging Face repo id, .nemo file or checkpoint dir (default {DEFAULT_MODEL})")
    tr.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    tr.add_argument("--dtype", default="auto", help="encoder precision: auto (float32), float32, bfloat16, float16")
    tr.add_argument("--latency-ms", type=int, default=None, help="streaming latency mode (default: the checkpoint's); for a full-context model's --stream, how often the partial is recomputed (default 1000)")
    tr.add_argument("--stream", action="store_true", help=f"feed the audio in {PIECE_MS} ms pieces through the streaming path, showing partials")
    tr.add_argument("--realtime", action="store_true", help="with --stream, feed at real-time pace")
    tr.add_argument("--json", action="store_true", help="one JSON object per line; a final line per file")
    from .bench import command as bench_command
    from .client import loadtest
    from .server import command as serve_command

    bench_command.add_parser(sub)
    serve_command.add_parser(sub)
    loadtest.add_parser(sub)
    return parser


class _Printer:
    """Renders partials and finals: JSON lines, an updating line on a terminal, or plain lines."""

    def __init__(self, as_json: bool, label: str | None):
        self.as_json = as_json
        self.label = label
        self.live = sys.stdout.isatty() and not as_json
        self.last = None

    def _prefix(self) -> str:
        return f"{self.label}: " if self.label else ""

    def partial(self, file: str, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.as_json:
            print(json.dumps({"file": file, "type": "partial", "text": text}), flush=True)
        elif self.live:
            print(f"\r\033[K{self._prefix()}{text}", end="", flush=True)
        else:
            print(f"{self._prefix()}... {text}", flush=True)

    def final(self, file: str, transcript) -> None:
        if self.as_json:
            print(json.dumps({"file": file, "type": "final", **transcript.to_dict()}), flush=True)
        elif self.live:
            print(f"\r\033[K{self._prefix()}{transcript.text}", flush=True)
        else:
            print(f"{self._prefix()}{transcript.text}", flush=True)


def _stream_file(model, audio, args, printer: _Printer, file: str):
    stream = model.new_stream(latency_ms=args.latency_ms, sample_rate=model.sample_rate)
    piece = model.sample_rate * PIECE_MS // 1000
    started = time.monotonic()
    for i in range(0, len(audio), piece):
        if stream.feed(audio[i : i + piece]):
            printer.partial(file, stream.transcript().text)
        if args.realtime:
            ahead = (i + piece) / model.sample_rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return stream.finalize()


def _transcribe(args) -> int:
    from .asr import load_model
    from .audio import check_audio_path, load_audio_file

    if args.realtime and not args.stream:
        raise ValueError("--realtime paces --stream: add --stream, or leave --realtime out")
    # A mistyped name is said at once, before loading (maybe downloading) the model; the other files
    # still run, as cat or grep go on past a missing one, and the exit status says one failed.
    files = []
    for file in args.files:
        try:
            check_audio_path(file)
        except MonosemanticError as exc:
            print(f"monosemantic: error: {exc}", file=sys.stderr, flush=True)
        else:
            files.append(file)
    if not files:
        return 1
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    # Reject a bad --latency-ms before reading any file. A full-context model has no latency modes, but
    # its stream takes latency_ms as the interval its partial is recomputed at: new_stream checks that.
    if args.stream and not model.cache_aware:
        model.new_stream(latency_ms=args.latency_ms)
    else:
        model.context_for(args.latency_ms)
    failed = len(args.files) - len(files)
    for file in files:
        # A name that is not UTF-8 is held with surrogates, which a strict UTF-8 stdout cannot print.
        label = os.fsencode(os.path.basename(file)).decode("utf-8", "replace")
        printer = _Printer(args.json, label if len(args.files) > 1 else None)
        try:
            audio = load_audio_file(file, model.sample_rate)
            if args.stream:
                result = _stream_file(model, audio, args, printer, file)
            else:
                result = model.transcribe(audio, latency_ms=args.latency_ms, sample_rate=model.sample_rate)
        except MonosemanticError as exc:
            print(f"monosemantic: error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        printer.final(file, result)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            return _transcribe(args)
        if args.command == "bench":
            from .bench.command import run

            return run(args)
        if args.command == "serve":
            from .server.command import run as serve

            return serve(args)
        if args.command == "loadtest":
            from .client.loadtest import run as loadtest

            return loadtest(args)
    except (MonosemanticError, ValueError) as exc:
        print(f"monosemantic: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout has gone (`monosemantic transcribe ... | head -1`): nothing more can be shown.
        # stdout goes to devnull so the interpreter's flush at exit does not raise again (Python's recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
