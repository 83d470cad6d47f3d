"""The settings of MonosemanticSTTService that may change while the pipeline runs.

Pipecat keeps what can change at run time in a settings dataclass (`STTUpdateSettingsFrame(delta=...)`
carries a sparse update of it); what cannot (device, dtype, engine configuration) goes in `__init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipecat.services.settings import STTSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven


@dataclass
class MonosemanticSTTSettings(STTSettings):
    """Runtime-updatable settings of `MonosemanticSTTService`.

    Used in pipecat's two modes: the service's full current state (every field set), and a sparse delta
    in an `STTUpdateSettingsFrame` (unset fields stay `NOT_GIVEN` and are left alone).

    Parameters:
        model: Checkpoint to transcribe with: a Hugging Face repo id or a local `.nemo` path. A change
            loads (or reuses) the process's shared engine for it and takes effect at the next utterance
            boundary, like `latency_ms`. In remote mode (`base_url=`) the server's model is fixed when
            `monosemantic serve` starts: a change is refused with a non-fatal ErrorFrame.
        language: Reported on every transcription frame. The checkpoint decides what it recognises; this
            does not switch its language.
        latency_ms: Chunk size of the cache-aware encoder in milliseconds: one of the checkpoint's
            latency modes (Nemotron Speech streaming: 80, 160, 560, 1120). Lower is faster to text and
            costs more compute per second of audio. `None`: the engine's default mode. A change takes
            effect at the next utterance boundary (the engine stream is reopened then); the utterance in
            progress finishes in the mode it started in.
        interim_results: Push `InterimTranscriptionFrame`s while the user speaks. Takes effect at once.
    """

    latency_ms: int | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    interim_results: bool | NotGiven = field(default_factory=lambda: NOT_GIVEN)
