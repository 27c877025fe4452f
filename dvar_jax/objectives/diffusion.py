"""Masked diffusion objective exactly as the study's code (PAPER.md §5).

tokens[:, :seq] are the clean sequence (the window's last token is dropped); per sequence
t ~ U(0, 1) and p = (1 - eps) t + eps; each token is replaced by MASK with probability p; the
loss is the cross-entropy on masked positions weighted by 1/p, summed and divided by
batch * seq (all positions, not the masked count): an unbiased estimate of the per-token
negative ELBO.

Validation estimates the same expectation with less variance: per draw a masked count m,
stratified over 1..seq, exactly m positions masked, and the weight E[1/p | m masked] x seq
(docs/diffusion_validation.md derives it and measures the variance).
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import betainc

from dvar_jax.objectives.rows import BatchRows, batch_size, dropout_key, take

MASK_EPS = 1e-3


def mask_tokens(clean: jax.Array, t: jax.Array, rng: jax.Array, mask_id: int,
                eps: float = MASK_EPS, rows: BatchRows | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """The forward process at noise levels t: (noisy tokens, loss weights), both [batch, seq].

    clean: [batch, seq] token ids; t: [batch] in [0, 1] (one level per sequence), or
    [batch, seq] (one per token: block diffusion's per-block levels). Each token becomes
    `mask_id` with probability p = (1 - eps) t + eps; the weights are 1/p where masked, else 0.
    rows: the call's rows of the global batch (objectives/rows.py); the uniforms are drawn for
    the whole batch, so a row is masked alike in any microbatch.
    """
    p = (1.0 - eps) * t + eps
    if p.ndim == 1:
        p = p[:, None]
    # u < p is jax.random.bernoulli(rng, p, shape) to the bit, drawn for the whole batch.
    total = batch_size(rows, clean.shape[0])
    masked = take(rows, jax.random.uniform(rng, (total, clean.shape[1]), p.dtype)) < p
    weights = jnp.where(masked, 1.0 / p, 0.0).astype(jnp.float32)
    return jnp.where(masked, mask_id, clean), weights


def masked_diffusion_sequence_losses(model, clean: jax.Array, t: jax.Array, rng: jax.Array,
                                     mask_id: int, dropout_rng: jax.Array | None = None,
                                     eps: float = MASK_EPS, rows: BatchRows | None = None
                                     ) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sums of CE / p over masked positions at noise levels t: ([batch], weights).

    clean: [batch, seq]; t: [batch]. The weights [batch, seq] are returned for statistics.
    """
    noisy, weights = mask_tokens(clean, t, rng, mask_id, eps, rows)
    return model.sequence_losses(noisy, clean, weights, dropout_rng=dropout_rng), weights


NOISE_SAMPLINGS = ("independent", "stratified")


def diffusion_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                   rows: BatchRows | None = None, stratified: bool = False
                   ) -> tuple[jax.Array, dict]:
    """Training loss on windows [batch, seq + 1]: sum of weighted masked CE / (batch * seq).

    rows: which rows of the global batch `tokens` are (objectives/rows.py); None: all of it.
    stratified: the global batch's noise levels are `stratified_times` (one per stratum, in
    row order), not independent uniforms; the same expectation with less variance."""
    clean = tokens[:, :-1]
    t_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    total = batch_size(rows, clean.shape[0])
    if stratified:
        t = take(rows, stratified_times(t_rng, total))
    else:
        t = take(rows, jax.random.uniform(t_rng, (total,)))
    losses, weights = masked_diffusion_sequence_losses(model, clean, t, mask_rng, mask_id,
                                                       dropout_key(rows, dropout_rng), rows=rows)
    return losses.sum() / clean.size, {"masked_fraction": jnp.mean(weights > 0)}


def stratified_times(rng: jax.Array, num_mc: int) -> jax.Array:
    """num_mc noise levels t_k = (u + k / num_mc) mod 1, u ~ U(0, 1): one per stratum of [0, 1)."""
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(num_mc) / num_mc, 1.0)


def masked_count_weights(seq_len: int, eps: float = MASK_EPS) -> np.ndarray:
    """float64 [seq_len]: entry m - 1 is seq_len * a_m, where a_m = P(m masked) E[1/p | m masked]
    under the training forward process (p ~ U(eps, 1), each of seq_len tokens masked with
    probability p) = (1 - I_eps(m, seq_len - m + 1)) / (m (1 - eps)), I the regularized
    incomplete beta function. With m drawn uniformly from 1..seq_len, these weights make the
    count estimator's expectation the training loss's, exactly (1/m when eps = 0)."""
    m = np.arange(1, seq_len + 1, dtype=np.float64)
    return seq_len * (1.0 - betainc(m, seq_len - m + 1, eps)) / (m * (1.0 - eps))


def stratified_counts(rng: jax.Array, batch: int, num_mc: int, seq_len: int) -> jax.Array:
    """int32 [batch, num_mc] masked counts in 1..seq_len: per sequence u ~ U(0, 1) and
    m_k = floor(((u + k / num_mc) mod 1) seq_len) + 1, so each draw is uniform on 1..seq_len
    and a sequence's draws cover the range evenly."""
    u = jax.random.uniform(rng, (batch, 1))
    strata = jnp.mod(u + jnp.arange(num_mc) / num_mc, 1.0)
    return jnp.minimum(jnp.floor(strata * seq_len).astype(jnp.int32), seq_len - 1) + 1


def mask_exactly(clean: jax.Array, counts: jax.Array, rng: jax.Array, mask_id: int
                 ) -> tuple[jax.Array, jax.Array]:
    """(noisy [batch, seq], masked [batch, seq] bool): in row b exactly counts[b] positions,
    chosen uniformly without replacement, replaced by `mask_id`."""
    # The positions whose uniform ranks below counts[b]: a uniform random subset of that size.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, clean.shape), axis=1), axis=1)
    masked = ranks < counts[:, None]
    return jnp.where(masked, mask_id, clean), masked


def diffusion_validation_draws(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                               num_mc: int) -> jax.Array:
    """Per-sequence negative-ELBO terms of num_mc mask draws: [batch, seq + 1] -> [batch, num_mc].

    Draw k masks exactly the sequence's k-th stratified count m (stratified_counts) and sums
    the masked cross-entropies weighted by masked_count_weights[m - 1]: each draw's expectation
    is the training loss's per sequence, and the variance is several times lower than with 1/p
    weights at a sampled p, which put weights up to 1/eps on one or two masked tokens."""
    clean = tokens[:, :-1]
    batch, seq = clean.shape
    weights_by_count = jnp.asarray(masked_count_weights(seq), jnp.float32)
    count_rng, mask_rng = jax.random.split(rng)
    counts = stratified_counts(count_rng, batch, num_mc, seq)

    def one_draw(_, k):
        noisy, masked = mask_exactly(clean, counts[:, k], jax.random.fold_in(mask_rng, k),
                                     mask_id)
        weights = jnp.where(masked, weights_by_count[counts[:, k] - 1][:, None], 0.0)
        return None, model.sequence_losses(noisy, clean, weights)

    _, draws = jax.lax.scan(one_draw, None, jnp.arange(num_mc))  # [num_mc, batch]
    return draws.T


def diffusion_validation_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                              num_mc: int) -> jax.Array:
    """Per-sequence ELBO estimate: [batch, seq + 1] -> [batch], the mean of num_mc draws."""
    return diffusion_validation_draws(model, tokens, rng, mask_id, num_mc).mean(axis=-1)
