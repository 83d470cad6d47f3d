"""Tiny random NeMo checkpoints, built at test time with NeMo's own classes.

The real models (Nemotron streaming, Parakeet) cannot be downloaded here, and
tests must not depend on the model hub anyway.  Instead every architecture the
runtime supports is reproduced at a tiny size from an OmegaConf config, its
weights are randomised so that *every* parameter influences the output (NeMo
initialises norms to 1/0 and positional biases to 0, which would hide loader
bugs), and it is saved with ``model.save_to`` -- so the runtime loads exactly
the file layout, state-dict keys and ``model_config.yaml`` NeMo produces.

Random transducers are degenerate: blank wins everywhere or nowhere, and a
token that wins once tends to repeat max_symbols times per frame.  So after
randomisation a data-dependent init (``calibrate_``) runs on the speech clips
in ``tests/data``: it standardises the subsampling stack and the joint
projections, discourages immediate repeats, and bisects the blank bias with
NeMo's own greedy decoding until about a quarter of encoder frames emit
tokens (TDT durations are balanced the same way).  Transcripts then differ
between clips and between streaming look-ahead modes.

Builds are bit-reproducible (fixed seeds, single-threaded torch during the
build, float64 calibration maths) and take ~1-4 s per variant on a laptop
CPU after NeMo's ~8 s import.  NeMo is imported lazily.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import logging as _pylogging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SAMPLE_RATE = 16000

#: Env var naming a persistent cache directory (reused across processes; the
#: subdirectory is keyed by a fingerprint of this file and library versions).
CACHE_ENV = "MONOSEMANTIC_NEMO_CKPT_CACHE"

# Calibration targets (see calibrate_): fraction of encoder frames on which
# greedy decoding emits at least one token, and of frames where the aux CTC
# head's argmax is not blank.
FRAMES_WITH_TOKENS = 0.25
CTC_EMIT_RATE = 0.35
BISECTION_STEPS = 10
# Target argmax distribution over TDT durations [0, 1, 2, 3, 4].
TDT_DURATION_TARGET = (0.15, 0.35, 0.25, 0.15, 0.10)


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

# Transcripts of the clips in tests/data (kept inline so the tokenizer does not
# change if the manifest does) plus generic English so the BPE merges cover
# common letters, pieces and words.
CORPUS: tuple[str, ...] = (
    "and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them",
    "he was not an ill disposed young man",
    "unless to be rather cold hearted and rather selfish is to be ill disposed",
    "had he married a more a amiable woman he might have been made still more respectable than he was",
    "he might even have been made amiable himself",
    "and so my fellow americans ask not what your country can do for you ask what you can do for your country",
    "he began a confused complaint against the wizard who had vanished behind the curtain on the left",
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore every single morning",
    "please call stella and ask her to bring these things with her from the store",
    "six spoons of fresh snow peas five thick slabs of blue cheese and maybe a snack for her brother bob",
    "we also need a small plastic snake and a big toy frog for the kids",
    "she can scoop these things into three red bags and we will go meet her wednesday at the train station",
    "when the sunlight strikes raindrops in the air they act as a prism and form a rainbow",
    "the rainbow is a division of white light into many beautiful colors",
    "these take the shape of a long round arch with its path high above",
    "there is according to legend a boiling pot of gold at one end",
    "people look but no one ever finds it",
    "when a man looks for something beyond his reach his friends say he is looking for the pot of gold",
    "it was the best of times it was the worst of times",
    "it was the age of wisdom it was the age of foolishness",
    "call me ishmael some years ago never mind how long precisely",
    "having little or no money in my purse and nothing particular to interest me on shore",
    "i thought i would sail about a little and see the watery part of the world",
    "all happy families are alike each unhappy family is unhappy in its own way",
    "the weather today will be cloudy with a chance of rain in the afternoon",
    "turn left at the next corner and then walk straight for two blocks",
    "could you please repeat that a little more slowly",
    "the meeting has been moved to thursday at three o'clock",
    "thank you very much for your help with the project",
    "i would like to order a coffee and a piece of chocolate cake",
    "the train to the city leaves every fifteen minutes",
    "our voice assistant should answer quickly and clearly",
    "speech recognition turns spoken words into written text",
    "the children played in the garden until the sun went down",
    "a large black dog was sleeping in front of the fire",
    "they walked along the river and talked about the future",
    "every morning she reads the news before going to work",
    "the old house at the end of the street has been empty for years",
    "he opened the window and let the cold fresh air into the room",
    "we should check the results again before we publish them",
    "the music was so loud that nobody could hear the phone ringing",
    "my brother and my sister are coming to visit us next week",
    "what time does the store open on sunday morning",
    "the doctor told him to drink more water and sleep well",
    "this is a simple test of the streaming transcription system",
    "numbers like one two three four five six seven eight nine and ten",
    "yesterday we went to the museum and saw very old paintings",
)

DEFAULT_VOCAB_SIZE = 100


def train_tokenizer(out_dir: os.PathLike | str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train a small SentencePiece BPE tokenizer in NeMo's ``bpe`` tokenizer-dir layout; returns ``out_dir``.

    NeMo's ``_setup_monolingual_tokenizer`` registers three artifacts from the
    directory: ``tokenizer.model`` (required), ``vocab.txt`` (required too:
    ``register_artifact`` fails if it is missing) and ``tokenizer.vocab``
    (optional).  All three are written, ``vocab.txt`` in the format of NeMo's
    ``create_spt_model`` (word-initial pieces without the ``▁``,
    continuations prefixed ``##``).  Training runs single-threaded from an
    in-memory corpus, so the model bytes do not depend on any file path and
    are identical on every run.
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        bos_id=-1,  # NeMo ASR tokenizers: no <s>/</s>; <unk> is id 0
        eos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    # Same "piece<TAB>score" lines SentencePiece writes next to a file-trained model.
    (out_dir / "tokenizer.vocab").write_text("".join(f"{p}\t{s:g}\n" for p, s in pieces), encoding="utf-8")
    _write_nemo_vocab_txt(out_dir)
    return out_dir


def _write_nemo_vocab_txt(tokenizer_dir: Path) -> None:
    """Derive ``vocab.txt`` from ``tokenizer.vocab`` exactly as NeMo's create_spt_model does."""
    special = {"<s>", "</s>", "<pad>", "<unk>"}
    tokens = []
    for line in (tokenizer_dir / "tokenizer.vocab").read_text(encoding="utf-8").splitlines():
        piece = line.split("\t")[0]
        if piece in special:
            continue
        token = piece[1:] if piece.startswith("▁") else f"##{piece}"
        if token:
            tokens.append(token)
    (tokenizer_dir / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------

NEMOTRON_CONTEXTS = ((70, 13), (70, 6), (70, 1), (70, 0))


@dataclass(frozen=True)
class Variant:
    """One tiny architecture.  Every field maps onto a NeMo config key."""

    name: str
    summary: str
    hybrid: bool = False  # EncDecHybridRNNTCTCBPEModel (aux CTC head) instead of EncDecRNNTBPEModel
    # preprocessor (AudioToMelSpectrogramPreprocessor)
    features: int = 128
    normalize: str = "NA"
    pad_to: int = 0
    # encoder (ConformerEncoder)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ff_expansion_factor: int = 4
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 32
    causal_downsampling: bool = True
    # A tuple of (left, right) pairs = multi-look-ahead model; a single pair
    # written flat, like Parakeet's config ([-1, -1]).
    att_context_size: tuple = NEMOTRON_CONTEXTS
    att_context_style: str = "chunked_limited"
    xscaling: bool = True
    untie_biases: bool = True
    conv_kernel_size: int = 9
    conv_norm_type: str = "layer_norm"
    conv_context_size: Optional[str] = "causal"
    use_bias: bool = False
    # prediction network / joint
    pred_hidden: int = 32
    pred_rnn_layers: int = 2
    joint_hidden: int = 32
    joint_activation: str = "relu"
    # dropout > 0 inserts a Dropout module, moving the final Linear from
    # joint.joint_net.1 to joint.joint_net.2 (the layout of released models).
    joint_dropout: float = 0.0
    tdt_durations: Optional[tuple[int, ...]] = None
    max_symbols: int = 10
    seed: int = 0

    @property
    def is_tdt(self) -> bool:
        return bool(self.tdt_durations)

    @property
    def att_context_sizes(self) -> list[list[int]]:
        """All look-ahead modes as a list of [left, right] (first = default)."""
        if isinstance(self.att_context_size[0], int):
            return [list(self.att_context_size)]
        return [list(c) for c in self.att_context_size]


_NEMOTRON = Variant(
    name="nemotron_rnnt",
    summary=(
        "Nemotron-like cache-aware streaming RNN-T: 128 mels, normalize NA, causal dw_striding x8, "
        "chunked_limited multi-look-ahead [[70,13],[70,6],[70,1],[70,0]], xscaling, untied pos biases, "
        "causal conv + LayerNorm, no biases, 2-layer LSTM, joint relu without dropout (joint_net.1)"
    ),
    seed=11,
)

_PARAKEET_TDT = Variant(
    name="parakeet_tdt",
    summary=(
        "Parakeet-like offline TDT: 80 mels, per_feature normalize, pad_to 16, non-causal dw_striding x8, "
        "full attention [-1,-1], no xscaling, untied pos biases, symmetric conv + BatchNorm, no biases, "
        "1-layer LSTM, durations [0..4], joint dropout (joint_net.2)"
    ),
    features=80,
    normalize="per_feature",
    pad_to=16,
    causal_downsampling=False,
    att_context_size=(-1, -1),
    att_context_style="regular",
    xscaling=False,
    conv_norm_type="batch_norm",
    conv_context_size=None,
    pred_rnn_layers=1,
    joint_dropout=0.1,
    tdt_durations=(0, 1, 2, 3, 4),
    seed=31,
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _NEMOTRON,
        replace(
            _NEMOTRON,
            name="nemotron_tdt",
            summary="nemotron_rnnt encoder with a TDT head (durations [0..4], 5 extra joint outputs), joint dropout (joint_net.2)",
            tdt_durations=(0, 1, 2, 3, 4),
            joint_dropout=0.1,
            seed=21,
        ),
        _PARAKEET_TDT,
        replace(
            _PARAKEET_TDT,
            name="parakeet_rnnt",
            summary=(
                "parakeet_tdt encoder as plain RNN-T with biases everywhere (use_bias), tied/shared "
                "encoder.pos_bias_u/v (untie_biases false), joint tanh without dropout (joint_net.1)"
            ),
            tdt_durations=None,
            use_bias=True,
            untie_biases=False,
            joint_activation="tanh",
            joint_dropout=0.0,
            seed=41,
        ),
        replace(
            _NEMOTRON,
            name="hybrid_rnnt_ctc",
            summary=(
                "EncDecHybridRNNTCTCBPEModel: Nemotron-like encoder without xscaling, look-aheads "
                "[[70,1],[70,0]], 1-layer LSTM, RNN-T joint dropout (joint_net.2) + aux CTC ConvASRDecoder"
            ),
            hybrid=True,
            xscaling=False,
            att_context_size=((70, 1), (70, 0)),
            pred_rnn_layers=1,
            joint_dropout=0.1,
            seed=51,
        ),
    )
}


