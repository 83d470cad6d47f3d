"""Transcription results. Times are integer sample counts at the model's sample rate; adapters convert."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Token:
    """One emitted subword token."""

    id: int  # vocabulary id (SentencePiece piece id)
    text: str  # the piece, with SentencePiece's word-start marker '▁' kept
    start: int  # sample where the token's encoder frame starts
    end: int  # sample where it ends (start + duration frames for TDT, one frame for RNN-T)


@dataclass(frozen=True)
class Word:
    """A word: the tokens from one word-start piece to the next."""

    text: str
    start: int  # samples
    end: int  # samples


@dataclass(frozen=True)
class Transcript:
    """Text of an utterance with token and word timings."""

    text: str
    tokens: list[Token] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    sample_rate: int = 16000  # rate the sample times refer to

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def to_dict(self) -> dict:
        """JSON-friendly form with times in seconds."""
        sr = float(self.sample_rate)
        return {
            "text": self.text,
            "tokens": [
                {"id": t.id, "text": t.text, "start": round(t.start / sr, 3), "end": round(t.end / sr, 3)}
                for t in self.tokens
            ],
            "words": [{"word": w.text, "start": round(w.start / sr, 3), "end": round(w.end / sr, 3)} for w in self.words],
        }
