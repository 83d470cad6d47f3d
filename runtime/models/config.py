"""Architecture description of a NeMo FastConformer transducer, read from its `model_config.yaml`.

Every size the model code uses comes from here; nothing in the model files hard-codes Nemotron's
dimensions. Parsing refuses, by name, every architecture this runtime does not implement, so a checkpoint
is either loaded completely or not at all.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ModelLoadError, UnsupportedModelError

# NeMo model classes we implement, by the last component of their `target`.
TRANSDUCER_CLASSES = {
    "EncDecRNNTBPEModel": False,
    "EncDecHybridRNNTCTCBPEModel": True,  # value: the checkpoint also carries a CTC head
}
# Classes we recognise and refuse with a reason (anything else unknown is refused generically).
REFUSED_CLASSES = {
    "EncDecCTCModel": "CTC-only models are not supported (this runtime decodes transducers: RNN-T/TDT)",
    "EncDecCTCModelBPE": "CTC-only models are not supported (this runtime decodes transducers: RNN-T/TDT)",
    "EncDecMultiTaskModel": "attention-decoder (AED, e.g. Canary) models are not supported",
    "EncDecTransfModelBPE": "attention-decoder (transformer) models are not supported",
    "EncDecRNNTModel": "character-vocabulary RNN-T models are not supported (only SentencePiece BPE)",
    "EncDecHybridRNNTCTCModel": "character-vocabulary hybrid models are not supported (only SentencePiece BPE)",
    "EncDecSpeakerLabelModel": "speaker models are not speech recognizers",
    "EncDecClassificationModel": "classification models are not speech recognizers",
    "SortformerEncLabelModel": "diarization models are not speech recognizers",
}


@dataclass(frozen=True)
class FrontendConfig:
    """Log-mel feature extraction (NeMo's AudioToMelSpectrogramPreprocessor / FilterbankFeatures)."""

    sample_rate: int  # Hz of the audio the model expects
    n_fft: int  # FFT size; the window is zero-padded to it, centred
    win_length: int  # analysis window length in samples
    hop_length: int  # samples between frames
    n_mels: int  # mel bins (rows of the filterbank stored in the checkpoint)
    window: str  # 'hann', 'hamming', 'blackman' or 'bartlett' (symmetric windows)
    preemph: float | None  # pre-emphasis coefficient, None to skip
    log: bool  # take the log of the mel energies
    log_zero_guard_type: str  # 'add' (log(x + v)) or 'clamp' (log(max(x, v)))
    log_zero_guard_value: float  # the v above
    mag_power: float  # power applied to the STFT magnitude
    normalize: str | None  # 'per_feature', 'all_features' or None; both need the whole utterance
    pad_value: float  # value of frames past the valid length


@dataclass(frozen=True)
class EncoderConfig:
    """FastConformer encoder (NeMo's ConformerEncoder with rel-pos attention)."""

    feat_in: int  # input features (== FrontendConfig.n_mels)
    n_layers: int
    d_model: int
    n_heads: int
    ff_expansion_factor: int  # feed-forward hidden = d_model * this
    subsampling: str  # 'dw_striding' or 'striding'
    subsampling_factor: int  # power of two: time reduction of the conv front
    subsampling_conv_channels: int
    causal_downsampling: bool  # causal subsampling convs (pad left k-1, right s-1) vs symmetric
    xscaling: bool  # multiply the subsampled input by sqrt(d_model)
    untie_biases: bool  # per-layer pos_bias_u/v (True) or one shared pair on the encoder (False)
    conv_kernel_size: int  # depthwise conv kernel of the conformer conv module
    conv_norm_type: str  # 'batch_norm' or 'layer_norm' (module keeps NeMo's name `batch_norm`)
    conv_context: tuple[int, int]  # (left, right) context of the depthwise conv
    use_bias: bool  # biases in FF, attention and conv-module layers
    att_context_style: str  # 'regular' or 'chunked_limited'
    att_context_sizes: tuple[tuple[int, int], ...]  # (left, right) per latency mode; [0] is the default

    @property
    def d_ff(self) -> int:
        return self.d_model * self.ff_expansion_factor

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def subsampling_layers(self) -> int:
        return self.subsampling_factor.bit_length() - 1


@dataclass(frozen=True)
class PredictionConfig:
    """RNN-T prediction network: blank-as-pad embedding plus an LSTM stack."""

    vocab_size: int  # tokens excluding blank; blank id == vocab_size
    pred_hidden: int  # embedding size and LSTM output size
    pred_rnn_layers: int
    rnn_hidden_size: int  # LSTM cell size; > pred_hidden means a projected LSTM


@dataclass(frozen=True)
class JointConfig:
    """RNN-T/TDT joint network: enc and pred projections, activation, output linear."""

    encoder_hidden: int
    pred_hidden: int
    joint_hidden: int
    activation: str  # 'relu', 'sigmoid' or 'tanh'
    has_dropout: bool  # NeMo inserts a Dropout, which shifts the output linear to `joint_net.2`
    num_classes: int  # tokens excluding blank
    num_durations: int  # TDT duration outputs after blank (0 for RNN-T)


@dataclass(frozen=True)
class DecodingConfig:
    """Greedy transducer decoding settings from the checkpoint."""

    durations: tuple[int, ...]  # TDT durations in encoder frames; empty for RNN-T
    max_symbols: int | None  # most labels emitted on one frame before time is forced forward


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the model and run it, parsed from one NeMo config."""

    model_class: str
    frontend: FrontendConfig
    encoder: EncoderConfig
    prediction: PredictionConfig
    joint: JointConfig
    decoding: DecodingConfig
    tokenizer_model: str | None  # NeMo's `tokenizer.model_path` (may start with 'nemo:')
    ctc_classes: int | None  # hybrid RNNT-CTC: CTC output classes (incl. blank); None otherwise
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def is_tdt(self) -> bool:
        return len(self.decoding.durations) > 0

    @property
    def blank_id(self) -> int:
        return self.prediction.vocab_size

    @property
    def frame_samples(self) -> int:
        """Audio samples per encoder output frame (80 ms at 16 kHz for factor-8 models)."""
        return self.frontend.hop_length * self.encoder.subsampling_factor

    @property
    def cache_aware(self) -> bool:
        """True when the encoder can stream with bounded caches and give exactly its offline output:
        causal subsampling, a causal depthwise conv, no utterance-level feature normalization and an
        attention pattern whose every mode has a finite left context and sees at most its own chunk."""
        enc = self.encoder
        if not enc.causal_downsampling or enc.conv_context[1] != 0 or self.frontend.normalize:
            return False
        for left, right in enc.att_context_sizes:
            if left < 0 or right < 0:
                return False
            if enc.att_context_style == "regular" and right != 0:
                return False
        return True


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if cfg is not None else default
    return default if value is None else value


def _switch(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    """A boolean option: NeMo tests it for truth, so an explicit null is off (not the default)."""
    return bool(cfg.get(key, default))


def _class_name(target: str | None) -> str:
    return (target or "").rsplit(".", 1)[-1]


def _refuse(name: str, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{name}: unsupported architecture: {why}")


# What int(), float(), len() and indexing raise on an entry of the wrong type or shape, or a missing key.
_MALFORMED = (KeyError, ValueError, TypeError, IndexError, AttributeError)


def _positive(config, *fields: str):
    """`config`, after checking that its sizes `fields` are positive: torch fails building a module of a
    zero or negative size with a bare error (or builds an empty one)."""
    bad = [f"{f}={getattr(config, f)}" for f in fields if getattr(config, f) <= 0]
    if bad:
        raise ValueError(f"sizes must be positive: {', '.join(bad)}")
    return config


@contextmanager
def _section(name: str, part: str):
    """Turn a missing or malformed entry of the config's `part` into a ModelLoadError that says where."""
    try:
        yield
    except _MALFORMED as exc:
        what = f"no entry {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ModelLoadError(
            f"{name}: model_config.yaml has a missing or malformed entry in its {part} section ({what})"
        ) from None


