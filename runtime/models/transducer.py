"""RNN-T / TDT prediction and joint networks (NeMo's RNNTDecoder and RNNTJoint), and the hybrid CTC head.

These stay in fp32 whatever the encoder dtype: they are cheap, and a low-precision argmax flip between
blank and a token would propagate through the LSTM state.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import JointConfig, PredictionConfig
from .skinny import linear


class _LSTMHolder(nn.Module):
    """Holds the LSTM under the name NeMo's LSTMDropout uses (`dec_rnn.lstm.*`)."""

    def __init__(self, cfg: PredictionConfig):
        super().__init__()
        proj = cfg.pred_hidden if cfg.pred_hidden < cfg.rnn_hidden_size else 0
        self.lstm = nn.LSTM(cfg.pred_hidden, cfg.rnn_hidden_size, cfg.pred_rnn_layers, proj_size=proj)


class PredictionNetwork(nn.Module):
    """Blank-as-pad embedding (the blank row is the start-of-sequence input) followed by an LSTM stack."""

    def __init__(self, cfg: PredictionConfig):
        super().__init__()
        self.cfg = cfg
        self.prediction = nn.ModuleDict(
            {
                "embed": nn.Embedding(cfg.vocab_size + 1, cfg.pred_hidden, padding_idx=cfg.vocab_size),
                "dec_rnn": _LSTMHolder(cfg),
            }
        )

    def zero_state(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, c), each [layers, B, hidden]: the LSTM state before the start-of-sequence step."""
        cfg = self.cfg
        h = torch.zeros(cfg.pred_rnn_layers, batch, cfg.pred_hidden, device=device)
        c = torch.zeros(cfg.pred_rnn_layers, batch, cfg.rnn_hidden_size, device=device)
        return h, c

    def step(self, labels: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        """One LSTM step on labels [B] (blank = start of sequence, embedded as zeros).
        Returns (output [B, pred_hidden], new state).

        The cell arithmetic is written out (gate order i, f, g, o, as nn.LSTM): for one time step of a
        small batch, the fused RNN kernels cost milliseconds of setup, the two matmuls microseconds."""
        lstm = self.prediction["dec_rnn"].lstm
        x = self.prediction["embed"](labels)  # [B, H]
        h_all, c_all = state  # [L, B, H], [L, B, H_cell]
        hs, cs = [], []
        for layer in range(lstm.num_layers):
            gates = linear(x, getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"bias_ih_l{layer}"))
            gates = gates + linear(h_all[layer], getattr(lstm, f"weight_hh_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))
            # One sigmoid over all four gates (g's quarter unused) rather than three: on a GPU each is a
            # launch, and decoding is bound by launches. Element by element the values are the same.
            i, f, _, o = torch.sigmoid(gates).chunk(4, dim=1)
            g = torch.tanh(gates.chunk(4, dim=1)[2])
            c = f * c_all[layer] + i * g
            h = o * torch.tanh(c)
            if lstm.proj_size:
                h = linear(h, getattr(lstm, f"weight_hr_l{layer}"))
            hs.append(h)
            cs.append(c)
            x = h
        return x, (torch.stack(hs), torch.stack(cs))


class Joint(nn.Module):
    """logits = joint_net(act(enc(f) + pred(g))); outputs are [tokens, blank, durations...]."""

    def __init__(self, cfg: JointConfig):
        super().__init__()
        self.cfg = cfg
        self.pred = nn.Linear(cfg.pred_hidden, cfg.joint_hidden)
        self.enc = nn.Linear(cfg.encoder_hidden, cfg.joint_hidden)
        act = {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[cfg.activation]
        # NeMo inserts a Dropout when jointnet.dropout > 0, which moves the output linear to index 2.
        layers = [act] + ([nn.Identity()] if cfg.has_dropout else [])
        outputs = cfg.num_classes + 1 + cfg.num_durations
        self.joint_net = nn.Sequential(*layers, nn.Linear(cfg.joint_hidden, outputs))

    def project_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return linear(enc.float(), self.enc.weight, self.enc.bias)

    def project_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        return linear(pred, self.pred.weight, self.pred.bias)

    def forward(self, enc_projected: torch.Tensor, pred_projected: torch.Tensor) -> torch.Tensor:
        """Both already projected, [..., joint_hidden] -> logits [..., outputs]."""
        *activation, out = self.joint_net
        x = enc_projected + pred_projected
        for layer in activation:
            x = layer(x)
        return linear(x, out.weight, out.bias)


class CTCHead(nn.Module):
    """The auxiliary CTC decoder of hybrid RNNT-CTC checkpoints (NeMo's ConvASRDecoder). Loaded so the
    checkpoint loads strictly; transcription uses the transducer head, as NeMo does by default."""

    def __init__(self, d_model: int, num_classes: int):
        super().__init__()
        self.decoder_layers = nn.Sequential(nn.Conv1d(d_model, num_classes, kernel_size=1, bias=True))
