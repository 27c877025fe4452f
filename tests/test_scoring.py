"""Scorer: AR exact log-likelihoods, the study's diffusion Monte Carlo estimate and chain rule,
greedy continuations, against answers computed by hand (float64 numpy) on tiny models."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.eval import scoring
from dvar_jax.eval.scoring import Scorer, mc_draws, request_key
from dvar_jax.model.output import logits_sequence_losses
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import get_objective

VOCAB = 64  # embedding rows
MASK_ID = 60  # the tokenizer has ids 0..59; 61..63 are padding rows
EOD = 1
SEQ = 16
AR, DIFFUSION = get_objective("ar"), get_objective("diffusion")


def tiny_transformer(causal: bool, seed: int = 0) -> Transformer:
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, head_dim=16,
                            causal=causal)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def ar_model():
    return tiny_transformer(causal=True)


@pytest.fixture(scope="module")
def diffusion_model():
    return tiny_transformer(causal=False, seed=1)


class ToyModel(nnx.Module):
    """`sequence_losses` from `__call__`, as the Transformer's xla path computes it."""

    def sequence_losses(self, tokens, targets, weights):
        return logits_sequence_losses(self(tokens), targets, weights)


class ConstantModel(ToyModel):
    """Logits table[position] whatever the input: [SEQ, VOCAB]."""

    def __init__(self, table: np.ndarray):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, tokens):
        return jnp.broadcast_to(self.table[...][:tokens.shape[1]], (*tokens.shape, VOCAB))


class CountingModel(ToyModel):
    """Bidirectional toy: every position predicts the token (number of non-MASK inputs), with a
    confidence that grows with the position's scale, so the filling order is readable from the
    committed tokens."""

    def __init__(self, scales):
        self.scales = nnx.Param(jnp.asarray(scales, jnp.float32))  # [SEQ]

    def __call__(self, tokens):
        count = jnp.sum(tokens != MASK_ID, axis=-1)
        return self.scales[...][None, :, None] * jax.nn.one_hot(count, VOCAB)[:, None, :]


class SuccessorModel(ToyModel):
    """Causal toy: position j predicts tokens[j] + 1."""

    def __call__(self, tokens):
        return 10.0 * jax.nn.one_hot(tokens + 1, VOCAB)


def log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


_forward = jax.jit(lambda graphdef, state, tokens: nnx.merge(graphdef, state)(tokens),
                   static_argnums=0)


def logp_of(model, row) -> np.ndarray:
    """Float64 log-softmax of model(row) for one row [SEQ] (jitted: eager runs compile every op
    for every new shape): [SEQ, VOCAB]."""
    assert len(row) == SEQ
    return log_softmax64(_forward(*nnx.split(model), jnp.asarray([row], jnp.int32))[0])


def causal_row(seq) -> list[int]:
    """seq right-padded to SEQ with arbitrary tokens (not the Scorer's eod), which a causal
    model cannot see from earlier positions."""
    return list(seq) + [MASK_ID - 1] * (SEQ - len(seq))


def ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(3, MASK_ID, n).tolist()


# ---------------------------------------------------------------- AR


def ar_reference(model, ctx, cont) -> tuple[float, bool]:
    """Unpadded, untruncated: log p and is_greedy from a float64 log-softmax of model(input)."""
    full = (list(ctx) or [EOD]) + list(cont)
    logp = logp_of(model, causal_row(full[:-1]))
    steps = range(len(full) - 1 - len(cont), len(full) - 1)
    ll = sum(logp[j, full[j + 1]] for j in steps)
    greedy = all(np.argmax(logp[j, :MASK_ID]) == full[j + 1] for j in steps)
    return ll, greedy


def ar_greedy_reference(model, ctx, n) -> list[int]:
    seq = list(ctx) or [EOD]
    for _ in range(n):
        seq.append(int(np.argmax(logp_of(model, causal_row(seq))[len(seq) - 1, :MASK_ID])))
    return seq[len(seq) - n:]


