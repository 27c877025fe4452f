"""`attention_impl=splash`: JAX's TPU splash kernel (interpret mode on CPU) against references.

Splash needs seq to be a multiple of 128, so these shapes are the smallest it accepts; each
test compiles one value-and-gradient call (a few seconds in interpret mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.configs.base import get_config
from dvar_jax.kernels.splash import _kernel, splash_attention, splash_block
from dvar_jax.model.attention import attention, dot_product_attention
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.sharding import activation_sharding, make_mesh, rules_from_config

# float32 agreement measured on CPU (interpret mode), seq 384: outputs within 6e-7 of the
# reference (entries up to 2.9), gradients within 7e-7 of their largest entry. The bounds
# leave ~3x headroom; elementwise rtol 1e-5 on top.
ATOL_OUT, ATOL_GRAD_OF_MAX, RTOL = 2e-6, 2e-6, 1e-5


def _qkv(batch: int, seq: int, heads: int, head_dim: int, seed: int = 0):
    """q, k, v and an output cotangent, each [batch, seq, heads, head_dim] float32."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (batch, seq, heads, head_dim)) for k in keys]


def _value_and_grads(fn, q, k, v, do):
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)
    return jax.jit(run)(q, k, v, do)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_matches_reference(causal):
    # seq 384 = 3 blocks of 128: the causal mask has skipped, partial and full blocks.
    q, k, v, do = _qkv(2, 384, 2, 64, seed=int(causal))
    out, grads = _value_and_grads(lambda q, k, v: splash_attention(q, k, v, causal=causal),
                                  q, k, v, do)
    ref_out, ref_grads = _value_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, causal=causal), q, k, v, do)
    np.testing.assert_allclose(out, ref_out, atol=ATOL_OUT, rtol=RTOL)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        atol = ATOL_GRAD_OF_MAX * float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, atol=atol, rtol=RTOL, err_msg=name)


def test_block_choice_and_bad_seq():
    assert [splash_block(s) for s in (128, 256, 384, 512, 768, 2048)] == [
        128, 256, 128, 512, 256, 512]
    q, k, v, _ = _qkv(1, 100, 2, 16)
    with pytest.raises(ValueError, match=r"seq=100 must be a positive multiple of 128"):
        splash_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="must share one"):
        splash_attention(q, k[:, :64], v, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_model_matches_xla_in_logits_and_gradients(causal):
    dims = dict(vocab_size=128, d_model=32, n_layers=1, n_heads=2, head_dim=16)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 120, (2, 128)))
    models = {impl: Transformer(TransformerConfig(causal=causal, attention_impl=impl, **dims),
                                rngs=nnx.Rngs(0)) for impl in ("xla", "splash")}

    def loss(model):
        return jnp.mean(jax.nn.logsumexp(model(tokens), axis=-1))

    np.testing.assert_allclose(models["splash"](tokens), models["xla"](tokens), rtol=1e-5,
                               atol=1e-5)
    grads = {impl: nnx.grad(loss)(model) for impl, model in models.items()}
    for a, b in zip(jax.tree.leaves(grads["splash"]), jax.tree.leaves(grads["xla"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cached_kernel_is_reused_by_a_later_trace():
    """The kernel is cached per shape; one first built inside a jit must hold no tracers."""
    _kernel.cache_clear()
    q, k, v, _ = _qkv(1, 128, 2, 16, seed=4)
    first = jax.jit(lambda q, k, v: splash_attention(q, k, v, causal=False))(q, k, v)
    second = jax.jit(lambda q, k, v: 2.0 * splash_attention(q, k, v, causal=False))(q, k, v)
    assert _kernel.cache_info().hits == 1
    np.testing.assert_allclose(second, 2.0 * first, rtol=1e-6)


def test_splash_runs_per_shard_on_a_mesh():
    cfg = get_config()
    mesh, rules = make_mesh(cfg.mesh), rules_from_config(cfg.mesh.rules)
    q, k, v, _ = _qkv(2, 128, 2, 16, seed=3)
    with activation_sharding(mesh, rules):
        out = jax.jit(lambda q, k, v: attention(q, k, v, impl="splash", causal=True))(q, k, v)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, causal=True), atol=ATOL_OUT,
                               rtol=RTOL)


def test_splash_refuses_attention_dropout():
    q, k, v, _ = _qkv(1, 128, 2, 16)
    with pytest.raises(ValueError, match=r"attention dropout needs model\.attention_impl='xla'"):
        attention(q, k, v, impl="splash", causal=True, dropout_rate=0.1,
                  dropout_rng=jax.random.key(0))
