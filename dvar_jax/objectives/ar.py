"""Autoregressive next-token objective (PAPER.md §1.2): inputs tokens[:-1], targets tokens[1:]."""

import jax
import jax.numpy as jnp


def ar_sequence_losses(model, tokens: jax.Array,
                       dropout_rng: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy summed per sequence: tokens [batch, seq + 1] -> [batch]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return model.sequence_losses(inputs, targets, jnp.ones(targets.shape, jnp.float32),
                                 dropout_rng=dropout_rng)


def ar_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over all batch * seq positions. `mask_id` is unused by AR."""
    del mask_id
    batch, window = tokens.shape
    return ar_sequence_losses(model, tokens, dropout_rng=rng).sum() / (batch * (window - 1)), {}


def ar_validation_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                       num_mc: int) -> jax.Array:
    """Exact NLL summed over each sequence's positions: [batch, seq + 1] -> [batch]."""
    del rng, mask_id, num_mc
    return ar_sequence_losses(model, tokens)


def ar_validation_draws(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                        num_mc: int) -> jax.Array:
    """`ar_validation_loss` as one exact "draw": [batch, seq + 1] -> [batch, 1]."""
    return ar_validation_loss(model, tokens, rng, mask_id, num_mc)[:, None]
