"""Live captions in the terminal: a microphone or an audio file -> partials that settle into finals.

    python examples/live_captions.py --mic                       # needs: pip install sounddevice
    python examples/live_captions.py tests/data/jfk.wav          # played at real-time pace
    python examples/live_captions.py tests/data/jfk.wav --fast   # as fast as the engine goes
    python examples/live_captions.py tests/data/jfk.wav --url ws://127.0.0.1:8080   # on a `monosemantic serve`

Each utterance ends where the engine's voice activity detection hears the speaker stop: the example
then flushes the stream, and the utterance's Final replaces the partial line, with its time span.
Options: --model (Hugging Face id or .nemo file), --device, --latency-ms; --url (and --api-key) to use a
`monosemantic serve` instead of a model in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import monosemantic
from monosemantic import Final, Partial, SpeechEnded

FRAME_MS = 20  # the size of the pieces pushed, as a WebRTC track delivers audio


class Captions:
    """Prints the current partial on one updating line, and each final on a line of its own."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.live = sys.stdout.isatty()

    def partial(self, text: str) -> None:
        if self.live:
            print(f"\r\033[K  {text}", end="", flush=True)

    def final(self, event: Final) -> None:
        if not event.text:
            return
        span = f"[{event.start / self.sample_rate:6.2f}-{event.end / self.sample_rate:6.2f}s]"
        print(f"\r\033[K{span} {event.text}" if self.live else f"{span} {event.text}", flush=True)


class Utterances:
    """Flushes the stream and counts the Finals still owed, so the end of input can wait for them."""

    def __init__(self, stream):
        self.stream = stream
        self.owed = 0
        self.closing = False  # closing a stream mid-speech delivers a last SpeechEnded: no flush then
        self.settled = asyncio.Event()
        self.settled.set()

    async def end(self) -> None:
        if self.closing:
            return
        self.owed += 1
        self.settled.clear()
        await self.stream.flush()

    def finalized(self) -> None:
        self.owed -= 1
        if self.owed <= 0:
            self.settled.set()


async def show_events(stream, captions: Captions, utterances: Utterances) -> None:
    """Turn engine events into captions; end the utterance when the VAD hears the speaker stop."""
    async for event in stream:
        if isinstance(event, Partial):
            captions.partial(event.text)
        elif isinstance(event, SpeechEnded):
            await utterances.end()
        elif isinstance(event, Final):
            captions.final(event)
            utterances.finalized()
        elif isinstance(event, monosemantic.Error):
            print(f"\nerror: {event.message}", file=sys.stderr)
            utterances.settled.set()


async def feed_file(stream, path: str, realtime: bool) -> None:
    from monosemantic.audio import load_audio_file

    audio = load_audio_file(path, 16000)
    piece = 16000 * FRAME_MS // 1000
    started = time.monotonic()
    for i in range(0, len(audio), piece):
        await stream.push(audio[i : i + piece])
        if realtime:  # pace like a live source, so the captions appear as they would in a call
            ahead = (i + piece) / 16000 - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)


def open_microphone():
    """The sounddevice module and the default input's own rate, checked before a model is loaded."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:  # OSError: the package is there but PortAudio is not
        raise SystemExit(f"--mic needs the sounddevice package and PortAudio ({exc}); pip install sounddevice")
    try:
        device = sounddevice.query_devices(kind="input")
    except (ValueError, sounddevice.PortAudioError) as exc:  # ValueError: no input device
        raise SystemExit(f"--mic: no microphone to open ({exc})")
    # Many capture devices run at 44.1 or 48 kHz only: open the microphone at its own rate, and the engine
    # stream at that rate too (it resamples), rather than ask PortAudio for 16 kHz and fail.
    return sounddevice, int(device["default_samplerate"])


async def feed_microphone(stream, sounddevice, rate: int) -> None:
    loop = asyncio.get_running_loop()
    frames: asyncio.Queue = asyncio.Queue()

    def on_audio(data, _frames, _time, status):  # PortAudio's thread
        loop.call_soon_threadsafe(frames.put_nowait, bytes(data))

    block = rate * FRAME_MS // 1000
    with sounddevice.RawInputStream(samplerate=rate, channels=1, dtype="int16", blocksize=block, callback=on_audio):
        print("listening (Ctrl-C to stop)", file=sys.stderr)
        while True:
            await stream.push(await frames.get())


async def main(args) -> None:
    microphone, rate = open_microphone() if args.mic else (None, 16000)
    if args.url:
        from monosemantic.client import RemoteEngine

        engine = RemoteEngine(args.url, args.api_key)
    else:
        print(f"loading {args.model} ...", file=sys.stderr)
        engine = await monosemantic.aget_engine(args.model, device=args.device)
    try:
        # A refused open (a wrong key, no server, a latency mode the model lacks) still closes the
        # engine below: a RemoteEngine left open is aiohttp's "Unclosed client session" at exit.
        stream = await engine.open_stream(latency_ms=args.latency_ms, sample_rate=rate)
        await caption(args, stream, microphone, rate)
    finally:
        if args.url:
            await engine.aclose()
        monosemantic.close_shared_engines()


async def caption(args, stream, microphone, rate: int) -> None:
    utterances = Utterances(stream)
    printer = asyncio.create_task(show_events(stream, Captions(16000), utterances))  # event times: 16 kHz
    try:
        if args.mic:
            await feed_microphone(stream, microphone, rate)
        else:
            await feed_file(stream, args.file, realtime=not args.fast)
        await utterances.end()  # the last utterance, whether or not the VAD heard it end
        await utterances.settled.wait()
    finally:
        utterances.closing = True
        await stream.close()
        await printer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="audio file (wav, flac, ogg/opus, mp3; any rate)")
    parser.add_argument("--mic", action="store_true", help="caption the default microphone")
    parser.add_argument("--fast", action="store_true", help="with a file: do not pace at real time")
    parser.add_argument("--model", default=monosemantic.DEFAULT_MODEL, help="Hugging Face id or .nemo file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--latency-ms", type=int, default=160, help="streaming latency mode")
    parser.add_argument("--url", help="recognize on a `monosemantic serve` at this URL instead of loading a model")
    parser.add_argument("--api-key", default=None, help="the server's key (default: $MONOSEMANTIC_API_KEY)")
    args = parser.parse_args(argv)
    if args.file and args.mic:
        parser.error("give an audio file or --mic, not both")
    if not args.file and not args.mic:
        parser.error("give an audio file or --mic")
    return args


if __name__ == "__main__":
    try:
        asyncio.run(main(parse_args()))
    except KeyboardInterrupt:
        pass
    except (monosemantic.MonosemanticError, ValueError) as exc:  # ValueError: a latency mode the model lacks
        sys.exit(f"error: {exc}")