def test_ar_loglikelihood_is_exact_against_float64_numpy(ar_model):
    rng = np.random.default_rng(0)
    requests = [(ids(rng, 5), ids(rng, 3)), (ids(rng, 1), ids(rng, 1)), ([], ids(rng, 4)),
                (ids(rng, 10), ids(rng, 6))]
    ctx = ids(rng, 4)
    requests.append((ctx, ar_greedy_reference(ar_model, ctx, 3)))  # a greedy continuation
    scorer = Scorer(ar_model, AR, MASK_ID, SEQ, eod_id=EOD, batch_size=3)
    got = scorer.loglikelihood(requests)
    for (ll, greedy), (ctx, cont) in zip(got, requests, strict=True):
        want_ll, want_greedy = ar_reference(ar_model, ctx, cont)
        assert ll == pytest.approx(want_ll, rel=1e-5)
        assert greedy == want_greedy
    assert got[-1][1] and not all(g for _, g in got[:-1])
    assert [se for _, se in scorer.loglikelihood_with_stderr(requests)] == [0.0] * len(requests)
    # Batch size changes nothing.
    again = Scorer(ar_model, AR, MASK_ID, SEQ, eod_id=EOD, batch_size=2).loglikelihood(requests)
    np.testing.assert_allclose(np.array(again), np.array(got), rtol=1e-6)


def test_ar_empty_context_starts_from_eod_and_long_contexts_are_left_truncated(ar_model):
    rng = np.random.default_rng(1)
    scorer = Scorer(ar_model, AR, MASK_ID, SEQ, eod_id=EOD, batch_size=4)
    cont, long_ctx = ids(rng, 3), ids(rng, 40)
    got = scorer.loglikelihood([([], cont), ([EOD], cont), (long_ctx, cont),
                                (long_ctx[-(SEQ + 1 - 3):], cont), (long_ctx, ids(rng, SEQ))])
    (ll_empty, _), (ll_eod, _), (ll_long, g_long), (ll_cut, g_cut), (ll_full, _) = got
    assert ll_empty == pytest.approx(ll_eod, rel=1e-6)
    # The window holds SEQ inputs: 14 context tokens and the first 2 continuation tokens.
    assert (ll_long, g_long) == (pytest.approx(ll_cut, rel=1e-6), g_cut)
    assert ll_long == pytest.approx(ar_reference(ar_model, long_ctx[-14:], cont)[0], rel=1e-5)
    assert np.isfinite(ll_full)  # SEQ continuation tokens: one context token is left
    with pytest.raises(ValueError, match="at most 16"):
        scorer.loglikelihood([(long_ctx, ids(rng, SEQ + 1))])
    with pytest.raises(ValueError, match="empty continuation"):
        scorer.loglikelihood([(long_ctx, [])])


def test_ar_greedy_continuation(ar_model):
    scorer = Scorer(ar_model, AR, MASK_ID, SEQ, eod_id=EOD, batch_size=2)
    rng = np.random.default_rng(2)
    prompts = [(ids(rng, 3), 4), ([], 2), (ids(rng, 6), 0)]
    got = scorer.greedy_continuations(prompts)
    assert got == [ar_greedy_reference(ar_model, c, n) for c, n in prompts]
    assert scorer.greedy_continuation(*prompts[0]) == got[0]
    # Hand-built: successor model; long contexts keep their end; an empty one starts at eod.
    toy = Scorer(SuccessorModel(), AR, MASK_ID, 8, eod_id=EOD, batch_size=2)
    assert toy.greedy_continuations([([3, 5], 4), ([], 3), (list(range(3, 20)), 4)]) == [
        [6, 7, 8, 9], [2, 3, 4], [20, 21, 22, 23]]
    with pytest.raises(ValueError, match="at most 7"):
        toy.greedy_continuation([3], 8)


# ---------------------------------------------------------------- diffusion, Monte Carlo


@partial(jax.jit, static_argnums=2)
def _mc_draws(seed, index, num_mc):
    return mc_draws(request_key(seed, index), num_mc, SEQ)


def mc_reference(model, ctx, cont, index, seed, num_mc) -> tuple[float, float]:
    """The study's estimate from the same keys: float64 CE / p over masked continuation tokens,
    averaged over draws; with its standard error."""
    ctx = list(ctx)[max(0, len(ctx) - (SEQ - len(cont))):]
    clean = np.full(SEQ, MASK_ID)
    clean[:len(ctx) + len(cont)] = ctx + list(cont)
    scored = np.zeros(SEQ, bool)
    scored[len(ctx):len(ctx) + len(cont)] = True
    p, masks = _mc_draws(seed, index, num_mc)
    draws = []
    for d in range(num_mc):
        masked = np.asarray(masks[d]) & scored
        logp = logp_of(model, np.where(masked, MASK_ID, clean))
        draws.append(sum(logp[j, clean[j]] / float(p[d]) for j in np.flatnonzero(masked)))
    draws = np.array(draws)
    return draws.mean(), draws.std(ddof=1) / np.sqrt(num_mc) if num_mc > 1 else np.nan


