"""The study's AR ablations and block diffusion (PAPER.md §8, §11) against hand-built references.

Token masking and attention dropout: the masks themselves. N orderings: N = 1 is plain AR
exactly; a known permutation gives the hand-reordered next-token loss. Block diffusion: B = L is
masked diffusion and B = 1 is next-token prediction from a clean prefix, numerically. The model
under each mask is checked against the float64 reference in test_model.py.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from dvar_jax.config import transformer_config, validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.configs.recipes import tiny_config
from dvar_jax.model.attention import dot_product_attention
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import get_objective, objective_from_config
from dvar_jax.objectives.ar import (
    ARVariant,
    ar_loss,
    ar_sequence_losses,
    ordered_ar_sequence_losses,
)
from dvar_jax.objectives.augment import RANDMASK_EPS, randmask_attention
from dvar_jax.objectives.block_diffusion import (
    block_diffusion_sequence_losses,
    block_diffusion_validation_draws,
)
from dvar_jax.objectives.diffusion import masked_diffusion_sequence_losses
from dvar_jax.objectives.orderings import make_orders, permute_windows

VOCAB, MASK_ID, SEQ = 64, 63, 16


def _model(**overrides) -> Transformer:
    cfg = TransformerConfig(**{"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2,
                               "head_dim": 16, "causal": True, **overrides})
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _same_params(model: Transformer, like: Transformer) -> Transformer:
    nnx.update(model, nnx.state(like, nnx.Param))
    return model


@pytest.fixture(scope="module")
def windows():
    """[3, SEQ + 1] token windows (no MASK id among them)."""
    return jax.random.randint(jax.random.key(1), (3, SEQ + 1), 0, MASK_ID)


def _log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- token masking (randmask)


def test_randmask_mask_is_causal_keeps_the_diagonal_and_blocks_as_the_study():
    """Ratio r: a query row is selected with probability r; a selected row blocks each earlier
    key with probability t ~ U(eps, 1). So with r = 1 a long row's blocked share is about t,
    uniform on [eps, 1] (quartiles 1/4, 1/2, 3/4), and with r = 1/4 the mean share is
    r (1 + eps) / 2. Never a later key is allowed and never the diagonal blocked. Ratio 0 is
    the causal mask exactly."""
    batch, seq = 16, 256
    causal = np.tril(np.ones((seq, seq), bool))
    none = np.asarray(randmask_attention(jax.random.key(0), batch, seq, 0.0))
    np.testing.assert_array_equal(none, np.broadcast_to(causal, none.shape))
    earlier = np.tril(np.ones((seq, seq), bool), -1)
    for ratio in (0.25, 1.0):
        mask = np.asarray(randmask_attention(jax.random.key(1), batch, seq, ratio))
        assert not (mask & ~causal).any()  # OR-ed with the causal mask
        assert mask[:, np.arange(seq), np.arange(seq)].all()  # diagonal always kept
        # Rows with >= 128 earlier keys: a row's share is within ~0.04 of its t.
        share = ((~mask & earlier).sum(-1) / np.maximum(earlier.sum(-1), 1))[:, 128:]
        if ratio == 1.0:
            np.testing.assert_allclose(np.quantile(share, [0.25, 0.5, 0.75]),
                                       [0.25, 0.5, 0.75], atol=0.05)
        assert abs(share.mean() - ratio * (1 + RANDMASK_EPS) / 2) < 0.03


def test_randmask_blocked_keys_do_not_reach_the_query():
    """One layer: the loss at query i has zero gradient with respect to every input embedding j
    the mask blocks (j != i), and a nonzero one for the keys it allows."""
    model = _model(n_layers=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, MASK_ID)
    mask = randmask_attention(jax.random.key(3), 2, 12, 1.0)

    def loss_at(x, i):
        h = model.hidden_states(x, attention_mask=mask)
        return model.embed.attend(h)[:, i].sum()

    x = model.embed(tokens)
    grad_at = jax.jit(jax.grad(loss_at), static_argnums=1)
    for i in (5, 11):
        grad = np.abs(np.asarray(grad_at(x, i))).sum(-1)  # [batch, seq]
        allowed = np.asarray(mask)[:, i]
        assert (grad[~allowed] == 0).all()
        assert (grad[allowed] > 0).all()


def test_ar_loss_with_randmask_equals_masked_next_token_loss(windows):
    """ar_loss with token masking = the plain next-token loss of the model under the mask it
    drew; a different mask changes it (the option is wired through)."""
    model = _model()
    rng = jax.random.key(4)
    loss, _ = nnx.jit(lambda m: ar_loss(m, windows, rng, MASK_ID, ARVariant(randmask_ratio=0.5)))(
        model)
    mask = randmask_attention(jax.random.fold_in(rng, 2), 3, SEQ, 0.5)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    logits = nnx.jit(lambda m: m.embed.attend(m.hidden_states(m.embed(inputs),
                                                              attention_mask=mask)))(model)
    logp = _log_softmax64(logits)
    want = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    plain, _ = nnx.jit(lambda m: ar_loss(m, windows, rng, MASK_ID))(model)
    assert abs(float(loss) - float(plain)) > 1e-4


# ---------------------------------------------------------------- attention dropout


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_attention_dropout_drops_probabilities_at_the_rate_and_rescales(rate):
    """Dropout on the attention probabilities: output = (softmax * keep / (1 - rate)) @ v with
    keep ~ Bernoulli(1 - rate) drawn from the key, per (batch, head, query, key); the dropped
    share is the rate."""
    q, k, v = (jax.random.normal(jax.random.key(i), (4, 32, 2, 8)) for i in range(3))
    key = jax.random.key(9)
    out = np.asarray(dot_product_attention(q, k, v, causal=True, dropout_rate=rate,
                                           dropout_rng=key), np.float64)
    keep = np.asarray(jax.random.bernoulli(key, 1.0 - rate, (4, 2, 32, 32)))
    scores = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
    scores = np.where(np.tril(np.ones((32, 32), bool)), scores / math.sqrt(8), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", probs * keep / (1 - rate), np.asarray(v, np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    assert abs((1 - keep.mean()) - rate) < 0.02


# ---------------------------------------------------------------- N orderings


def test_orders_are_seeded_permutations_identity_first():
    for kind in ("local", "random"):
        orders = make_orders(8, 64, kind, seed=3)
        assert orders.shape == (8, 64) and orders.dtype == np.int32
        np.testing.assert_array_equal(orders[0], np.arange(64))
        for order in orders:
            np.testing.assert_array_equal(np.sort(order), np.arange(64))
        np.testing.assert_array_equal(orders, make_orders(8, 64, kind, seed=3))
        assert not np.array_equal(orders, make_orders(8, 64, kind, seed=4))
    # Local perturbations: argsort(arange + N(0, i^2)), so order i strays about i places.
    local = make_orders(16, 2048, "local", seed=0)
    stray = np.abs(local - np.arange(2048)).mean(axis=1)
    assert stray[1] < stray[4] < stray[15] < 20
    rs = np.random.RandomState(0)
    np.testing.assert_array_equal(local[1], np.argsort(np.arange(2048) + rs.normal(0, 1, 2048),
                                                       kind="stable"))
    assert np.abs(make_orders(2, 2048, "random", 0)[1] - np.arange(2048)).mean() > 500
    with pytest.raises(ValueError, match=r"ar.order_kind='zigzag': allowed local, random"):
        make_orders(2, 8, "zigzag", 0)


def test_permute_windows_by_hand():
    """Window [a b c d e] (token 0 = a fixed), order (2, 0, 3, 1) of b..e: permuted window
    [a d b e c]; inputs [a d b e], targets [d b e c], positions [0 3 1 4], targets' [3 1 4 2]."""
    tokens = jnp.array([[10, 11, 12, 13, 14]])
    inputs, targets, pos, target_pos = permute_windows(tokens, jnp.array([[2, 0, 3, 1]]))
    assert inputs.tolist() == [[10, 13, 11, 14]] and targets.tolist() == [[13, 11, 14, 12]]
    assert pos.tolist() == [[0, 3, 1, 4]] and target_pos.tolist() == [[3, 1, 4, 2]]


