"""The WebSocket protocol of `monosemantic serve` as pure functions: parsing what clients send and
turning engine events into JSON messages and back. No aiohttp here, so both the server and the client
use it, and it can be fuzzed on its own. docs/protocol.md is the user-facing description.

Times in messages are seconds of stream audio, written unrounded: `n / 16000` survives the JSON round
trip exactly, so the client recovers the engine's integer sample counts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

from ..engine.scheduler import StepTiming
from ..events import Error, Event, Final, Partial, SpeechEnded, SpeechStarted, Usage
from ..transcript import Token, Word

PROTOCOL_VERSION = 1
STREAM_PATH = "/v1/stream"
MAX_SAMPLE_RATE = 384_000


class ProtocolError(Exception):
    """A message the server cannot act on. `code` is the error message's stable code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---- client -> server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamParams:
    """What a client asks for in the connection URL."""

    latency_ms: int | None
    sample_rate: int


@dataclass(frozen=True)
class Flush:
    """End the utterance: a final covering all audio sent before it follows; with `at`, the audio up to
    that time of the stream (seconds, as event times), the rest starting the next utterance (moved up
    past audio the engine has already encoded: EngineStream.flush)."""

    at: float | None = None

    def at_sample(self, rate: int) -> int | None:
        """`at` as a sample count at the model's `rate` (as event times are read back)."""
        return None if self.at is None else _samples(self.at, rate)


@dataclass(frozen=True)
class Close:
    """End the stream: finals of earlier flushes are delivered, then the server closes (code 1000)."""


Control = Flush | Close
_CONTROLS = {"flush": Flush, "close": Close}
MAX_FLUSH_AT = 10**9  # seconds of a stream's audio (31 years): beyond, the sample count loses precision


def _int_param(query: Mapping[str, str], name: str, default: int | None, low: int, high: int) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    # int() would also take underscores, a sign, outer whitespace and non-ASCII digits.
    if not (raw.isascii() and raw.isdigit()):
        raise ProtocolError("bad_request", f"{name} must be an integer in {low}..{high}, in plain digits, got {raw!r}")
    digits = raw.lstrip("0") or "0"
    # (int() refuses 4,300 digits and more: a long run of them is out of range anyway)
    if len(digits) > len(str(high)) or not low <= int(digits) <= high:
        shown = digits if len(digits) <= 20 else digits[:20] + "..."
        raise ProtocolError("bad_request", f"{name} must be in {low}..{high}, got {shown}")
    return int(digits)


def parse_stream_params(query: Mapping[str, str]) -> StreamParams:
    """The connection's parameters from its query string (`latency_ms`, `sample_rate`)."""
    latency = _int_param(query, "latency_ms", None, 1, 60_000)
    rate = _int_param(query, "sample_rate", 16000, 1000, MAX_SAMPLE_RATE)
    return StreamParams(latency_ms=latency, sample_rate=rate)


def parse_control(text: str) -> Control:
    """A text frame -> a control message; ProtocolError ('bad_json', 'bad_message', 'unknown_type')
    for anything else."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "text frames must be JSON objects such as {\"type\": \"flush\"}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_json", f"text frames must be JSON objects, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("bad_message", "the message has no string 'type' field")
    if kind not in _CONTROLS:
        raise ProtocolError("unknown_type", f"unknown message type {kind[:40]!r}; expected one of {sorted(_CONTROLS)}")
    if kind == "flush":
        at = data.get("at")
        if at is not None and not (type(at) in (int, float) and 0 <= at <= MAX_FLUSH_AT):  # (NaN fails too)
            raise ProtocolError(
                "bad_message", f"a flush's 'at' must be a number of seconds in 0..{MAX_FLUSH_AT}, got {str(at)[:40]}"
            )
        return Flush(None if at is None else float(at))
    return _CONTROLS[kind]()


def check_audio(data: bytes) -> None:
    """Binary frames are 16-bit little-endian mono PCM: an odd byte count cannot be."""
    if len(data) % 2:
        raise ProtocolError("bad_audio", f"binary frames must hold 16-bit PCM samples: got an odd byte count ({len(data)})")


# ---- server -> client ------------------------------------------------------------------------------


def ready_message(
    stream_id: str, latency_ms: int, sample_rate: int, model_sample_rate: int, latency_modes, vad: bool,
    timing: StepTiming | None = None, idle_timeout: float | None = None, model: str | None = None,
) -> dict:
    """`timing`: when the stream's audio makes work; sent as `steps` (and `vad_window` with VAD), so that
    a client may gather small frames up to those points (docs/protocol.md). `idle_timeout`: seconds of
    silence from the client after which the server closes the stream, so that a client whose input
    pauses knows how often to send a keepalive. `model`: the name of the server's model, which a
    client's metrics are labelled with (its own configuration does not say what the server runs)."""
    message = {
        "type": "ready",
        "protocol": PROTOCOL_VERSION,
        "stream_id": stream_id,
        "latency_ms": latency_ms,
        "sample_rate": sample_rate,
        "model_sample_rate": model_sample_rate,
        "latency_modes": list(latency_modes),
        "vad": vad,
    }
    if model is not None:
        message["model"] = model
    if idle_timeout is not None:
        message["idle_timeout"] = idle_timeout
    if timing is not None:
        message["steps"] = {"first": timing.first, "every": timing.every}
        if timing.vad_window is not None:
            message["vad_window"] = timing.vad_window
    return message


