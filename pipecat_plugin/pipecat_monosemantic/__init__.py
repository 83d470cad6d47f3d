"""Pipecat STT service for monosemantic: `from pipecat_monosemantic import MonosemanticSTTService`.

Needs the `pipecat` extra: `pip install 'monosemantic[pipecat]'`.
"""

try:
    import pipecat  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from monosemantic.errors import missing_dependency

    raise missing_dependency("pipecat-ai", "pipecat", "pipecat_monosemantic") from e

from .settings import MonosemanticSTTSettings
from .stt import MONOSEMANTIC_TTFS_P99, MonosemanticSTTService

__all__ = ["MONOSEMANTIC_TTFS_P99", "MonosemanticSTTService", "MonosemanticSTTSettings"]
