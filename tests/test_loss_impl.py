"""`model.loss_impl`: the whole model's losses and gradients are the same through every
output-layer implementation (xla logits, chunked, Pallas in interpret mode), for both objectives'
weightings, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.config import transformer_config, validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.model.output import LOSS_IMPLS, kernel_sequence_losses
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import get_objective

# Vocabulary 300 is not a multiple of the vocabulary block (128), and 2 x 12 tokens are not a
# multiple of the token block (8): both kernels pad and mask their last blocks.
TINY = dict(vocab_size=300, d_model=32, n_layers=1, n_heads=2, head_dim=16,
            loss_block_t=8, loss_block_v=128)
MASK_ID = 290


def _model(loss_impl: str, causal: bool, dtype: str = "float32") -> Transformer:
    cfg = TransformerConfig(causal=causal, loss_impl=loss_impl, dtype=dtype, **TINY)
    return Transformer(cfg, rngs=nnx.Rngs(0))  # same seed: the same parameters for every impl


def _objective_loss_and_grads(objective: str, loss_impl: str, dtype: str = "float32"):
    obj = get_objective(objective)
    model = _model(loss_impl, obj.causal, dtype)
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 280)

    def loss(model):
        return obj.loss(model, tokens, jax.random.key(2), MASK_ID)[0]

    value, grads = nnx.value_and_grad(loss)(model)
    return float(value), grads


def _assert_trees_close(got, want, rel: float):
    """Every leaf's largest deviation within rel x its largest magnitude (a relative error that
    near-zero entries cannot inflate)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.abs(b).max() > 0, jax.tree_util.keystr(path)
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err <= rel, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rel}"


@pytest.mark.parametrize("loss_impl", ["chunked", "pallas"])
@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_objective_losses_and_gradients_match_xla(objective, loss_impl):
    """AR (weights 1) and diffusion (1/p on masked positions): the same training loss to
    float32 rounding (relative error <= 1e-5; observed 0 for the loss and < 1e-6 for the
    gradients) and the same gradient of every parameter, the tied embedding included (its
    gradient has an input and an output part)."""
    ref_value, ref_grads = _objective_loss_and_grads(objective, "xla")
    value, grads = _objective_loss_and_grads(objective, loss_impl)
    assert value == pytest.approx(ref_value, rel=1e-5)
    _assert_trees_close(grads, ref_grads, rel=1e-5)


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_bfloat16_model_losses_match_xla(objective):
    """bfloat16 activations: within 2e-2 of the xla path in loss and gradients (the kernels
    accumulate in float32 where the xla logits are rounded to bfloat16 first; observed 7.5e-6
    on the loss and 7.6e-3 on the gradients)."""
    ref_value, ref_grads = _objective_loss_and_grads(objective, "xla", "bfloat16")
    value, grads = _objective_loss_and_grads(objective, "pallas", "bfloat16")
    assert value == pytest.approx(ref_value, rel=2e-2)
    _assert_trees_close(grads, ref_grads, rel=2e-2)


def test_validation_losses_are_per_sequence_and_match_xla():
    """Per-sequence sums (what validation reports) agree sequence by sequence, and equal a
    float64 log-softmax of the model's own logits."""
    tokens = jax.random.randint(jax.random.key(3), (3, 11), 0, 280)
    weights = jax.random.uniform(jax.random.key(4), (3, 10)) * 3.0  # any nonnegative weights
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = np.asarray(_model("xla", True)(inputs), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1)[..., 0]
    expected = (np.asarray(weights, np.float64) * nll).sum(-1)
    for impl in LOSS_IMPLS:
        got = _model(impl, True).sequence_losses(inputs, targets, weights)
        assert got.shape == (3,)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, err_msg=impl)


def test_loss_impl_is_a_config_choice_with_checked_blocks():
    cfg = get_config()
    cfg.model.loss_impl = "pallas"
    cfg.model.loss_block_v = 256
    validate_config(cfg)
    model_cfg = transformer_config(cfg, 4096)
    assert (model_cfg.loss_impl, model_cfg.loss_block_v) == ("pallas", 256)
    cfg.model.loss_impl = "fused"
    cfg.model.loss_block_t = 100
    with pytest.raises(ValueError) as err:
        validate_config(cfg)
    assert "model.loss_impl='fused': allowed auto, xla, chunked, pallas" in str(err.value)
    assert "model.loss_block_t=100: must be a positive multiple of 8" in str(err.value)
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        TransformerConfig(causal=True, loss_impl="fused", **{
            k: v for k, v in TINY.items() if not k.startswith("loss_")})
    with pytest.raises(ValueError, match="kernel paths are chunked, pallas"):
        kernel_sequence_losses(jnp.zeros((1, 8, 4)), jnp.zeros((16, 4)),
                               jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8)), impl="xla")
