"""The whole transducer as one nn.Module tree whose names match NeMo's checkpoint keys, and strict
weight loading."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelLoadError
from .config import ModelConfig
from .conformer import ConformerEncoder
from .frontend import LogMelFrontend
from .transducer import CTCHead, Joint, PredictionNetwork


class _Preprocessor(nn.Module):
    """Holds the frontend under NeMo's name (`preprocessor.featurizer.*`)."""

    def __init__(self, frontend: LogMelFrontend):
        super().__init__()
        self.featurizer = frontend


class TransducerModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = _Preprocessor(LogMelFrontend(cfg.frontend))
        self.encoder = ConformerEncoder(cfg.encoder)
        self.decoder = PredictionNetwork(cfg.prediction)
        self.joint = Joint(cfg.joint)
        if cfg.ctc_classes is not None:
            self.ctc_decoder = CTCHead(cfg.encoder.d_model, cfg.ctc_classes)

    @property
    def frontend(self) -> LogMelFrontend:
        return self.preprocessor.featurizer

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load NeMo weights strictly: every key must match a parameter or buffer of the same shape."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
            if unexpected:
                parts.append(f"unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
            raise ModelLoadError(f"'{source}': weights do not match the architecture in its config: {'; '.join(parts)}")
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ModelLoadError(
                    f"'{source}': weight '{key}' has shape {tuple(value.shape)}, the config implies {tuple(own[key].shape)}"
                )
        # assign=True: the module may have been built on the meta device; its tensors become the checkpoint's.
        self.load_state_dict(state_dict, strict=True, assign=True)
