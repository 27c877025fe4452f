"""`model.attention_impl=pallas`: the same model and gradients as the XLA reference."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.config import validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import get_objective
from dvar_jax.sharding import activation_sharding, make_mesh, rules_from_config
from dvar_jax.step import create_train_state, make_optimizer, make_train_step

TINY = dict(vocab_size=128, d_model=32, n_layers=1, n_heads=2, head_dim=16)


def _model(impl, causal):
    return Transformer(TransformerConfig(causal=causal, attention_impl=impl, **TINY),
                       rngs=nnx.Rngs(0))


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_model_matches_xla_in_logits_and_gradients(causal):
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 120, (2, 16)))

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(tokens), axis=-1))

    ref_model, kernel_model = _model("xla", causal), _model("pallas", causal)
    np.testing.assert_allclose(kernel_model(tokens), ref_model(tokens), rtol=1e-5, atol=1e-5)
    ref_grads = nnx.grad(loss)(ref_model)
    kernel_grads = nnx.grad(loss)(kernel_model)
    for a, b in zip(jax.tree.leaves(kernel_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pallas_train_step_on_a_mesh_matches_xla():
    """The kernel runs per shard through shard_map when a mesh is active."""
    cfg = get_config()
    mesh, rules = make_mesh(cfg.mesh), rules_from_config(cfg.mesh.rules)
    tx = make_optimizer(cfg.train, 10)
    tokens = np.random.RandomState(1).randint(0, 120, (4, 17)).astype(np.int32)
    losses = {}
    for impl in ("xla", "pallas"):
        model_cfg = TransformerConfig(causal=True, attention_impl=impl, **TINY)
        with activation_sharding(mesh, rules):
            graphdef, state, placement = create_train_state(model_cfg, tx, 0, mesh, rules)
            step = make_train_step(graphdef, get_objective("ar"), tx, 120, 0, placement)
            state, metrics = step(state, tokens)
            state, metrics = step(state, tokens)
        losses[impl] = float(metrics["loss"])
    assert losses["pallas"] == pytest.approx(losses["xla"], rel=1e-5)


def test_pallas_attention_refuses_attention_dropout():
    cfg = get_config()
    cfg.model.attention_impl = "pallas"  # base config has attention_dropout 0.1
    with pytest.raises(ValueError, match=re.escape("model.attention_dropout=0.1: must be 0 with")):
        validate_config(cfg)
    cfg.model.attention_impl = "cudnn"
    expected = "model.attention_impl='cudnn': allowed auto, xla, pallas, splash"
    with pytest.raises(ValueError, match=re.escape(expected)):
        validate_config(cfg)


def test_block_sizes_from_the_config_reach_the_kernel(monkeypatch):
    """model.attention_block_q/k are the kernel's blocks (seq 16 in 8 x 8 blocks: 2 x 2 grid,
    the causal skip included), and the model still matches xla."""
    # The module, not the package's re-export of the function of the same name.
    fa = importlib.import_module("dvar_jax.kernels.flash_attention")

    seen, original = [], fa.flash_attention

    def recording(*args, **kwargs):
        seen.append((kwargs["block_q"], kwargs["block_k"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(fa, "flash_attention", recording)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 120, (2, 16)))
    cfg = TransformerConfig(causal=True, attention_impl="pallas", attention_block_q=8,
                            attention_block_k=8, **TINY)
    got = Transformer(cfg, rngs=nnx.Rngs(0))(tokens)
    assert seen and set(seen) == {(8, 8)}
    np.testing.assert_allclose(got, _model("xla", True)(tokens), rtol=1e-5, atol=1e-5)


def test_splash_needs_a_sequence_length_multiple_of_128():
    cfg = get_config()
    cfg.model.attention_impl, cfg.model.attention_dropout = "splash", 0.0
    cfg.data.seq_len = 100
    with pytest.raises(ValueError, match=re.escape(
            "data.seq_len=100: model.attention_impl='splash' needs a multiple of 128")):
        validate_config(cfg)
    cfg.data.seq_len = 256
    validate_config(cfg)
