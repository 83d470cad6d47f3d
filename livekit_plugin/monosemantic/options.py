"""The STT's options: what `STT(...)` takes and `update_options(...)` may change."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class STTOptions:
    latency_ms: int
    """Streaming latency mode (chunk duration) of new engine streams; one of the checkpoint's modes
    (the Nemotron streaming checkpoints: 80, 160, 560, 1120). Changed on a live stream, it takes effect
    at the next utterance boundary (the engine stream is reopened there)."""

    language: str
    """Language code put on every transcript (the model does not detect language)."""

    interim_results: bool
    """Send INTERIM_TRANSCRIPT events while the user speaks."""

    def validate(self) -> None:
        if not isinstance(self.latency_ms, int) or isinstance(self.latency_ms, bool) or self.latency_ms <= 0:
            raise ValueError(f"latency_ms must be a positive integer (a latency mode of the model), got {self.latency_ms!r}")
        if not isinstance(self.language, str) or not self.language:
            raise ValueError(f"language must be a non-empty language code, got {self.language!r}")
        if not isinstance(self.interim_results, bool):
            raise ValueError(f"interim_results must be True or False, got {self.interim_results!r}")