def model_config(variant: Variant, tokenizer_dir: os.PathLike | str) -> dict[str, Any]:
    """NeMo model config (the ``model:`` section of a training yaml) for ``variant``.

    Mirrors NeMo's fastconformer example configs; keys that only matter for
    training (datasets, optim, spec_augment) are omitted.  ``sample_rate`` at
    top level is required: ``transcribe()`` on numpy audio reads ``cfg.sample_rate``.
    """
    v = variant
    durations = list(v.tdt_durations) if v.is_tdt else None
    att_context_size = (
        list(v.att_context_size) if isinstance(v.att_context_size[0], int) else [list(c) for c in v.att_context_size]
    )
    cfg: dict[str, Any] = {
        "sample_rate": SAMPLE_RATE,
        "log_prediction": False,
        "compute_eval_loss": False,
        "model_defaults": {
            "enc_hidden": v.d_model,
            "pred_hidden": v.pred_hidden,
            "joint_hidden": v.joint_hidden,
        },
        "tokenizer": {"dir": str(tokenizer_dir), "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE,
            "normalize": v.normalize,
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": v.features,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1.0e-05,
            "pad_to": v.pad_to,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": v.features,
            "feat_out": -1,
            "n_layers": v.n_layers,
            "d_model": v.d_model,
            "subsampling": "dw_striding",
            "subsampling_factor": v.subsampling_factor,
            "subsampling_conv_channels": v.subsampling_conv_channels,
            "causal_downsampling": v.causal_downsampling,
            "ff_expansion_factor": v.ff_expansion_factor,
            "self_attention_model": "rel_pos",
            "n_heads": v.n_heads,
            "att_context_size": att_context_size,
            "att_context_style": v.att_context_style,
            "xscaling": v.xscaling,
            "untie_biases": v.untie_biases,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": v.conv_kernel_size,
            "conv_norm_type": v.conv_norm_type,
            "conv_context_size": v.conv_context_size,
            "use_bias": v.use_bias,
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
            "stochastic_depth_drop_prob": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None,
            "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {
                "pred_hidden": v.pred_hidden,
                "pred_rnn_layers": v.pred_rnn_layers,
                "t_max": None,
                "dropout": 0.0,
            },
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None,
            "preserve_memory": False,
            "fuse_loss_wer": True,
            "fused_batch_size": 4,
            "jointnet": {
                "joint_hidden": v.joint_hidden,
                "activation": v.joint_activation,
                "dropout": v.joint_dropout,
            },
        },
        "decoding": {
            "strategy": "greedy_batch",
            "greedy": {"max_symbols": v.max_symbols},
        },
        "loss": {"loss_name": "default"},
    }
    if v.is_tdt:
        # NeMo decides "this is TDT" from decoding.durations, which
        # set_decoding_type_according_to_loss copies from loss.tdt_kwargs.durations;
        # the joint needs num_extra_outputs = len(durations).
        cfg["model_defaults"]["tdt_durations"] = durations
        cfg["model_defaults"]["num_tdt_durations"] = len(durations)
        cfg["joint"]["num_extra_outputs"] = len(durations)
        cfg["decoding"]["model_type"] = "tdt"
        cfg["decoding"]["durations"] = durations
        cfg["loss"] = {
            "loss_name": "tdt",
            "tdt_kwargs": {
                "fastemit_lambda": 0.0,
                "clamp": -1.0,
                "durations": durations,
                "sigma": 0.02,
                "omega": 0.1,
            },
        }
    if v.hybrid:
        cfg["aux_ctc"] = {
            "ctc_loss_weight": 0.3,
            "use_cer": False,
            "ctc_reduction": "mean_batch",
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": None,
                "num_classes": -1,
                "vocabulary": [],
            },
            "decoding": {"strategy": "greedy_batch"},
        }
    return cfg


