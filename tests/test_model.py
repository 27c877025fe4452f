"""The transformer against an independent float64 numpy re-implementation (PAPER.md §1.1),
plus init statistics, parameter counts, causality, dropout, bfloat16 and axis names."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.configs.models import PAPER_SIZES
from dvar_jax.model.attention import dot_product_attention
from dvar_jax.model.transformer import (
    Transformer,
    TransformerConfig,
    count_params,
    ffn_hidden_size,
    padded_vocab_size,
)

TINY = {"vocab_size": padded_vocab_size(200), "d_model": 32, "n_layers": 2, "n_heads": 2,
        "head_dim": 16}
SEQ = 8


def tiny_cfg(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**TINY, "causal": True, **overrides})


def full_f32_matmuls():
    """Full float32 matmuls for comparisons with float64: CPU's default already is (and
    switching the setting there recompiles every eager op); GPUs default to TF32."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("float32")


def run(model, tokens, positions=None, dropout_rng=None):
    """The model's forward pass, eagerly: op-by-op compiles are cached by shape across configs,
    which on CPU is cheaper than one jit compile per config."""
    return model(tokens, positions=positions, dropout_rng=dropout_rng)


def flat_params(model) -> dict[tuple, np.ndarray]:
    """path -> float64 numpy copy of every nnx.Param of the model."""
    return {path: np.asarray(v[...], np.float64)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def randomize_params(model, seed: int = 0) -> None:
    """O(1)-scale random parameters, so attention is peaked, RoPE matters and every norm scale
    is used (at init the scales are all 1 and attention is nearly uniform)."""
    rng = np.random.default_rng(seed)
    new = []
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "scale":
            value = 1.0 + 0.5 * rng.standard_normal(v.shape)
        elif path[-1] == "embedding":
            value = rng.standard_normal(v.shape)
        else:
            value = 1.5 * rng.standard_normal(v.shape) / math.sqrt(v.shape[0])
        new.append((path, jnp.asarray(value, jnp.float32)))
    nnx.update(model, nnx.from_flat_state(new))


# ---------------------------------------------------------------- float64 numpy reference


def ref_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x, positions, theta=1e4):
    """Rotary embedding as complex multiplication of the pairs (i, i + half): pair i rotates by
    angle pos * theta^(-2i/head_dim). x: [batch, seq, heads, head_dim]."""
    batch, seq, _, head_dim = x.shape
    half = head_dim // 2
    angles = np.zeros((batch, seq, half))
    for b in range(batch):
        for s in range(seq):
            for i in range(half):
                angles[b, s, i] = positions[b, s] * theta ** (-2.0 * i / head_dim)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[:, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_attention(q, k, v, causal, allowed=None):
    """Plain softmax attention, one head and one batch row at a time, in float64.

    allowed: optional [batch, seq, seq] bool, True where a query may attend a key (AND causal).
    """
    batch, seq, heads, head_dim = q.shape
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h].T / math.sqrt(head_dim)  # [seq_q, seq_k]
            if causal:
                scores = np.where(np.arange(seq)[None, :] > np.arange(seq)[:, None], -np.inf,
                                  scores)
            if allowed is not None:
                scores = np.where(allowed[b], scores, -np.inf)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[b, :, h] = probs @ v[b, :, h]
    return out


def ref_forward(p, cfg: TransformerConfig, tokens, positions=None, eps=1e-5, theta=1e4,
                allowed=None, target_positions=None):
    """Logits [batch, seq, vocab] of the pre-norm Llama-style model, float64. Only the mask
    and head shapes come from `cfg`; eps and theta are the study's constants, given here.
    allowed: an extra [batch, seq, seq] attention mask; target_positions: [batch, seq] rows of
    the target-position table added to the input embeddings."""
    batch, seq = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(seq), (batch, seq))
    width, h_f = cfg.n_heads * cfg.head_dim, p[("blocks", 0, "mlp_out", "kernel")].shape[0]
    emb = p[("embed", "embedding")]
    x = emb[np.asarray(tokens)]
    if target_positions is not None:
        x = x + p[("target_embed", "embedding")][np.asarray(target_positions)]
    for layer in range(cfg.n_layers):
        w = lambda name, layer=layer: p[("blocks", layer, name, "kernel")]
        h = ref_rmsnorm(x, p[("blocks", layer, "attn_norm", "scale")], eps)
        qkv = h @ w("qkv")
        q, k, v = (qkv[..., i * width:(i + 1) * width].reshape(batch, seq, cfg.n_heads,
                                                               cfg.head_dim) for i in range(3))
        q, k = ref_rope(q, positions, theta), ref_rope(k, positions, theta)
        attn = ref_attention(q, k, v, cfg.causal, allowed).reshape(batch, seq, width)
        x = x + attn @ w("attn_out")
        h = ref_rmsnorm(x, p[("blocks", layer, "mlp_norm", "scale")], eps)
        up = h @ w("mlp_in")
        x1, x2 = up[..., :h_f], up[..., h_f:]
        x = x + (x1 / (1.0 + np.exp(-x1)) * x2) @ w("mlp_out")
    h = ref_rmsnorm(x, p[("final_norm", "scale")], eps)
    return h @ emb.T


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, SEQ), 0, 200)