def test_one_order_is_plain_ar_exactly(windows):
    """The identity order through the ordering code equals plain AR bit for bit, and
    ar.num_orders=1 builds the plain objective."""
    model = _model()
    identity = jnp.tile(jnp.arange(SEQ), (3, 1))
    np.testing.assert_array_equal(np.asarray(ordered_ar_sequence_losses(model, windows, identity)),
                                  np.asarray(ar_sequence_losses(model, windows)))
    cfg = get_config()
    cfg.data.seq_len = SEQ
    rng = jax.random.key(5)
    from_config = objective_from_config(cfg).loss(model, windows, rng, MASK_ID)[0]
    assert float(from_config) == float(get_objective("ar").loss(model, windows, rng, MASK_ID)[0])


@pytest.mark.parametrize("target_positions", [False, True])
def test_known_permutation_gives_the_reordered_next_token_loss(windows, target_positions):
    """For one order per row, the loss is -sum log p(next token in that order): computed here by
    rearranging each window by hand, running the model on it with the original positions as RoPE
    ids, and reading the log-probabilities (float64 log-softmax)."""
    model = _model(target_positions=SEQ + 1 if target_positions else 0)
    rs = np.random.RandomState(0)
    perms = np.stack([rs.permutation(SEQ) for _ in range(3)])
    got = np.asarray(ordered_ar_sequence_losses(model, windows, jnp.asarray(perms)))
    tok = np.asarray(windows)
    for b in range(3):
        order = [0] + [1 + int(i) for i in perms[b]]  # original positions, in visiting order
        seq_tokens = tok[b, order]
        inputs = jnp.asarray(seq_tokens[None, :-1])
        h = model.hidden_states(model.embed(inputs), jnp.asarray([order[:-1]]),
                                target_positions=jnp.asarray([order[1:]]))
        logp = _log_softmax64(model.embed.attend(h))[0]
        want = -sum(logp[j, seq_tokens[j + 1]] for j in range(SEQ))
        np.testing.assert_allclose(got[b], want, rtol=1e-5)