def parse_frontend(cfg: Mapping[str, Any], name: str) -> FrontendConfig:
    cls = _class_name(cfg.get("_target_"))
    if cls != "AudioToMelSpectrogramPreprocessor":
        raise _refuse(name, f"preprocessor {cls or '?'} (only AudioToMelSpectrogramPreprocessor)")
    sample_rate = int(_get(cfg, "sample_rate", 16000))
    # NeMo derives sample counts from seconds with int() truncation; n_window_* override.
    win = cfg.get("n_window_size") or int(float(_get(cfg, "window_size", 0.02)) * sample_rate)
    hop = cfg.get("n_window_stride") or int(float(_get(cfg, "window_stride", 0.01)) * sample_rate)
    n_fft = cfg.get("n_fft") or 2 ** (int(win) - 1).bit_length()
    if int(_get(cfg, "frame_splicing", 1)) != 1:
        raise _refuse(name, "preprocessor frame_splicing > 1")
    if _get(cfg, "exact_pad", False) or _get(cfg, "stft_exact_pad", False):
        raise _refuse(name, "preprocessor exact_pad=True")
    if _get(cfg, "stft_conv", False):
        raise _refuse(name, "preprocessor stft_conv=True")
    window = str(_get(cfg, "window", "hann"))
    # Not 'none' (rectangular): NeMo keeps no window buffer for it, so its checkpoint would not load
    # strictly, and NeMo's own STFT fails on it.
    if window not in ("hann", "hamming", "blackman", "bartlett"):
        raise _refuse(name, f"preprocessor window '{window}'")
    guard_type = str(_get(cfg, "log_zero_guard_type", "add"))
    guard_value = _get(cfg, "log_zero_guard_value", 2**-24)
    if guard_type not in ("add", "clamp") or isinstance(guard_value, str):
        raise _refuse(name, f"preprocessor log_zero_guard {guard_type}/{guard_value}")
    normalize = cfg.get("normalize", "per_feature")
    if isinstance(normalize, str) and normalize in ("per_feature", "all_features"):
        pass
    elif not normalize or isinstance(normalize, str):
        normalize = None  # NeMo treats any other string (e.g. "NA") as no normalization
    else:
        raise _refuse(name, f"preprocessor normalize={normalize!r} (fixed mean/std)")
    preemph = cfg.get("preemph", 0.97)
    frontend = FrontendConfig(
        sample_rate=sample_rate,
        n_fft=int(n_fft),
        win_length=int(win),
        hop_length=int(hop),
        n_mels=int(_get(cfg, "features", _get(cfg, "nfilt", 64))),
        window=window,
        preemph=None if preemph is None else float(preemph),
        log=_switch(cfg, "log", True),
        log_zero_guard_type=guard_type,
        log_zero_guard_value=float(guard_value),
        mag_power=float(_get(cfg, "mag_power", 2.0)),
        normalize=normalize,
        pad_value=float(_get(cfg, "pad_value", 0.0)),
    )
    return _positive(frontend, "sample_rate", "n_fft", "win_length", "hop_length", "n_mels")


