"""Config parsing: every supported option is read from the checkpoint config; unsupported architectures
are refused by name."""

from __future__ import annotations

import copy

import pytest
import yaml

from monosemantic.errors import ModelLoadError, UnsupportedModelError
from monosemantic.models.config import parse_model_config


@pytest.fixture(scope="module")
def nemotron_config(nemo_checkpoint):
    import tarfile

    with tarfile.open(nemo_checkpoint("nemotron_rnnt")) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_config.yaml"))
        return yaml.safe_load(tar.extractfile(member).read())


def edited(config, path: str, value):
    cfg = copy.deepcopy(config)
    node = cfg
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return cfg


DELETE = object()


def test_parses_nemotron_like_config(nemotron_config):
    cfg = parse_model_config(nemotron_config, "tiny")
    assert cfg.encoder.att_context_sizes == ((70, 13), (70, 6), (70, 1), (70, 0))
    assert cfg.encoder.causal_downsampling and cfg.encoder.conv_context == (8, 0)
    assert cfg.frontend.normalize is None and cfg.frontend.n_mels == 128
    assert cfg.frontend.win_length == 400 and cfg.frontend.hop_length == 160 and cfg.frontend.n_fft == 512
    assert cfg.cache_aware and not cfg.is_tdt and cfg.blank_id == cfg.prediction.vocab_size
    assert cfg.frame_samples == 1280


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ("target", "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE", "CTC-only"),
        ("target", "nemo.collections.asr.models.EncDecMultiTaskModel", "attention-decoder"),
        ("target", "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel", "character"),
        ("target", "some.other.Model", "model class"),
        ("tokenizer.type", "wpe", "tokenizer type"),
        ("encoder._target_", "nemo.collections.asr.modules.SqueezeformerEncoder", "SqueezeformerEncoder"),
        ("encoder.self_attention_model", "rel_pos_local_attn", "rel_pos_local_attn"),
        ("encoder.self_attention_model", "abs_pos", "abs_pos"),
        ("encoder.subsampling", "vggnet", "vggnet"),
        ("encoder.subsampling", "dw_striding_conv1d", "dw_striding_conv1d"),
        ("encoder.att_context_style", "chunked_limited_with_rc", "chunked_limited_with_rc"),
        ("encoder.conv_norm_type", "group_norm8", "group_norm8"),
        ("encoder.feat_out", 32, "feat_out"),
        ("encoder.reduction", "pooling", "reduction"),
        ("encoder.att_context_size", [[70, 2]], "multiple of right+1"),
        ("decoder._target_", "nemo.collections.asr.modules.StatelessTransducerDecoder", "StatelessTransducerDecoder"),
        ("decoder.normalization_mode", "layer", "normalization"),
        ("joint.jointnet.activation", "gelu", "gelu"),
        ("decoding.model_type", "multiblank", "multi-blank"),
        ("preprocessor._target_", "nemo.collections.asr.modules.AudioToMFCCPreprocessor", "AudioToMFCCPreprocessor"),
        ("preprocessor.exact_pad", True, "exact_pad"),
        ("preprocessor.frame_splicing", 3, "frame_splicing"),
        ("preprocessor.features", 80, "features"),
        ("decoder", DELETE, "decoder"),
    ],
)
def test_refuses_unsupported_by_name(nemotron_config, path, value, needle):
    if path == "encoder.reduction":
        config = edited(edited(nemotron_config, "encoder.reduction_factor", 2), path, value)
    else:
        config = edited(nemotron_config, path, value)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture") as info:
        parse_model_config(config, "tiny.nemo")
    assert needle in str(info.value) and "tiny.nemo" in str(info.value)


