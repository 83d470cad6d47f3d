"""Latency modes of a loaded monosemantic model, as tests iterate them."""

from __future__ import annotations


def latency_contexts(model) -> list[tuple[int | None, tuple[int, int]]]:
    """(latency_ms, attention context) for every mode; one (None, default) for full-context models."""
    if model.latency_modes:
        return [(ms, model.context_for(ms)) for ms in model.latency_modes]
    return [(None, model.context_for(None))]
