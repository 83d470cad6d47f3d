"""Events a stream delivers, as plain dataclasses. Times are integer sample counts at the model's sample
rate (16 kHz), counted from the stream's first sample; adapters convert to seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .transcript import Token, Word


@dataclass(frozen=True)
class Partial:
    """The current utterance's hypothesis changed. `stable_text` is the prefix that will not change
    (with greedy decoding every emitted token is final, so it equals `text`). Neither holds a character
    whose bytes are still arriving (a byte-fallback tokenizer spells rare characters as byte pieces): it
    appears once complete, so both are always a prefix of the utterance's later text."""

    text: str
    stable_text: str
    start: int = 0  # sample where the utterance's audio starts (the previous flush point)
    end: int = 0  # sample up to which the utterance's audio has been transcribed


@dataclass(frozen=True)
class Final:
    """The transcript of one utterance: all audio pushed after the previous flush and before this one."""

    text: str
    tokens: list[Token] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    start: int = 0  # sample where the utterance's audio starts
    end: int = 0  # sample where it ends (the flush point)


@dataclass(frozen=True)
class SpeechStarted:
    """Voice activity began (VAD), at `sample`."""

    sample: int


@dataclass(frozen=True)
class SpeechEnded:
    """Voice activity ended (VAD), at `sample`."""

    sample: int


@dataclass(frozen=True)
class Usage:
    """Audio processed since the previous Usage event."""

    audio_seconds: float


@dataclass(frozen=True)
class Error:
    """Something went wrong for this stream, which it ends. `code` is stable and machine-readable:
    'internal' (a failed step), 'closed' (the engine shut down), 'overloaded' (audio of cancelled pushes
    piled up beyond the stream's buffer)."""

    code: str
    message: str


Event = Union[Partial, Final, SpeechStarted, SpeechEnded, Usage, Error]