# --------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_nemo(level: int = _pylogging.ERROR):
    """Silence NeMo's (very chatty) logger for the duration of the block."""
    from nemo.utils import logging as nemo_logging

    previous = nemo_logging.get_verbosity()
    nemo_logging.set_verbosity(level)
    try:
        yield
    finally:
        nemo_logging.set_verbosity(previous)


def build_model(variant: Variant | str, tokenizer_dir: os.PathLike | str):
    """Instantiate ``variant`` with NeMo's classes, randomise and calibrate it; returns it in eval mode."""
    if isinstance(variant, str):
        variant = VARIANTS[variant]
    from omegaconf import OmegaConf

    with quiet_nemo(), single_thread():
        from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel, EncDecRNNTBPEModel

        cls = EncDecHybridRNNTCTCBPEModel if variant.hybrid else EncDecRNNTBPEModel
        cfg = OmegaConf.create(model_config(variant, tokenizer_dir))
        # fork_rng: seed the default initialisers without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(variant.seed)
            model = cls(cfg=cfg)
        model.eval()
        generator = torch.Generator().manual_seed(variant.seed + 1)
        randomize_parameters_(model, generator)
        calibrate_(model, variant, load_calibration_audio(), generator)
    return model


@contextlib.contextmanager
def single_thread():
    """Run torch single-threaded for the block.

    Two reasons: bit-reproducible builds (the reduction order of multi-threaded
    kernels varies), and speed -- calibration runs thousands of tiny ops, and
    on a small, busy machine OpenMP's spinning worker threads make those up to
    100x slower when another process holds the cores.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_checkpoint(
    name: str, out_dir: os.PathLike | str, tokenizer_dir: os.PathLike | str | None = None
) -> Path:
    """Build variant ``name`` and save it as ``out_dir/<name>.nemo``; returns that path.

    The file is written under a temporary name and renamed, so a concurrent
    reader never sees a half-written checkpoint.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer_dir = train_tokenizer(out_dir / "tokenizer")
    model = build_model(VARIANTS[name], tokenizer_dir)
    path = out_dir / f"{name}.nemo"
    tmp = out_dir / f".{name}.{os.getpid()}.nemo"
    with quiet_nemo():
        model.save_to(str(tmp))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------