def _random_model(causal: bool) -> Transformer:
    model = Transformer(tiny_cfg(causal=causal), rngs=nnx.Rngs(0))
    randomize_params(model)
    return model


def _assert_close_to_ref(out, ref):
    out = np.asarray(out, np.float64)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_forward_matches_float64_numpy_reference(tokens, causal):
    """RMSNorm, complex-number RoPE, (causal or full) softmax attention with 1/sqrt(head_dim),
    SwiGLU on the fused kernel's halves, tied logits h @ E^T: float32 model == float64 numpy."""
    model = _random_model(causal)
    with full_f32_matmuls():
        out = run(model, tokens)
    assert out.shape == (2, SEQ, TINY["vocab_size"]) and out.dtype == jnp.float32
    assert flat_params(model)[("blocks", 0, "mlp_in", "kernel")].shape == (32, 2 * 64)  # h_f
    _assert_close_to_ref(out, ref_forward(flat_params(model), model.cfg, np.asarray(tokens)))


def test_forward_with_permuted_positions_matches_reference(tokens):
    """A custom `positions` argument (a different permutation per row) is what RoPE rotates by,
    and it changes the output relative to the default 0..seq-1."""
    model = _random_model(causal=False)
    rng = np.random.default_rng(3)
    positions = np.stack([rng.permutation(SEQ) + 5 * b for b in range(2)])
    with full_f32_matmuls():
        out = run(model, tokens, positions=jnp.asarray(positions))
        default = run(model, tokens)
    ref = ref_forward(flat_params(model), model.cfg, np.asarray(tokens), positions)
    _assert_close_to_ref(out, ref)
    assert np.abs(np.asarray(out) - np.asarray(default)).max() > 1e-2


def _forward_with(model, tokens, **kwargs):
    """Logits of `model` through hidden_states with extra inputs (mask, target positions)."""
    h = model.hidden_states(model.embed(tokens), kwargs.pop("positions", None), **kwargs)
    return model.embed.attend(h)


def test_attention_mask_input_matches_reference(tokens):
    """An extra per-sequence attention mask (AR token masking) is AND-ed with the causal mask
    in every layer: the model equals the float64 reference with that mask; the diagonal is
    kept so every query has a key."""
    model = _random_model(causal=True)
    rng = np.random.default_rng(5)
    allowed = rng.random((2, SEQ, SEQ)) < 0.5
    allowed[:, np.arange(SEQ), np.arange(SEQ)] = True
    with full_f32_matmuls():
        out = _forward_with(model, tokens, attention_mask=jnp.asarray(allowed))
    ref = ref_forward(flat_params(model), model.cfg, np.asarray(tokens), allowed=allowed)
    _assert_close_to_ref(out, ref)
    assert np.abs(ref - ref_forward(flat_params(model), model.cfg, np.asarray(tokens))).max() > 1e-2


def _block_diffusion_allowed_by_rule(half: int, block: int) -> np.ndarray:
    """Block diffusion's mask written out position by position: [2 half, 2 half] bool."""
    allowed = np.zeros((2 * half, 2 * half), bool)
    for q in range(2 * half):
        for k in range(2 * half):
            q_noisy, k_noisy = q < half, k < half
            qb, kb = (q % half) // block, (k % half) // block
            if q_noisy:  # noisy: own noisy block, clean earlier blocks
                allowed[q, k] = qb == kb if k_noisy else kb < qb
            else:  # clean: clean blocks up to its own
                allowed[q, k] = (not k_noisy) and kb <= qb
    return allowed