def test_orderings_objective_draws_orders_from_the_config(windows):
    """ar.num_orders=N: the orders come from make_orders(N, seq_len, kind, seed); each row's
    loss is that of one of them (here: which one is recovered by elimination)."""
    cfg = get_config()
    cfg.data.seq_len, cfg.ar.num_orders, cfg.ar.order_kind = SEQ, 4, "random"
    model = _model()
    rng = jax.random.key(6)
    objective = objective_from_config(cfg)
    loss, _ = objective.loss(model, windows, rng, MASK_ID)
    orders = make_orders(4, SEQ, "random", cfg.seed)
    choice = jax.random.randint(jax.random.fold_in(rng, 1), (3,), 0, 4)
    want = ordered_ar_sequence_losses(model, windows, jnp.asarray(orders)[choice]).sum() / (3 * SEQ)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    # Validation is left to right whatever the orders.
    np.testing.assert_array_equal(
        np.asarray(objective.validation_loss(model, windows, rng, MASK_ID, 1)),
        np.asarray(ar_sequence_losses(model, windows)))


# ---------------------------------------------------------------- block diffusion


def test_block_diffusion_with_one_block_is_masked_diffusion(windows):
    """B = L: the noisy half sees only itself, so with the same parameters, noise levels and mask
    draw the loss equals masked diffusion's."""
    diffusion = _model(causal=False)
    block = _same_params(_model(causal=False, diffusion_block=SEQ), diffusion)
    clean = windows[:, :-1]
    t = jnp.array([0.2, 0.6, 0.95])
    want, w1 = masked_diffusion_sequence_losses(diffusion, clean, t, jax.random.key(7), MASK_ID)
    got, w2 = block_diffusion_sequence_losses(block, clean, t[:, None], jax.random.key(7), MASK_ID)
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(w2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5)


def test_block_diffusion_with_blocks_of_one_is_next_token_prediction(windows):
    """B = 1, every token masked (t = 1, weight 1): the loss of token i is -log p(x_i) from the
    clean tokens x_<i and a MASK at position i, which a causal model with the same parameters
    computes on the sequence [x_0 .. x_{i-1}, MASK] at its last position."""
    block = _model(causal=False, diffusion_block=1)
    causal = _same_params(_model(causal=True), block)
    clean = windows[:, :-1]
    got, weights = block_diffusion_sequence_losses(block, clean, jnp.ones((3, SEQ)),
                                                   jax.random.key(8), MASK_ID)
    np.testing.assert_array_equal(np.asarray(weights), 1.0)
    # Row (b, i) is [x_0 .. x_{i-1}, MASK, x_{i+1} ..]: causal, its position i sees only the
    # prefix and the MASK, so one forward pass of all SEQ rows per sequence gives every term.
    tok = np.asarray(clean)
    rows = np.repeat(tok, SEQ, axis=0).reshape(3, SEQ, SEQ)
    rows[:, np.arange(SEQ), np.arange(SEQ)] = MASK_ID
    logits = nnx.jit(lambda m, x: m(x))(causal, jnp.asarray(rows.reshape(3 * SEQ, SEQ)))
    logp = _log_softmax64(logits).reshape(3, SEQ, SEQ, -1)[:, np.arange(SEQ), np.arange(SEQ)]
    want = -np.take_along_axis(logp, tok[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_block_diffusion_blocks_get_their_own_noise_levels(windows):
    """Per-block t: block 0 at t = 0 (mask probability eps) and block 1 at t = 1 mask (almost)
    nothing and everything respectively; validation draws are [batch, num_mc] and finite."""
    model = _model(causal=False, diffusion_block=8)
    t = jnp.array([[0.0, 1.0]] * 3)
    _, weights = block_diffusion_sequence_losses(model, windows[:, :-1], t, jax.random.key(9),
                                                 MASK_ID)
    masked = np.asarray(weights) > 0
    assert masked[:, 8:].all() and masked[:, :8].sum() <= 1
    draws = block_diffusion_validation_draws(model, windows, jax.random.key(0), MASK_ID, 4, 8)
    assert draws.shape == (3, 4) and np.isfinite(np.asarray(draws)).all()


def test_block_diffusion_pallas_model_equals_xla(windows):
    """The block-diffusion model through the Pallas kernel (interpret mode) equals the XLA one:
    loss and gradients."""
    xla = _model(causal=False, diffusion_block=4)
    pallas = _same_params(_model(causal=False, diffusion_block=4, attention_impl="pallas",
                                 attention_block_q=16, attention_block_k=16), xla)
    t = jnp.array([[0.3, 0.5, 0.7, 0.9]] * 3)

    def loss(model):
        return block_diffusion_sequence_losses(model, windows[:, :-1], t, jax.random.key(1),
                                               MASK_ID)[0].sum()

    (a, ga), (b, gb) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (xla, pallas))
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4,
                                   atol=1e-5 * np.abs(np.asarray(x)).max())