# Randomisation and calibration
# --------------------------------------------------------------------------


@torch.no_grad()
def randomize_parameters_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Make every parameter and normalisation statistic non-trivial.

    Default initialisers already give Linear/Conv/LSTM/Embedding weights random
    values.  What they leave trivial -- LayerNorm/BatchNorm affine params (1/0),
    positional biases pos_bias_u/v (0), zero-initialised biases, BatchNorm
    running stats (0/1) -- would let a loader that drops or transposes them pass
    unnoticed, so each constant tensor gets N(0, 0.1) noise added, LSTM biases
    (forget-gate 1.0 init) get the same noise, and BatchNorm running stats are
    redrawn.  The embedding row of the blank (padding_idx) stays zero like in
    trained models: NeMo's start-of-sequence is a zero vector and relies on it.
    """

    def noise(t: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
        return scale * torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)

    seen: set[int] = set()
    for _, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        flat = param.detach().reshape(-1)
        if flat.numel() > 0 and bool((flat == flat[0]).all()):
            param.add_(noise(param))
    for module in model.modules():
        if isinstance(module, torch.nn.LSTM):
            for name, param in module.named_parameters():
                if name.startswith("bias"):
                    param.add_(noise(param))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.copy_(noise(module.running_mean))
            var = torch.rand(module.running_var.shape, generator=generator, dtype=torch.float32)
            module.running_var.copy_(0.5 + var)


def load_calibration_audio() -> list[np.ndarray]:
    """All speech clips in tests/data as float32 mono 16 kHz arrays (sorted by file name)."""
    import soundfile as sf

    clips = []
    for path in calibration_audio_paths():
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        if sr != SAMPLE_RATE:
            raise ValueError(f"{path}: expected {SAMPLE_RATE} Hz, got {sr}")
        clips.append(np.ascontiguousarray(audio.mean(axis=1)))
    if not clips:
        raise FileNotFoundError(f"no calibration audio in {DATA_DIR}")
    return clips


def calibration_audio_paths() -> list[Path]:
    """The .wav/.flac files of tests/data, sorted by name."""
    return sorted(p for p in DATA_DIR.iterdir() if p.suffix.lower() in {".wav", ".flac"})


@torch.no_grad()
def _features(model, audios: Sequence[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Preprocessor output (features, lengths) per clip, with pad_to=0 as in ``transcribe()``."""
    featurizer = model.preprocessor.featurizer
    pad_to, featurizer.pad_to = featurizer.pad_to, 0
    try:
        out = []
        for audio in audios:
            signal = torch.from_numpy(audio)[None]
            out.append(model.preprocessor(input_signal=signal, length=torch.tensor([signal.shape[1]])))
        return out
    finally:
        featurizer.pad_to = pad_to