@pytest.mark.parametrize("block", [1, 2, 4])
def test_block_diffusion_model_matches_reference(tokens, block):
    """diffusion_block=B on a [noisy; clean] input of 2 * SEQ tokens (positions 0..SEQ-1 twice):
    the model equals the bidirectional float64 reference under the block mask written out by
    rule, and the mask predicate of kernels/masks.py equals that rule."""
    from dvar_jax.kernels.masks import block_diffusion_mask

    rule = _block_diffusion_allowed_by_rule(SEQ // 2, block)
    np.testing.assert_array_equal(np.asarray(block_diffusion_mask(SEQ, block)), rule)
    model = Transformer(tiny_cfg(causal=False, diffusion_block=block), rngs=nnx.Rngs(0))
    randomize_params(model)
    positions = np.tile(np.arange(SEQ // 2), 2)[None].repeat(2, 0)
    with full_f32_matmuls():
        out = _forward_with(model, tokens, positions=jnp.asarray(positions))
    ref = ref_forward(flat_params(model), model.cfg, np.asarray(tokens),
                      positions, allowed=np.broadcast_to(rule, (2, SEQ, SEQ)))
    _assert_close_to_ref(out, ref)


def test_target_position_table_matches_reference(tokens):
    """target_positions=T adds a learned [T, d_model] row per input (the position it predicts);
    left out, the rows 1..seq (left to right) are used."""
    model = Transformer(tiny_cfg(target_positions=SEQ + 1), rngs=nnx.Rngs(0))
    randomize_params(model)
    p = flat_params(model)
    assert p[("target_embed", "embedding")].shape == (SEQ + 1, TINY["d_model"])
    targets = np.stack([np.random.default_rng(b).permutation(SEQ) + 1 for b in range(2)])
    with full_f32_matmuls():
        out = _forward_with(model, tokens, target_positions=jnp.asarray(targets))
        default = _forward_with(model, tokens)
    _assert_close_to_ref(out, ref_forward(p, model.cfg, np.asarray(tokens),
                                          target_positions=targets))
    left_to_right = np.broadcast_to(np.arange(1, SEQ + 1), (2, SEQ))
    _assert_close_to_ref(default, ref_forward(p, model.cfg, np.asarray(tokens),
                                              target_positions=left_to_right))


def test_rmsnorm_epsilon_is_1e_minus_5(tokens):
    """Inputs whose mean square (~1e-5) is comparable to eps: the model matches the reference
    with eps = 1e-5 and is far from the reference with eps = 1e-6 or 1e-4."""
    model = _random_model(causal=True)
    emb = np.array(model.embed.embedding[...])
    emb[:10] *= 3e-3  # rows 0..9: RMS ~ 3e-3, mean square ~ 1e-5
    model.embed.embedding[...] = jnp.asarray(emb)
    small = jnp.asarray(np.random.default_rng(4).integers(0, 10, (2, SEQ)), jnp.int32)
    with full_f32_matmuls():
        out = np.asarray(run(model, small), np.float64)
    p = flat_params(model)
    _assert_close_to_ref(out, ref_forward(p, model.cfg, np.asarray(small)))
    for eps in (1e-6, 1e-4):
        assert np.abs(out - ref_forward(p, model.cfg, np.asarray(small), eps=eps)).max() > 1e-2


def test_causal_and_bidirectional_models_differ(tokens):
    """One layer, same parameters, two masks: logits differ except at the last position, which
    sees the whole sequence under both masks (a guard that `causal` is wired through)."""
    causal, bidir = (Transformer(tiny_cfg(causal=c, n_layers=1), rngs=nnx.Rngs(0))
                     for c in (True, False))
    randomize_params(causal)
    randomize_params(bidir)
    a, b = np.asarray(run(causal, tokens)), np.asarray(run(bidir, tokens))
    assert np.abs(a[:, :-1] - b[:, :-1]).max() > 1e-2
    np.testing.assert_allclose(a[:, -1], b[:, -1], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- init and sizes


def test_init_statistics_and_no_biases():
    """Embedding, qkv and mlp_in ~ N(0, 0.02); attn_out and mlp_out ~ N(0, 0.02/sqrt(2L));
    norm scales exactly 1; the only parameters are embedding, kernels and norm scales.

    Samples are pooled over layers and 8 independently seeded tiny models (same shapes, so
    nothing new is compiled): >= 16k values per kind, a standard error of the sample std
    <= 0.6%, checked at 3%; the mean within 5 standard errors of 0.
    """
    seeds = [flat_params(Transformer(tiny_cfg(), rngs=nnx.Rngs(s))) for s in range(8)]
    params = seeds[0]
    assert {path[-1] for path in params} == {"embedding", "kernel", "scale"}
    assert not any("bias" in str(part) for path in params for part in path)

    def pooled(name):
        return np.concatenate([v.ravel() for p in seeds for path, v in p.items() if name in path])

    out_std = 0.02 / math.sqrt(2 * TINY["n_layers"])
    expected = {"embed": 0.02, "qkv": 0.02, "mlp_in": 0.02, "attn_out": out_std,
                "mlp_out": out_std}
    for name, std in expected.items():
        sample = pooled(name)
        assert sample.size >= 16_000
        assert abs(sample.std() / std - 1) < 0.03, (name, sample.std(), std)
        assert abs(sample.mean()) < 5 * std / math.sqrt(sample.size), name
    for name in ("attn_norm", "mlp_norm", "final_norm"):
        np.testing.assert_array_equal(pooled(name), 1.0)
    # The seeds really are independent draws.
    assert np.abs(seeds[0][("embed", "embedding")] - seeds[1][("embed", "embedding")]).max() > 0


def hand_param_count(vocab: int, d: int, n_layers: int, n_heads: int, head_dim: int) -> int:
    """V_pad d + L (d 3w + w d + d 2h_f + h_f d + 2d) + d, w = heads * head_dim."""
    w, h_f = n_heads * head_dim, ffn_hidden_size(d)
    return vocab * d + n_layers * (d * 3 * w + w * d + d * 2 * h_f + h_f * d + 2 * d) + d


def _abstract_count(vocab, d, n_layers, n_heads, head_dim) -> int:
    cfg = TransformerConfig(vocab_size=vocab, d_model=d, n_layers=n_layers, n_heads=n_heads,
                            head_dim=head_dim, causal=True)
    return count_params(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def test_count_params_of_tiny_model_equals_hand_formula_and_real_arrays():
    """count_params of the abstract model == hand formula == sum of the real arrays' sizes
    (the tied embedding counted once)."""
    dims = (TINY["vocab_size"], TINY["d_model"], TINY["n_layers"], TINY["n_heads"],
            TINY["head_dim"])
    real = sum(v.size for v in flat_params(Transformer(tiny_cfg(), rngs=nnx.Rngs(0))).values())
    assert _abstract_count(*dims) == hand_param_count(*dims) == real


# PAPER.md §2, "N actual (M) [inferred]" column (50304 rows, heads*kv attention width).
N_ACTUAL = {"7M": 7.0, "20M": 19.1, "35M": 34.2, "140M": 144.8, "425M": 416.9}


@pytest.mark.parametrize("name", list(N_ACTUAL))
def test_real_param_count_matches_n_actual_column(name):
    """The built model (abstractly, nothing allocated) at the study's sizes with vocab 50304
    equals the hand formula and PAPER.md's N actual column to 0.1M."""
    d, n_layers, n_heads, head_dim = PAPER_SIZES[name]
    n = _abstract_count(50304, d, n_layers, n_heads, head_dim)
    assert n == hand_param_count(50304, d, n_layers, n_heads, head_dim)
    assert round(n / 1e6, 1) == N_ACTUAL[name]


# ---------------------------------------------------------------- causality via gradients


def _sensitivity(model, tokens) -> np.ndarray:
    """S[i, j] = sum_d |d (logits[i] . r) / d embedded input[j, d]| for one sequence, with a
    fixed random projection r of the vocabulary (exact zeros stay exact zeros; a nonzero
    dependence survives a random projection almost surely)."""
    x = model.embed(tokens[:1])
    r = jax.random.normal(jax.random.key(5), (model.cfg.vocab_size,))

    def projected_logits(x):
        return model.embed.attend(model.hidden_states(x))[0] @ r  # [seq]

    jac = jax.jit(jax.jacrev(projected_logits))(x)  # [seq, 1, seq, d]
    return np.abs(np.asarray(jac[:, 0])).sum(axis=-1)


def test_causal_model_gradients_vanish_exactly_on_the_future(tokens):
    """Causal: d logits_i / d x_j is exactly 0 for j > i and nonzero for j <= i."""
    model = Transformer(tiny_cfg(causal=True), rngs=nnx.Rngs(0))
    sens = _sensitivity(model, tokens)
    future = np.triu(np.ones((SEQ, SEQ), bool), k=1)
    assert np.all(sens[future] == 0.0)
    assert np.all(sens[~future] > 0.0)


def test_bidirectional_model_gradients_reach_every_position(tokens):
    """Bidirectional: every logit depends on every input position."""
    model = Transformer(tiny_cfg(causal=False), rngs=nnx.Rngs(0))
    assert np.all(_sensitivity(model, tokens) > 0.0)


# ---------------------------------------------------------------- dropout


@pytest.mark.parametrize("which", ["attention_dropout", "hidden_dropout"])
def test_dropout_is_off_without_a_key_and_reproducible_with_one(tokens, which):
    """For each dropout kind alone (attention probabilities; residual branches + embeddings):
    dropout_rng=None is deterministic and equals the dropout-0 model with the same params;
    a key changes the output; same key -> same output; another key -> another output."""
    plain = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    drop = Transformer(tiny_cfg(**{which: 0.3}), rngs=nnx.Rngs(0))
    for path, value in flat_params(plain).items():
        np.testing.assert_array_equal(flat_params(drop)[path], value)
    reference = np.asarray(run(plain, tokens))
    np.testing.assert_array_equal(np.asarray(drop(tokens)), reference)
    np.testing.assert_array_equal(np.asarray(run(drop, tokens, dropout_rng=None)), reference)
    a = np.asarray(run(drop, tokens, dropout_rng=jax.random.key(7)))
    b = np.asarray(run(drop, tokens, dropout_rng=jax.random.key(7)))
    c = np.asarray(run(drop, tokens, dropout_rng=jax.random.key(8)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - reference).max() > 1e-3
    assert np.abs(a - c).max() > 1e-3


def test_attention_dropout_is_inverted_so_its_mean_is_the_plain_output():
    """Dropout on attention probabilities (kept / (1 - rate)) averaged over 2000 independent
    draws (a batch of 2000 copies of one input) gives the no-dropout output, within 5
    standard errors of the Monte-Carlo mean."""
    q, k, v = (jnp.broadcast_to(jax.random.normal(jax.random.key(i), (1, 4, 1, 8)),
                                (2000, 4, 1, 8)) for i in range(3))
    plain = np.asarray(dot_product_attention(q[:1], k[:1], v[:1], causal=False))[0]
    dropped = jax.jit(lambda q, k, v, key: dot_product_attention(
        q, k, v, causal=False, dropout_rate=0.4, dropout_rng=key))
    draws = np.asarray(dropped(q, k, v, jax.random.key(9)), np.float64)
    assert draws.std(axis=0).min() > 0.01  # the draws really differ
    sem = draws.std(axis=0) / math.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - plain) < 5 * sem)
    no_key = dot_product_attention(q, k, v, causal=False, dropout_rate=0.4, dropout_rng=None)
    np.testing.assert_allclose(np.asarray(no_key), np.broadcast_to(plain, no_key.shape),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bfloat16, metadata, config


def test_bfloat16_compute_keeps_float32_params_and_logits(tokens):
    """dtype=bfloat16: parameters stay float32 (identical to the float32 model's), logits are
    float32 and within 0.05 of the float32 model's."""
    f32 = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    bf16 = Transformer(tiny_cfg(dtype="bfloat16"), rngs=nnx.Rngs(0))
    for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param)):
        assert v[...].dtype == jnp.float32
    out = nnx.jit(run)(bf16, tokens)  # one compile instead of every bfloat16 op eagerly
    assert out.dtype == jnp.float32
    diff = np.abs(np.asarray(out) - np.asarray(run(f32, tokens)))
    assert diff.max() < 0.05
    assert diff.max() > 0  # it did compute in a lower precision


EXPECTED_AXES = {"embedding": ("vocab", "embed"), "qkv": ("embed", "qkv"),
                 "attn_out": ("heads", "embed"), "mlp_in": ("embed", "mlp"),
                 "mlp_out": ("mlp", "embed"), "attn_norm": ("norm",), "mlp_norm": ("norm",),
                 "final_norm": ("norm",)}


def test_every_parameter_has_one_logical_axis_name_per_dimension():
    """nnx.get_partition_spec gives each parameter a spec of len == ndim with the logical
    names the sharding rules expect."""
    state = nnx.state(Transformer(tiny_cfg(), rngs=nnx.Rngs(0)), nnx.Param)
    shapes = {path: v[...].shape for path, v in nnx.to_flat_state(state)}
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(state)))
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        names = tuple(spec.get_value())
        assert len(names) == len(shapes[path]), path
        assert all(isinstance(n, str) for n in names), path
        key = next(part for part in reversed(path) if part in EXPECTED_AXES)
        assert names == EXPECTED_AXES[key], path


@pytest.mark.parametrize(("field", "value"), [
    ("head_dim", 15), ("attention_dropout", 1.0), ("hidden_dropout", -0.1),
    ("dtype", "float16"), ("d_model", 0)])
def test_transformer_config_rejects_bad_values_naming_them(field, value):
    """Impossible model settings raise ValueError naming the field and the value."""
    with pytest.raises(ValueError, match=field) as err:
        tiny_cfg(**{field: value})
    assert str(value) in str(err.value)