def test_mc_draws_are_stratified_bernoulli_masks():
    p, masks = mc_draws(jax.random.key(3), 4, 20_000)
    assert sorted(np.floor(np.asarray(p) * 4).astype(int).tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(np.asarray(masks).mean(axis=1), np.asarray(p), atol=0.015)
    # The stratum offset is shared: p_i - p_0 = i/4 mod 1.
    np.testing.assert_allclose(np.mod(np.asarray(p) - p[0], 1.0), [0, 0.25, 0.5, 0.75],
                               atol=1e-6)


def test_mc_estimate_reproduced_by_hand_from_the_same_keys(diffusion_model):
    rng = np.random.default_rng(3)
    requests = [(ids(rng, 4), ids(rng, 5)), (ids(rng, 30), ids(rng, 3)), ([], ids(rng, 6))]
    scorer = Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=2,
                    num_mc=3, seed=5)
    got = scorer.loglikelihood_with_stderr(requests)
    for i, ((ll, se), (ctx, cont)) in enumerate(zip(got, requests, strict=True)):
        want_ll, want_se = mc_reference(diffusion_model, ctx, cont, i, 5, 3)
        assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-5)
        assert se == pytest.approx(want_se, rel=1e-4, abs=1e-5)


def test_mc_results_depend_on_seed_and_index_not_on_batch_size(diffusion_model):
    rng = np.random.default_rng(4)
    requests = [(ids(rng, 3 + i), ids(rng, 2 + i % 3)) for i in range(5)]

    def run(batch_size, seed=0):
        return np.array(Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD,
                               batch_size=batch_size, num_mc=3, seed=seed)
                        .loglikelihood_with_stderr(requests))

    # num_mc = 3 and batch_size = 2 as above: one compilation serves both tests.
    np.testing.assert_allclose(run(1), run(2), rtol=1e-5)
    assert not np.allclose(run(2), run(2, seed=1))
    # The same request at another index gets other masks.
    twice = Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=2,
                   num_mc=3).loglikelihood_with_stderr([requests[0]] * 3)
    assert len({ll for ll, _ in twice}) > 1


def test_mc_is_unbiased_for_input_independent_logits():
    """With logits that ignore the input, E[1{masked} / p] = 1 per token, so the estimate's mean
    is the exact continuation log-likelihood."""
    table = np.random.default_rng(5).normal(size=(SEQ, VOCAB)) * 2
    ctx, cont = [5, 6, 7], [8, 9, 10, 11, 12]
    exact = sum(log_softmax64(table)[3 + k, t] for k, t in enumerate(cont))
    scorer = Scorer(ConstantModel(table), DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=50,
                    num_mc=4)
    estimates = np.array([ll for ll, _ in scorer.loglikelihood_with_stderr([(ctx, cont)] * 200)])
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / np.sqrt(200)
    # Chain rule is exact for such a model.
    chain = Scorer(ConstantModel(table), DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=4,
                   diffusion_method="chain_rule")
    (ll, se), = chain.loglikelihood_with_stderr([(ctx, cont)])
    assert (ll, se) == (pytest.approx(exact, rel=1e-5), 0.0)
    # One draw has no standard error.
    one = Scorer(ConstantModel(table), DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=1,
                 num_mc=1)
    (ll, se), = one.loglikelihood_with_stderr([(ctx, cont)])
    assert np.isfinite(ll) and np.isnan(se)


def test_mc_draw_at_t_zero_masks_nothing_and_contributes_zero(monkeypatch):
    """p = t = 0 (the study's eps = 0): the masked sum is empty, so the draw gives 0, not NaN."""
    monkeypatch.setattr(scoring, "stratified_times", lambda rng, num_mc: jnp.zeros(num_mc))
    table = np.random.default_rng(6).normal(size=(SEQ, VOCAB))
    # num_mc = 5 is used by no other test, so this compiles afresh with the patched times.
    scorer = Scorer(ConstantModel(table), DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=1,
                    num_mc=5)
    assert scorer.loglikelihood_with_stderr([([4, 5], [6, 7])]) == [(0.0, 0.0)]