@torch.no_grad()
def _standardize_pre_encode_(model, feats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Data-dependent init of the subsampling stack (as in LSUV), so the encoder actually hears the audio.

    Log-mels sit around -10 with per-frame variation of a few units; pushed
    through random convs + ReLUs, the constant part dominates and the encoder
    output barely changes over time.  Each conv feeding an activation gets its
    bias shifted so its output is zero-mean per channel on the calibration
    clips, and the final ``out`` Linear is rescaled/shifted to zero-mean,
    unit-variance outputs.  Only weight values change, not the architecture.
    """
    pre_encode = model.encoder.pre_encode
    layers = list(pre_encode.conv)  # not named_children(): one ReLU instance is reused
    targets = [
        conv
        for conv, after in zip(layers, layers[1:])
        if isinstance(conv, torch.nn.Conv2d) and not isinstance(after, torch.nn.Conv2d)
    ]

    def channel_stats(module: torch.nn.Module, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        captured = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.movedim(channel_dim, -1)))
        try:
            for feat, length in feats:
                pre_encode(x=feat.transpose(1, 2), lengths=length)
        finally:
            handle.remove()
        stacked = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
        return stacked.mean(0), stacked.std(0)

    for conv in targets:
        if conv.bias is not None:
            conv.bias -= channel_stats(conv, 1)[0]
    mean, std = channel_stats(pre_encode.out, -1)
    pre_encode.out.weight /= std[:, None]
    pre_encode.out.bias.copy_((pre_encode.out.bias - mean) / std)


@torch.no_grad()
def _standardize_linear_(linear: torch.nn.Linear, inputs: torch.Tensor) -> None:
    """Rescale/shift ``linear`` so its outputs on ``inputs`` [N, in] are zero-mean, unit-variance per unit."""
    out = linear(inputs)
    mean, std = out.mean(0), out.std(0)
    linear.weight /= std[:, None]
    linear.bias.copy_((linear.bias - mean) / std)


@torch.no_grad()
def _encoder_batch(model, feats: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder outputs of every clip under every look-ahead mode, as a padded batch ([B, D, T], [B])."""
    encoder = model.encoder
    contexts = [list(c) for c in encoder.att_context_size_all]
    outputs = []
    try:
        for context in contexts:
            encoder.set_default_att_context_size(context)
            for feat, length in feats:
                enc, enc_len = encoder(audio_signal=feat, length=length)
                outputs.append(enc[0, :, : int(enc_len[0])])
    finally:
        encoder.set_default_att_context_size(contexts[0])
    lengths = torch.tensor([out.shape[1] for out in outputs])
    batch = torch.zeros(len(outputs), outputs[0].shape[0], int(lengths.max()))
    for i, out in enumerate(outputs):
        batch[i, :, : out.shape[1]] = out
    return batch, lengths


@torch.no_grad()
def _decoder_outputs(model, generator: torch.Generator, n_seq: int = 32, seq_len: int = 8) -> torch.Tensor:
    """Prediction-network outputs [M, H] for start-of-sequence and random token histories."""
    targets = torch.randint(0, model.decoder.vocab_size, (n_seq, seq_len), generator=generator)
    g, _ = model.decoder.predict(targets, state=None, add_sos=True, batch_size=n_seq)
    return g.reshape(-1, g.shape[-1])


@dataclass
class DecodeStats:
    """What greedy decoding produced on a batch of encoder outputs."""

    tokens_per_frame: float
    frames_with_tokens: float  # fraction of encoder frames with >= 1 emitted token
    max_symbols_frames: float  # fraction of encoder frames that hit max_symbols
    distinct_ids: int
    distinct_transcripts: int


@torch.no_grad()
def decode_stats(model, enc: torch.Tensor, lengths: torch.Tensor) -> DecodeStats:
    """Run the model's own greedy decoding on encoder outputs [B, D, T] and summarise it."""
    hyps = model.decoding.rnnt_decoder_predictions_tensor(
        encoder_output=enc, encoded_lengths=lengths, return_hypotheses=True
    )
    max_symbols = model.cfg.decoding.greedy.get("max_symbols", 10)
    n_tokens = n_frames = n_max = 0
    ids, transcripts = set(), set()
    for hyp in hyps:
        tokens = [int(t) for t in hyp.y_sequence]
        per_frame = np.bincount(np.asarray([int(t) for t in hyp.timestamp], dtype=np.int64))
        n_tokens += len(tokens)
        n_frames += int((per_frame > 0).sum())
        n_max += int((per_frame >= max_symbols).sum())
        ids.update(tokens)
        transcripts.add(tuple(tokens))
    total = int(lengths.sum())
    return DecodeStats(n_tokens / total, n_frames / total, n_max / total, len(ids), len(transcripts))


@torch.no_grad()
def calibrate_(model, variant: Variant, audios: Sequence[np.ndarray], generator: torch.Generator) -> None:
    """Data-dependent init so greedy decoding of speech emits a realistic, varied token stream.

    Random transducers are degenerate in two ways: blank wins everywhere or
    nowhere, and once a token wins at a frame the decoder loops on it up to
    max_symbols times.  In order:

    1. standardise the subsampling stack so the encoder output follows the
       audio (see ``_standardize_pre_encode_``);
    2. standardise the joint's encoder / prediction projections on real
       encoder frames and decoder states so both move the joint input
       equally (by default the encoder's constant part dominates and the
       argmax ignores what was already emitted);
    3. discourage immediate repeats (``_discourage_repeats_``);
    4. shift token biases so no single token wins everywhere;
    5. refit the blank row to track the best token logit (``_fit_blank_row_``),
       which makes emission far less bursty;
    6. TDT: shift duration biases towards TDT_DURATION_TARGET;
    7. bisect the blank bias, running NeMo's own greedy decoding on the
       calibration batch, until FRAMES_WITH_TOKENS of encoder frames emit;
       TDT: then re-fit durations on what decoding actually emits
       (``_fit_tdt_durations_``);
    8. hybrid: the aux CTC head gets step 4 and a blank-bias quantile (CTC_EMIT_RATE).

    Parameter updates are computed in float64 so that BLAS rounding noise
    (which depends on memory alignment) cannot change the float32 result.
    """
    feats = _features(model, audios)
    _standardize_pre_encode_(model, feats)

    joint = model.joint
    final = joint.joint_net[-1]
    vocab = joint.num_classes_with_blank - 1 - joint.num_extra_outputs  # tokens; blank at index `vocab`

    enc, lengths = _encoder_batch(model, feats)
    frames = torch.cat([enc[i, :, :n].T for i, n in enumerate(lengths.tolist())])
    dec = _decoder_outputs(model, generator)
    _standardize_linear_(joint.enc, frames)
    _standardize_linear_(joint.pred, dec)
    _discourage_repeats_(model, generator)

    hidden = joint.joint_net[:-1](joint.enc(frames)[:, None, :] + joint.pred(dec)[None, :, :])
    hidden = hidden.reshape(-1, hidden.shape[-1])
    hidden = hidden[torch.randperm(hidden.shape[0], generator=generator)[:20000]].double()

    def logits() -> torch.Tensor:
        return hidden @ final.weight.double().T + final.bias.double()

    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    _add_(final.bias[:vocab], _balance_argmax(logits()[:, :vocab], uniform))
    _fit_blank_row_(final, hidden, vocab)
    if variant.is_tdt:
        n_dur = joint.num_extra_outputs
        target = torch.tensor(TDT_DURATION_TARGET[:n_dur], dtype=torch.float64)
        _add_(final.bias[-n_dur:], _balance_argmax(logits()[:, -n_dur:], target / target.sum()))

    scores = logits()
    margin = scores[:, :vocab].max(dim=-1).values - scores[:, vocab]
    lo, hi = torch.quantile(margin, 0.001).item() - 1.0, torch.quantile(margin, 0.999).item() + 1.0
    _bisect_blank_bias_(model, enc, lengths, lo, hi, BISECTION_STEPS)
    if variant.is_tdt:
        _fit_tdt_durations_(model, enc, lengths)

    if variant.hybrid:
        _calibrate_ctc_(model.ctc_decoder.decoder_layers[0], frames.double(), vocab)


@torch.no_grad()
def _bisect_blank_bias_(model, enc: torch.Tensor, lengths: torch.Tensor, lo: float, hi: float, steps: int) -> None:
    """Set the blank bias (offset in [lo, hi] from its current value) so FRAMES_WITH_TOKENS of frames emit."""
    final = model.joint.joint_net[-1]
    blank = model.decoder.blank_idx
    base = float(final.bias[blank])
    for _ in range(steps):  # more blank bias -> fewer frames with tokens
        mid = 0.5 * (lo + hi)
        final.bias[blank] = base + mid
        if decode_stats(model, enc, lengths).frames_with_tokens > FRAMES_WITH_TOKENS:
            lo = mid
        else:
            hi = mid
    final.bias[blank] = base + 0.5 * (lo + hi)


@torch.no_grad()
def _fit_tdt_durations_(model, enc: torch.Tensor, lengths: torch.Tensor, rounds: int = 3) -> None:
    """Move TDT duration biases until the durations of *emitted tokens* follow TDT_DURATION_TARGET.

    Balancing on random (frame, state) pairs is not enough: greedy decoding
    visits particular states and one or two durations still win every
    emission.  Each round decodes the calibration batch with a private
    decoding object that reports token durations (the model's own decoding
    config is left untouched), shifts the duration biases by the log-ratio
    of target to observed frequencies, and re-bisects the blank bias
    because durations change how many frames are visited.
    """
    from nemo.collections.asr.parts.submodules.rnnt_decoding import RNNTBPEDecoding
    from omegaconf import open_dict

    cfg = copy.deepcopy(model.cfg.decoding)
    with open_dict(cfg):
        cfg.tdt_include_token_duration = True
    decoding = RNNTBPEDecoding(decoding_cfg=cfg, decoder=model.decoder, joint=model.joint, tokenizer=model.tokenizer)
    final = model.joint.joint_net[-1]
    n_dur = model.joint.num_extra_outputs
    target = torch.tensor(TDT_DURATION_TARGET[:n_dur], dtype=torch.float64)
    target = target / target.sum()
    for _ in range(rounds):
        hyps = decoding.rnnt_decoder_predictions_tensor(
            encoder_output=enc, encoded_lengths=lengths, return_hypotheses=True
        )
        durations = torch.tensor([int(d) for h in hyps for d in h.token_duration], dtype=torch.int64)
        index = torch.bucketize(durations, torch.tensor(list(cfg.durations)))  # duration value -> output index
        freq = torch.bincount(index, minlength=n_dur).double()
        freq = freq / max(1.0, float(freq.sum()))
        shift = 0.5 * (target.log() - (freq + 0.02).log())
        _add_(final.bias[-n_dur:], shift - shift.mean())
        _bisect_blank_bias_(model, enc, lengths, -1.0, 1.0, 7)


@torch.no_grad()
def _calibrate_ctc_(conv: torch.nn.Conv1d, frames: torch.Tensor, vocab: int) -> None:
    """Balance the CTC head's token argmax and let tokens beat blank on CTC_EMIT_RATE of frames."""

    def logits() -> torch.Tensor:  # the 1x1 Conv1d as a matmul: [N, vocab + 1]
        return frames @ conv.weight.double()[:, :, 0].T + conv.bias.double()

    uniform = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    _add_(conv.bias[:vocab], _balance_argmax(logits()[:, :vocab], uniform))
    scores = logits()
    margin = scores[:, :vocab].max(dim=-1).values - scores[:, vocab]
    _add_(conv.bias[vocab : vocab + 1], torch.quantile(margin, 1.0 - CTC_EMIT_RATE)[None])


@torch.no_grad()
def _discourage_repeats_(model, generator: torch.Generator, strength: float = 2.0) -> None:
    """Make each token's output row point away from the decoder state its own emission produces.

    The prediction network's output is dominated by the last token, so
    feeding token k moves the joint input along a direction d_k.  Removing
    d_k from row W_k and adding ``-strength * |W_k| * d_k`` means "just emitted
    k" lowers k's score -- what trained models learn, and what stops the
    k, k, k, ... loops up to max_symbols that random weights produce.
    """
    joint, final = model.joint, model.joint.joint_net[-1]
    vocab = model.decoder.vocab_size
    history = torch.randint(0, vocab, (vocab, 4), generator=generator)
    history[:, -1] = torch.arange(vocab)
    g, _ = model.decoder.predict(history, state=None, add_sos=False, batch_size=vocab)
    d = joint.pred(g[:, -1]).double()
    d = d - d.mean(0)
    d = d / d.norm(dim=1, keepdim=True)
    rows = final.weight[:vocab].double()
    rows = rows - (rows * d).sum(1, keepdim=True) * d
    rows = rows - strength * rows.norm(dim=1, keepdim=True) * d
    final.weight[:vocab] = rows.to(final.weight.dtype)


@torch.no_grad()
def _fit_blank_row_(final: torch.nn.Linear, hidden: torch.Tensor, vocab: int) -> None:
    """Least-squares fit of the blank row (weight + bias) to the best token logit on ``hidden`` (float64).

    Afterwards blank rises and falls with the strongest token, so whether a
    token wins depends on the specific (frame, decoder state) pair rather
    than on a few "loud" frames or "sticky" states -- emissions spread over
    frames instead of coming in max_symbols bursts.  The bisection in
    ``calibrate_`` then sets the overall rate via the blank bias.
    """
    token_logits = hidden @ final.weight[:vocab].double().T + final.bias[:vocab].double()
    design = torch.cat([hidden, torch.ones(hidden.shape[0], 1, dtype=hidden.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, token_logits.max(dim=-1).values[:, None]).solution[:, 0]
    final.weight[vocab] = solution[:-1].to(final.weight.dtype)
    final.bias[vocab] = solution[-1].to(final.bias.dtype)


def _balance_argmax(logits: torch.Tensor, target: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Bias shift that moves the argmax histogram of ``logits`` [N, K] towards ``target`` [K]."""
    shift = torch.zeros(logits.shape[1], dtype=logits.dtype)
    floor = 0.1 / logits.shape[0]
    for _ in range(steps):
        counts = torch.bincount((logits + shift).argmax(-1), minlength=logits.shape[1]).to(logits.dtype)
        shift += 0.5 * (target.log() - (counts / counts.sum() + floor).log())
    return shift - shift.mean()


def _add_(param_slice: torch.Tensor, delta: torch.Tensor) -> None:
    """In-place ``param_slice += delta`` with the sum formed in float64 and rounded once."""
    param_slice.copy_((param_slice.double() + delta).to(param_slice.dtype))


# --------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------

_BUILT: dict[tuple[Path, str], Path] = {}
_SESSION_DIR: Optional[Path] = None


def _fingerprint() -> str:
    """Key for the persistent cache: this file's source and the libraries that shape a checkpoint."""
    import nemo
    import sentencepiece

    h = hashlib.sha256(Path(__file__).read_bytes())
    for part in (nemo.__version__, torch.__version__, sentencepiece.__version__):
        h.update(part.encode())
    for path in sorted(DATA_DIR.iterdir()):  # calibration audio
        if path.suffix.lower() in {".wav", ".flac"}:
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$MONOSEMANTIC_NEMO_CKPT_CACHE/<fingerprint>`` if set, else a per-process temp dir removed at exit."""
    global _SESSION_DIR
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / _fingerprint()
    if _SESSION_DIR is None:
        _SESSION_DIR = Path(tempfile.mkdtemp(prefix="monosemantic-nemo-ckpts-"))
        atexit.register(shutil.rmtree, _SESSION_DIR, True)
    return _SESSION_DIR


def get_tokenizer_dir(cache_dir: os.PathLike | str | None = None) -> Path:
    """The shared tokenizer dir inside the cache, trained on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tok_dir = cache_dir / "tokenizer"
    if not (tok_dir / "vocab.txt").exists():
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=_ensure_dir(cache_dir)))
        train_tokenizer(staging)
        try:
            os.rename(staging, tok_dir)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    return tok_dir


def get_checkpoint(name: str, cache_dir: os.PathLike | str | None = None) -> Path:
    """Path to the ``.nemo`` for variant ``name``, building it at most once per process/cache dir."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (cache_dir.resolve() if cache_dir.exists() else cache_dir, name)
    if key in _BUILT and _BUILT[key].exists():
        return _BUILT[key]
    path = cache_dir / f"{name}.nemo"
    if not path.exists():
        path = build_checkpoint(name, cache_dir, tokenizer_dir=get_tokenizer_dir(cache_dir))
    _BUILT[key] = path
    return path


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------
# Hugging Face hub cache
# --------------------------------------------------------------------------


def build_hf_cache(
    nemo_path: os.PathLike | str,
    repo_id: str,
    hf_home: os.PathLike | str,
    filename: Optional[str] = None,
    revision: str = "main",
) -> Path:
    """Lay out ``nemo_path`` as a cached Hugging Face model repo; returns the snapshot dir.

    Layout (what huggingface_hub writes after a real download)::

        hf_home/hub/models--ORG--NAME/
            blobs/<sha256 of file>
            refs/main                      # the commit hash, *no trailing newline*
            snapshots/<commit>/<filename>  # relative symlink -> ../../blobs/<sha256>

    With ``HF_HOME=hf_home`` and ``HF_HUB_OFFLINE=1`` (both read when
    huggingface_hub is *imported*), ``snapshot_download(repo_id, ...)`` reads
    ``refs/<revision>`` and returns the snapshot dir as-is.  No ``trees/``
    listing is written, so it does not check completeness.  The commit hash is
    derived from the content, so rebuilding is idempotent.
    """
    nemo_path = Path(nemo_path)
    filename = filename or nemo_path.name
    org_name = repo_id.replace("/", "--")
    repo_dir = Path(hf_home) / "hub" / f"models--{org_name}"

    blob_id = hashlib.sha256(nemo_path.read_bytes()).hexdigest()
    commit = hashlib.sha1(f"{repo_id}\0{filename}\0{blob_id}".encode()).hexdigest()

    blob = _ensure_dir(repo_dir / "blobs") / blob_id
    if not blob.exists():
        try:
            os.link(nemo_path, blob)
        except OSError:
            shutil.copyfile(nemo_path, blob)
    snapshot = _ensure_dir(repo_dir / "snapshots" / commit)
    link = snapshot / filename
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, snapshot))
    (_ensure_dir(repo_dir / "refs") / revision).write_text(commit)
    return snapshot


__all__ = [
    "CORPUS",
    "DATA_DIR",
    "VARIANTS",
    "Variant",
    "build_checkpoint",
    "build_hf_cache",
    "build_model",
    "calibrate_",
    "default_cache_dir",
    "get_checkpoint",
    "get_tokenizer_dir",
    "load_calibration_audio",
    "model_config",
    "quiet_nemo",
    "randomize_parameters_",
    "train_tokenizer",
]