# ---------------------------------------------------------------- config


def _cfg(**changes) -> ConfigDict:
    cfg = get_config()
    for key, value in changes.items():
        section, name = key.split("__") if "__" in key else (None, key)
        if section:
            cfg[section][name] = value
        else:
            cfg[name] = value
    return cfg


@pytest.mark.parametrize(("changes", "message"), [
    ({"ar__randmask_ratio": 1.5}, "ar.randmask_ratio=1.5: must be in [0, 1]"),
    ({"ar__num_orders": 0}, "ar.num_orders=0: must be >= 1"),
    ({"ar__order_kind": "zigzag"}, "ar.order_kind='zigzag': allowed local, random"),
    ({"objective": "diffusion", "ar__num_orders": 4},
     "ar.num_orders set with objective='diffusion': the ar.* options apply to objective='ar'"),
    ({"ar__randmask_ratio": 0.5, "model__attention_impl": "pallas",
      "model__attention_dropout": 0.0},
     "ar.randmask_ratio=0.5 needs model.attention_impl='xla'"),
    ({"objective": "diffusion", "diffusion__noise_sampling": "sorted"},
     "diffusion.noise_sampling='sorted': allowed independent, stratified"),
    ({"diffusion__noise_sampling": "stratified"},
     "diffusion.noise_sampling='stratified' set with objective='ar': the diffusion.* options "
     "apply to objective='diffusion' only"),
    ({"objective": "block_diffusion", "block_diffusion__block_size": 5},
     "block_diffusion.block_size=5: must be >= 1 and divide data.seq_len=128"),
    ({"objective": "block_diffusion", "model__attention_impl": "splash",
      "model__attention_dropout": 0.0},
     "model.attention_impl='splash': block diffusion allows auto, xla, pallas"),
])
def test_bad_ablation_options_are_named(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(_cfg(**changes))


def test_model_config_follows_the_objective():
    cfg = _cfg(objective="block_diffusion")
    m = transformer_config(cfg, 4096)
    assert (m.causal, m.diffusion_block, m.target_positions) == (False, 16, 0)
    cfg = _cfg(ar__target_positions=True)
    m = transformer_config(cfg, 4096)
    assert (m.causal, m.diffusion_block, m.target_positions) == (True, 0, 129)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ar_ablations", "block_diffusion"])
def test_ablation_trains_resumes_and_evaluates(variant, text_data_cfg, tmp_path):
    """A tiny run trains to a finite validation loss below the uniform log(vocab), and
    `dvar eval`'s validation reproduces the logged loss: AR with all its ablations at once
    (4 orders, target positions, token masking; they compose), and block diffusion."""
    from dvar_jax.eval.loading import load_run
    from dvar_jax.eval.validation import evaluate_validation
    from dvar_jax.run_dir import read_metrics
    from dvar_jax.train import train

    objective = "block_diffusion" if variant == "block_diffusion" else "ar"
    cfg = tiny_config(objective, text_data_cfg.path, text_data_cfg.cache_dir)
    cfg.data.epochs = 1.0
    if variant == "ar_ablations":
        cfg.ar.num_orders, cfg.ar.target_positions, cfg.ar.randmask_ratio = 4, True, 0.5
    else:
        cfg.block_diffusion.block_size = 8
    summary = train(cfg, tmp_path, progress=False)
    assert summary.completed and math.isfinite(summary.best_val_loss)
    assert summary.best_val_loss < math.log(400)
    run = load_run(tmp_path, "latest")
    logged = [r for r in read_metrics(tmp_path) if "val_loss" in r][-1]
    result = evaluate_validation(run, num_mc=cfg.eval.num_mc, batch_size=cfg.eval.batch_size,
                                 seed=cfg.eval.seed, validation_tokens=cfg.data.validation_tokens)
    np.testing.assert_allclose(result["val_loss"], logged["val_loss"], rtol=1e-5)