@pytest.mark.parametrize(
    "path, value, section, needle",
    [
        ("encoder.d_model", "wide", "encoder", "ValueError"),
        ("encoder.n_layers", DELETE, "encoder", "'n_layers'"),
        ("encoder.att_context_size", [[70]], "encoder", "expected [left, right]"),
        ("encoder.conv_context_size", [5], "encoder", "IndexError"),
        ("preprocessor.window_size", "long", "preprocessor", "ValueError"),
        ("decoder.prednet", {"pred_rnn_layers": 1}, "decoder", "'pred_hidden'"),
        ("decoder.vocab_size", [1024], "decoder", "TypeError"),
        ("joint.jointnet.joint_hidden", None, "joint", "TypeError"),
        ("decoding.greedy.max_symbols", "many", "decoding", "ValueError"),
        ("tokenizer", "bpe", "tokenizer", "AttributeError"),
    ],
)
def test_a_malformed_entry_is_a_load_error_naming_its_section(nemotron_config, path, value, section, needle):
    """A hand-edited or damaged config used to end in a bare KeyError/ValueError from int()."""
    config = edited(nemotron_config, path, value)
    with pytest.raises(ModelLoadError) as info:
        parse_model_config(config, "tiny.nemo")
    message = str(info.value)
    if "expected [left, right]" in needle:  # shapes the parser checks itself are refused by name
        assert isinstance(info.value, UnsupportedModelError)
    else:
        assert f"in its {section} section" in message
    assert needle in message and "tiny.nemo" in message


def test_tdt_requires_durations(nemotron_config):
    config = edited(nemotron_config, "decoding.model_type", "tdt")
    with pytest.raises(UnsupportedModelError, match="durations"):
        parse_model_config(config, "x")


def test_full_context_variants_are_not_cache_aware(nemotron_config):
    assert not parse_model_config(edited(nemotron_config, "preprocessor.normalize", "per_feature"), "x").cache_aware
    assert not parse_model_config(edited(nemotron_config, "encoder.causal_downsampling", False), "x").cache_aware
    assert not parse_model_config(edited(nemotron_config, "encoder.conv_context_size", None), "x").cache_aware
    regular = edited(edited(nemotron_config, "encoder.att_context_style", "regular"), "encoder.att_context_size", [-1, -1])
    assert not parse_model_config(regular, "x").cache_aware
    causal_regular = edited(edited(nemotron_config, "encoder.att_context_style", "regular"), "encoder.att_context_size", [64, 0])
    assert parse_model_config(causal_regular, "x").cache_aware


@pytest.mark.parametrize(
    "greedy",
    [
        {"max_symbols": 3},
        {"max_symbols": None},
        {"max_symbols": 0},
        {},
        {"max_symbols_per_step": 4},
        {"max_symbols_per_step": None},
        {"max_symbols": None, "max_symbols_per_step": 2},
    ],
)
def test_max_symbols_as_nemo_decides_it(nemotron_config, nemo_model, greedy):
    """NeMo's RNNTDecoding takes `greedy.max_symbols or greedy.max_symbols_per_step`, the latter 10 unless
    the checkpoint sets it (RNNTDecodingConfig's default, merged under the checkpoint's config). A null
    max_symbols was read as 'no cap' and 0 as a cap of 0, where NeMo decodes with 10."""
    from omegaconf import OmegaConf

    from _support.nemo_checkpoints import quiet_nemo

    reference = nemo_model("nemotron_rnnt")
    saved = copy.deepcopy(reference.cfg.decoding)
    cfg = edited(nemotron_config, "decoding.greedy", greedy)
    try:
        with quiet_nemo():
            reference.change_decoding_strategy(OmegaConf.create(cfg["decoding"]), verbose=False)
        expected = reference.decoding.decoding.max_symbols
    finally:
        with quiet_nemo():
            reference.change_decoding_strategy(saved, verbose=False)
    assert parse_model_config(cfg, "x").decoding.max_symbols == expected


@pytest.mark.parametrize("greedy", [{"max_symbols_per_step": 0}, {"max_symbols": -1}])
def test_a_non_positive_max_symbols_is_a_load_error(nemotron_config, greedy):
    """NeMo refuses these (max_symbols_per_step must be > 0 or None)."""
    with pytest.raises(ModelLoadError, match="decoding"):
        parse_model_config(edited(nemotron_config, "decoding.greedy", greedy), "x")
