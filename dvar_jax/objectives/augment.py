"""Input-side regularisers of the study's AR ablations (PAPER.md §8): token masking.

Attention dropout, the other one, is the model's `attention_dropout` (dropout on the attention
probabilities, model/attention.py); it needs nothing here.
"""

import jax
import jax.numpy as jnp

RANDMASK_EPS = 1e-3  # the study's lower bound on a selected query's blocking probability


def randmask_attention(rng: jax.Array, batch: int, seq: int, ratio: float,
                       eps: float = RANDMASK_EPS) -> jax.Array:
    """The study's `randmask` attention mask for AR: [batch, seq, seq] bool, True = may attend.

    Per sequence, each query position is selected with probability `ratio`; a selected query i
    draws t_i ~ U(eps, 1) and blocks each key independently with probability t_i. The blocked
    keys are OR-ed with the causal mask (so the result is causal), and the diagonal is always
    kept, so every query sees at least itself. The same mask serves every layer and head.
    """
    select_rng, t_rng, key_rng = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(select_rng, ratio, (batch, seq))  # [batch, seq_q]
    t = jax.random.uniform(t_rng, (batch, seq), minval=eps, maxval=1.0)
    blocked = jax.random.bernoulli(key_rng, t[..., None], (batch, seq, seq))
    blocked = jnp.logical_and(blocked, selected[..., None])
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    diagonal = jnp.eye(seq, dtype=bool)
    return jnp.logical_or(jnp.logical_and(causal, ~blocked), diagonal)