def timing_from_ready(ready: dict) -> StepTiming | None:
    """The StepTiming a ready message carries; None when it carries none (a server before the field) or
    a malformed one: the client then sends every push as it comes, as before."""
    steps = ready.get("steps")
    vad_window = ready.get("vad_window")
    if not isinstance(steps, dict):
        return None
    first, every = steps.get("first"), steps.get("every")
    if not all(type(v) is int and v > 0 for v in (first, every)):
        return None
    if vad_window is not None and not (type(vad_window) is int and vad_window > 0):
        return None
    return StepTiming(first, every, vad_window)


def error_message(code: str, message: str, fatal: bool = False, **fields) -> dict:
    """`fatal`: the server closes the stream after this message. `fields`: the code's own extra fields
    (`transcribed_until` of `shutting_down` and `closed`)."""
    return {"type": "error", "code": code, "message": message, "fatal": fatal, **fields}


def event_to_message(event: Event, rate: int) -> dict:
    """An engine event -> its JSON message; sample counts become seconds at the model rate `rate`."""
    if isinstance(event, Partial):
        return {
            "type": "partial", "text": event.text, "stable_text": event.stable_text,
            "start": event.start / rate, "end": event.end / rate,
        }
    if isinstance(event, Final):
        return {
            "type": "final",
            "text": event.text,
            "start": event.start / rate,
            "end": event.end / rate,
            "words": [{"word": w.text, "start": w.start / rate, "end": w.end / rate} for w in event.words],
            "tokens": [{"id": t.id, "text": t.text, "start": t.start / rate, "end": t.end / rate} for t in event.tokens],
        }
    if isinstance(event, SpeechStarted):
        return {"type": "speech_started", "time": event.sample / rate}
    if isinstance(event, SpeechEnded):
        return {"type": "speech_ended", "time": event.sample / rate}
    if isinstance(event, Usage):
        return {"type": "usage", "audio_seconds": event.audio_seconds}
    if isinstance(event, Error):
        return error_message(event.code, event.message, fatal=True)  # engine errors end the stream
    raise TypeError(f"not an event: {event!r}")


def encode(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _samples(seconds, rate: int) -> int:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise ProtocolError("bad_message", f"expected a time in seconds, got {seconds!r}")
    return round(seconds * rate)


def message_to_event(message: dict, rate: int) -> Event | None:
    """A server message -> the engine event it carries (times back to samples at `rate`); None for
    messages that are not events (ready). ProtocolError for a malformed one."""
    try:
        kind = message["type"]
        if kind == "partial":
            return Partial(
                text=str(message["text"]), stable_text=str(message["stable_text"]),
                start=_samples(message.get("start", 0), rate), end=_samples(message.get("end", 0), rate),
            )
        if kind == "final":
            return Final(
                text=str(message["text"]),
                tokens=[Token(int(t["id"]), str(t["text"]), _samples(t["start"], rate), _samples(t["end"], rate)) for t in message.get("tokens", [])],
                words=[Word(str(w["word"]), _samples(w["start"], rate), _samples(w["end"], rate)) for w in message["words"]],
                start=_samples(message["start"], rate),
                end=_samples(message["end"], rate),
            )
        if kind == "speech_started":
            return SpeechStarted(_samples(message["time"], rate))
        if kind == "speech_ended":
            return SpeechEnded(_samples(message["time"], rate))
        if kind == "usage":
            return Usage(float(message["audio_seconds"]))
        if kind == "error":
            return Error(str(message["code"]), str(message["message"]))
        if kind == "ready":
            return None
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        # OverflowError: numbers JSON allows but Python cannot convert (an id of 1e999, a time whose sample
        # count is infinite, an integer too large for a float).
        raise ProtocolError("bad_message", f"malformed {message.get('type')!r} message from the server: {exc!r}") from None
    raise ProtocolError("unknown_type", f"unknown message type from the server: {kind!r}")
