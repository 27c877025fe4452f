"""Autoregressive next-token objective (PAPER.md §1.2): inputs tokens[:-1], targets tokens[1:]."""

import jax
import optax


def ar_token_losses(model, tokens: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy per position: tokens [batch, seq + 1] -> [batch, seq] float32."""
    logits = model(tokens[:, :-1], dropout_rng=dropout_rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def ar_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over all batch * seq positions. `mask_id` is unused by AR."""
    del mask_id
    loss = ar_token_losses(model, tokens, dropout_rng=rng).mean()
    return loss, {}


def ar_validation_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                       num_mc: int) -> jax.Array:
    """Exact NLL summed over each sequence's positions: [batch, seq + 1] -> [batch]."""
    del rng, mask_id, num_mc
    return ar_token_losses(model, tokens).sum(axis=-1)