def _context_sizes(cfg: Mapping[str, Any], style: str, name: str) -> tuple[tuple[int, int], ...]:
    sizes = cfg.get("att_context_size")
    if not sizes:
        sizes = [[-1, -1]]
    if isinstance(sizes[0], int):  # a single [left, right] pair
        sizes = [sizes]
    out = []
    for s in sizes:
        if len(s) != 2:
            raise _refuse(name, f"att_context_size entry {s} (expected [left, right])")
        left, right = int(s[0]), int(s[1])
        if style == "chunked_limited" and right >= 0 and left > 0 and left % (right + 1):
            raise _refuse(name, f"att_context_size {s}: left context must be a multiple of right+1")
        out.append((left, right))
    return tuple(out)


def parse_encoder(cfg: Mapping[str, Any], name: str) -> EncoderConfig:
    cls = _class_name(cfg.get("_target_"))
    if cls != "ConformerEncoder":
        raise _refuse(name, f"encoder {cls or '?'} (only ConformerEncoder / FastConformer)")
    attn = str(_get(cfg, "self_attention_model", "rel_pos"))
    if attn != "rel_pos":
        raise _refuse(name, f"self_attention_model '{attn}' (only rel_pos)")
    style = str(_get(cfg, "att_context_style", "regular"))
    if style not in ("regular", "chunked_limited"):
        raise _refuse(name, f"att_context_style '{style}'")
    if _get(cfg, "reduction", None) and int(_get(cfg, "reduction_factor", 1)) > 1:
        raise _refuse(name, "encoder time reduction (reduction_factor > 1)")
    subsampling = str(_get(cfg, "subsampling", "striding"))
    factor = int(_get(cfg, "subsampling_factor", 4))
    if subsampling not in ("dw_striding", "striding") or factor < 2 or factor & (factor - 1):
        raise _refuse(name, f"subsampling '{subsampling}' x{factor} (only dw_striding/striding, power of 2)")
    d_model = int(cfg["d_model"])
    feat_out = int(_get(cfg, "feat_out", -1))
    if feat_out > 0 and feat_out != d_model:
        raise _refuse(name, "encoder feat_out projection")
    if str(_get(cfg, "conv_context_style", "regular")) != "regular":
        raise _refuse(name, f"conv_context_style '{cfg.get('conv_context_style')}'")
    kernel = int(_get(cfg, "conv_kernel_size", 31))
    context = cfg.get("conv_context_size")
    if context is None:
        conv_context = ((kernel - 1) // 2, (kernel - 1) // 2)
    elif context == "causal":
        conv_context = (kernel - 1, 0)
    else:
        conv_context = (int(context[0]), int(context[1]))
        if sum(conv_context) + 1 != kernel:
            raise _refuse(name, f"conv_context_size {list(context)} does not match kernel {kernel}")
    norm = str(_get(cfg, "conv_norm_type", "batch_norm"))
    if norm not in ("batch_norm", "layer_norm"):
        raise _refuse(name, f"conv_norm_type '{norm}' (only batch_norm, layer_norm)")
    n_heads = int(_get(cfg, "n_heads", 4))
    if n_heads <= 0:
        raise ValueError(f"sizes must be positive: n_heads={n_heads}")
    if d_model % n_heads:
        raise _refuse(name, f"d_model {d_model} not divisible by n_heads {n_heads}")
    channels = int(_get(cfg, "subsampling_conv_channels", -1))
    encoder = EncoderConfig(
        feat_in=int(cfg["feat_in"]),
        n_layers=int(cfg["n_layers"]),
        d_model=d_model,
        n_heads=n_heads,
        ff_expansion_factor=int(_get(cfg, "ff_expansion_factor", 4)),
        subsampling=subsampling,
        subsampling_factor=factor,
        subsampling_conv_channels=d_model if channels == -1 else channels,
        causal_downsampling=bool(_get(cfg, "causal_downsampling", False)),
        xscaling=_switch(cfg, "xscaling", True),
        untie_biases=_switch(cfg, "untie_biases", True),
        conv_kernel_size=kernel,
        conv_norm_type=norm,
        conv_context=conv_context,
        use_bias=_switch(cfg, "use_bias", True),
        att_context_style=style,
        att_context_sizes=_context_sizes(cfg, style, name),
    )
    return _positive(
        encoder, "feat_in", "n_layers", "d_model", "ff_expansion_factor", "subsampling_conv_channels", "conv_kernel_size"
    )


def parse_model_config(cfg: Mapping[str, Any], name: str) -> ModelConfig:
    """Parse a NeMo model config (the dict of `model_config.yaml`); raise UnsupportedModelError for an
    architecture we do not run, ModelLoadError for a missing or malformed entry."""
    with _section(name, "top-level"):
        return _parse_model_config(cfg, name)


def _parse_model_config(cfg: Mapping[str, Any], name: str) -> ModelConfig:
    cls = _class_name(cfg.get("target"))
    if cls in REFUSED_CLASSES:
        raise _refuse(name, f"{cls}: {REFUSED_CLASSES[cls]}")
    if cls and cls not in TRANSDUCER_CLASSES:
        raise _refuse(name, f"model class {cls} (supported: {', '.join(TRANSDUCER_CLASSES)})")
    for part in ("preprocessor", "encoder", "decoder", "joint"):
        if not isinstance(cfg.get(part), Mapping):
            what = "an attention decoder or CTC-only model" if part in ("decoder", "joint") else "incomplete"
            raise _refuse(name, f"no '{part}' section in the config ({what})")
    with _section(name, "tokenizer"):
        tok = cfg.get("tokenizer") or {}
        tok_type = str(tok.get("type", "")) if tok else ""
        tokenizer_model = tok.get("model_path")
        if tokenizer_model is not None and not isinstance(tokenizer_model, str):
            raise TypeError(f"tokenizer.model_path is {type(tokenizer_model).__name__}, not a path")
    if tok_type != "bpe":
        raise _refuse(name, f"tokenizer type '{tok_type or 'none (character labels)'}' (only SentencePiece 'bpe')")

    with _section(name, "decoder"):
        dec = cfg["decoder"]
        if _class_name(dec.get("_target_")) != "RNNTDecoder":
            raise _refuse(name, f"decoder {_class_name(dec.get('_target_'))} (only RNNTDecoder with an LSTM)")
        if dec.get("normalization_mode") or not _switch(dec, "blank_as_pad", True):
            raise _refuse(name, "prediction network with normalization or without blank_as_pad")
        prednet = dec.get("prednet") or {}
        vocab_size = int(dec["vocab_size"])
        pred_hidden = int(prednet["pred_hidden"])
        rnn_hidden = int(_get(prednet, "rnn_hidden_size", -1))
        prediction = PredictionConfig(
            vocab_size=vocab_size,
            pred_hidden=pred_hidden,
            pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
            rnn_hidden_size=rnn_hidden if rnn_hidden > 0 else pred_hidden,
        )
        _positive(prediction, "vocab_size", "pred_hidden", "pred_rnn_layers")

    with _section(name, "decoding"):
        decoding = cfg.get("decoding") or {}
        model_type = str(_get(decoding, "model_type", "rnnt"))
        durations = tuple(int(d) for d in (_get(decoding, "durations", []) or []))
        if model_type == "multiblank" or _get(decoding, "big_blank_durations", []):
            raise _refuse(name, "multi-blank transducer")
        if model_type not in ("rnnt", "tdt"):
            raise _refuse(name, f"decoding model_type '{model_type}'")
        # As in NeMo's RNNTDecoding, non-empty durations make the model TDT; model_type is not read there
        # (RNNTDecodingConfig defaults it to 'rnnt', so a TDT config may carry durations without it).
        if model_type == "tdt" and not durations:
            raise _refuse(name, "TDT model without decoding.durations")
        greedy = decoding.get("greedy") or {}
        # As NeMo's RNNTDecoding: `max_symbols or max_symbols_per_step`, the latter 10 unless the checkpoint
        # sets it (RNNTDecodingConfig's default, merged under the checkpoint's config): a null or 0
        # max_symbols means 10, not 'no cap'; only an explicit null max_symbols_per_step lifts the cap.
        max_symbols = greedy.get("max_symbols") or greedy.get("max_symbols_per_step", 10)
        if max_symbols is not None:
            max_symbols = int(max_symbols)
            if max_symbols <= 0:  # NeMo's greedy decoders refuse it too
                raise ValueError(f"greedy max_symbols must be positive or null, got {max_symbols}")
        decoding_config = DecodingConfig(durations=durations, max_symbols=max_symbols)

    with _section(name, "encoder"):
        encoder = parse_encoder(cfg["encoder"], name)
    with _section(name, "preprocessor"):
        frontend = parse_frontend(cfg["preprocessor"], name)
    if frontend.n_mels != encoder.feat_in:
        raise _refuse(name, f"preprocessor gives {frontend.n_mels} features but encoder takes {encoder.feat_in}")

    with _section(name, "joint"):
        joint = cfg["joint"]
        if _class_name(joint.get("_target_")) != "RNNTJoint":
            raise _refuse(name, f"joint {_class_name(joint.get('_target_'))} (only RNNTJoint)")
        jointnet = joint.get("jointnet") or {}
        activation = str(jointnet.get("activation", "relu")).lower()
        if activation not in ("relu", "sigmoid", "tanh"):
            raise _refuse(name, f"joint activation '{activation}'")
        extra = int(_get(joint, "num_extra_outputs", 0))
        if extra != len(durations):
            raise _refuse(name, f"joint has {extra} extra outputs but {len(durations)} TDT durations")
        joint_config = JointConfig(
            encoder_hidden=int(_get(jointnet, "encoder_hidden", encoder.d_model)),
            pred_hidden=int(_get(jointnet, "pred_hidden", pred_hidden)),
            joint_hidden=int(jointnet["joint_hidden"]),
            activation=activation,
            has_dropout=bool(_get(jointnet, "dropout", 0.0)),
            num_classes=int(_get(joint, "num_classes", vocab_size)),
            num_durations=len(durations),
        )
        _positive(joint_config, "encoder_hidden", "pred_hidden", "joint_hidden", "num_classes")

    ctc_classes = None
    if TRANSDUCER_CLASSES.get(cls):
        with _section(name, "aux_ctc"):
            aux = (cfg.get("aux_ctc") or {}).get("decoder") or {}
            ctc_classes = int(aux.get("num_classes", vocab_size)) + 1

    return ModelConfig(
        model_class=cls or "EncDecRNNTBPEModel",
        frontend=frontend,
        encoder=encoder,
        prediction=prediction,
        joint=joint_config,
        decoding=decoding_config,
        tokenizer_model=tokenizer_model,
        ctc_classes=ctc_classes,
        raw=cfg,
    )