# ---------------------------------------------------------------- diffusion, chain rule


def test_chain_rule_against_hand_loop(diffusion_model):
    rng = np.random.default_rng(7)
    requests = [(ids(rng, 4), ids(rng, 3)), (ids(rng, 20), ids(rng, 2)), ([], ids(rng, 2))]
    scorer = Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=4,
                    diffusion_method="chain_rule")
    for (ll, _), (ctx, cont) in zip(scorer.loglikelihood_with_stderr(requests), requests,
                                    strict=True):
        ctx = ctx[max(0, len(ctx) - (SEQ - len(cont))):]
        want = 0.0
        for k in range(len(cont)):
            row = np.full(SEQ, MASK_ID)
            row[:len(ctx) + k] = ctx + cont[:k]
            want += logp_of(diffusion_model, row)[len(ctx) + k, cont[k]]
        assert ll == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------- diffusion, greedy filling


def test_diffusion_greedy_commits_the_most_confident_position_first():
    # Context at 0..1, continuation at 2..4 with confidences 1 < 3 > 2; the MASK padding at
    # 5..7 is the most confident of all but must never be filled. Step s sees 2 + s non-MASK
    # tokens, so the token committed at step s is 2 + s: order pos 3, 4, 2 -> [4, 2, 3].
    toy = CountingModel([0, 0, 1, 3, 2, 5, 5, 5])
    scorer = Scorer(toy, DIFFUSION, MASK_ID, 8, eod_id=EOD, batch_size=2)
    assert scorer.greedy_continuation([7, 8], 3) == [4, 2, 3]
    # Batched with rows of other lengths (and n = 0) gives the same. Row 2: position 2 (scale
    # 1) takes 1 first, then position 1 (scale 0: uniform logits, argmax token 0).
    assert scorer.greedy_continuations([([7, 8], 3), ([9], 2), ([7], 0)]) == [
        [4, 2, 3], [0, 1], []]
    # is_greedy of diffusion loglikelihood is exactly this reproduction.
    results = scorer.loglikelihood([([7, 8], [4, 2, 3]), ([7, 8], [2, 3, 4])])
    assert [g for _, g in results] == [True, False]
    with pytest.raises(ValueError, match="at most 8"):
        scorer.greedy_continuation([7], 9)


def test_diffusion_greedy_on_a_real_model_matches_a_hand_loop(diffusion_model):
    ctx, n = [5, 9, 12], 4
    row = np.full(SEQ, MASK_ID)
    row[:3] = ctx
    for _ in range(n):
        logp = logp_of(diffusion_model, row)
        open_ = np.flatnonzero(row[:3 + n] == MASK_ID)
        best = open_[np.argmax(logp[open_, :MASK_ID].max(axis=-1))]
        row[best] = np.argmax(logp[best, :MASK_ID])
    scorer = Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, batch_size=2)
    assert scorer.greedy_continuation(ctx, n) == row[3:3 + n].tolist()


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_are_one_line_errors(ar_model, diffusion_model):
    with pytest.raises(ValueError, match="objective='bert'"):
        Scorer(ar_model, get_objective("bert"), MASK_ID, SEQ, eod_id=EOD)
    with pytest.raises(ValueError, match="objective='block_diffusion' is not one of"):
        Scorer(diffusion_model, get_objective("block_diffusion"), MASK_ID, SEQ, eod_id=EOD)
    with pytest.raises(ValueError, match="diffusion_method='elbo'"):
        Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, diffusion_method="elbo")
    with pytest.raises(ValueError, match="needs a bidirectional model"):
        Scorer(ar_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD)
    with pytest.raises(ValueError, match="num_mc=0"):
        Scorer(diffusion_model, DIFFUSION, MASK_ID, SEQ, eod_id=EOD, num_mc=0)
    with pytest.raises(ValueError, match="mask_id=64 must be below the model's vocab_size=64"):
        Scorer(ar_model, AR, VOCAB, SEQ, eod_id=EOD)
    scorer = Scorer(ar_model, AR, MASK_ID, SEQ, eod_id=EOD)
    with pytest.raises(ValueError, match=r"request 1 has token id 60; allowed: .*\[0, 60\)"):
        scorer.loglikelihood([([3], [4]), ([3, MASK_ID], [4])])
    with pytest.raises(ValueError, match="n_tokens=-1"):
        scorer.greedy_continuation([3], -1)
