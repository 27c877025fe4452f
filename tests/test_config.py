"""Config validation: every impossible value is reported by key and value, all at once; the
typed model config follows the objective and the tokenizer (dvar_jax/config.py)."""

import re

import pytest

from configs import tiny
from dvar_jax.config import model_dims, transformer_config, validate_config
from dvar_jax.configs import base, demo
from dvar_jax.model.transformer import TransformerConfig


def names_key_and_value(message: str, key: str, value) -> bool:
    """The message says `key=value` (value as repr, or as str for numbers)."""
    forms = {repr(value), str(value)}
    return any(re.search(re.escape(f"{key}={form}") + r"(?![\w.])", message) for form in forms)


def _set(cfg, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def test_base_and_demo_configs_are_valid():
    """The shipped configs pass validation and give a model config (tiny with a corpus path)."""
    for module in (base, demo, tiny):
        cfg = module.get_config()
        if module is tiny:
            cfg.data.path = "corpus"
        validate_config(cfg)
        assert isinstance(transformer_config(cfg, 4096), TransformerConfig)


def test_custom_dims_are_valid():
    cfg = base.get_config()
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.head_dim = 64, 2, 2, 32
    validate_config(cfg)
    assert model_dims(cfg.model) == {"d_model": 64, "n_layers": 2, "n_heads": 2, "head_dim": 32}


# (dotted key, bad value): each alone must be reported as `key=value`.
BAD_VALUES = [
    ("objective", "nope"),
    ("model.name", "nope"),
    ("model.attention_dropout", 1.0),
    ("model.hidden_dropout", 1.0),
    ("model.dtype", "float16"),
    ("data.source", "x"),
    ("data.tokenizer_type", "x"),
    ("data.epochs", 0.0),
    ("data.seq_len", 1),
    ("train.batch_size", 0),
    ("train.ema_decay", 1.0),
    ("eval.num_mc", 0),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES, ids=[k for k, _ in BAD_VALUES])
def test_each_impossible_value_is_named_with_its_key(key, value):
    cfg = base.get_config()
    _set(cfg, key, value)
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert names_key_and_value(str(err.value), key, value), str(err.value)


def test_named_size_with_explicit_dim_names_the_dim_and_its_value():
    """model.name='140M' with model.d_model=5: the error names model.d_model AND the 5 (the
    module's promise: 'a message naming the key, the value, and what is allowed')."""
    cfg = base.get_config()
    cfg.model.name = "140M"
    cfg.model.d_model = 5
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "model.name='140M'" in message
    assert names_key_and_value(message, "model.d_model", 5), message


def test_custom_without_dims_names_each_missing_dim():
    cfg = base.get_config()
    cfg.model.name = "custom"
    cfg.model.d_model = 64
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "model.name='custom'" in message
    for key in ("model.n_layers", "model.n_heads"):
        assert key in message
    assert "model.d_model" not in message
    assert "model.head_dim" not in message  # optional: d_model // n_heads


def test_custom_head_dim_defaults_to_d_model_over_n_heads():
    cfg = base.get_config()
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 96, 2, 3
    validate_config(cfg)
    assert model_dims(cfg.model) == {"d_model": 96, "n_layers": 2, "n_heads": 3, "head_dim": 32}
    # Given explicitly, head_dim is kept even where n_heads * head_dim != d_model (as 20M).
    cfg.model.n_heads, cfg.model.head_dim = 7, 32
    validate_config(cfg)
    assert model_dims(cfg.model)["head_dim"] == 32


def test_custom_heads_must_divide_d_model_without_head_dim():
    cfg = base.get_config()
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 64, 2, 3
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.count("\n") == 0  # one problem, one line
    assert "model.n_heads=3 does not divide model.d_model=64" in message
    assert "allowed n_heads dividing d_model (e.g. 2, 4), or give model.head_dim" in message


@pytest.mark.parametrize(("key", "value"), [("model.head_dim", 15), ("model.d_model", 0),
                                            ("model.n_heads", 0)])
def test_impossible_custom_dims_are_named(key, value):
    cfg = base.get_config()
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.head_dim = 64, 2, 2, 32
    _set(cfg, key, value)
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert names_key_and_value(str(err.value), key, value), str(err.value)


def test_text_source_without_path_is_named():
    cfg = base.get_config()
    cfg.data.source = "text"
    cfg.data.path = ""
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert names_key_and_value(message, "data.source", "text") and "data.path" in message


def test_several_bad_values_are_all_listed_in_one_error():
    cfg = base.get_config()
    bad = [("objective", "nope"), ("model.dtype", "float16"), ("data.epochs", 0.0),
           ("train.batch_size", 0), ("eval.num_mc", 0), ("model.hidden_dropout", 1.0)]
    for key, value in bad:
        _set(cfg, key, value)
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    for key, value in bad:
        assert names_key_and_value(str(err.value), key, value), (key, str(err.value))


def test_model_dims_of_a_named_size():
    """140M is (768, 15, 12, 64) in PAPER.md §2; cpu-s is (128, 4, 4, 32)."""
    cfg = base.get_config()
    cfg.model.name = "140M"
    assert model_dims(cfg.model) == {"d_model": 768, "n_layers": 15, "n_heads": 12,
                                     "head_dim": 64}
    cfg.model.name = "cpu-s"
    assert model_dims(cfg.model) == {"d_model": 128, "n_layers": 4, "n_heads": 4,
                                     "head_dim": 32}


@pytest.mark.parametrize(("objective", "causal"), [("ar", True), ("diffusion", False)])
def test_transformer_config_follows_objective_and_pads_vocab(objective, causal):
    """The objective decides the mask; the vocab is padded to hold MASK (4096 -> 4224,
    50257 -> 50304); dims, dropouts and dtype come from the config."""
    cfg = base.get_config()
    cfg.objective = objective
    cfg.model.name = "20M"
    cfg.model.attention_dropout, cfg.model.hidden_dropout = 0.25, 0.5
    cfg.model.dtype = "bfloat16"
    validate_config(cfg)
    model_cfg = transformer_config(cfg, 4096)
    assert model_cfg.causal is causal
    assert model_cfg.vocab_size == 4224
    assert transformer_config(cfg, 50257).vocab_size == 50304
    assert (model_cfg.d_model, model_cfg.n_layers, model_cfg.n_heads, model_cfg.head_dim) == (
        288, 5, 7, 32)
    assert (model_cfg.attention_dropout, model_cfg.hidden_dropout, model_cfg.dtype) == (
        0.25, 0.5, "bfloat16")
