"""Autoregressive next-token objective (PAPER.md §1.2): inputs tokens[:-1], targets tokens[1:].

The study's AR ablations (PAPER.md §8) are variants of the training loss, described by an
`ARVariant`: token masking (`randmask`), N token orders, and the sigma-GPT target-position
input. Validation is always plain left-to-right NLL.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dvar_jax.objectives.augment import randmask_attention
from dvar_jax.objectives.orderings import permute_windows
from dvar_jax.objectives.rows import BatchRows, batch_size, dropout_key, take


class ARVariant(NamedTuple):
    """What an AR training step does beyond plain next-token prediction; defaults are plain AR.

    orders: [N, L] int permutations (orderings.make_orders), or None for left to right only.
    randmask_ratio: share of query positions whose keys are randomly blocked (augment.py).
    The model's target-position table, when it has one, is fed the permuted targets' positions.
    `orders` of one row (the identity) trains exactly as plain AR.
    """

    orders: np.ndarray | None = None
    randmask_ratio: float = 0.0

    @property
    def plain(self) -> bool:
        return self.orders is None and self.randmask_ratio == 0


PLAIN_AR = ARVariant()


def ar_sequence_losses(model, tokens: jax.Array,
                       dropout_rng: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy summed per sequence: tokens [batch, seq + 1] -> [batch]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return model.sequence_losses(inputs, targets, jnp.ones(targets.shape, jnp.float32),
                                 dropout_rng=dropout_rng)


def ordered_ar_sequence_losses(model, tokens: jax.Array, perms: jax.Array,
                               attention_mask: jax.Array | None = None,
                               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy in per-sequence orders, summed per sequence -> [batch].

    tokens: [batch, seq + 1] windows; perms: [batch, seq] orders of positions 1..seq
    (orderings.permute_windows). Inputs keep their original RoPE positions; a model with a
    target-position table is told each target's original position.
    """
    inputs, targets, positions, target_positions = permute_windows(tokens, perms)
    return model.sequence_losses(inputs, targets, jnp.ones(targets.shape, jnp.float32),
                                 positions, dropout_rng, target_positions=target_positions,
                                 attention_mask=attention_mask)


def ar_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
            variant: ARVariant = PLAIN_AR, rows: BatchRows | None = None
            ) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over all batch * seq positions. `mask_id` is unused by AR.

    Plain AR uses `rng` for dropout only, so its losses do not depend on the variant code; the
    order choice and the token mask draw from keys folded out of it, for the whole global batch
    (rows: which rows of it `tokens` are, objectives/rows.py; None: all of it).
    """
    del mask_id
    batch, window = tokens.shape
    dropout_rng = dropout_key(rows, rng)
    if variant.plain:
        losses = ar_sequence_losses(model, tokens, dropout_rng=dropout_rng)
        return losses.sum() / (batch * (window - 1)), {}
    total = batch_size(rows, batch)
    mask = None
    if variant.randmask_ratio > 0:
        mask = take(rows, randmask_attention(jax.random.fold_in(rng, 2), total, window - 1,
                                             variant.randmask_ratio))
    orders = jnp.arange(window - 1)[None] if variant.orders is None else jnp.asarray(variant.orders)
    choice = take(rows, jax.random.randint(jax.random.fold_in(rng, 1), (total,), 0,
                                           orders.shape[0]))
    losses = ordered_ar_sequence_losses(model, tokens, orders[choice], mask,
                                        dropout_rng=dropout_rng)
    return losses.sum() / (batch * (window - 1)), {}


def ar_validation_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                       num_mc: int) -> jax.Array:
    """Exact NLL summed over each sequence's positions: [batch, seq + 1] -> [batch].

    Left to right for every AR variant (the study evaluates N-ordering models that way).
    """
    del rng, mask_id, num_mc
    return ar_sequence_losses(model, tokens)


def ar_validation_draws(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                        num_mc: int) -> jax.Array:
    """`ar_validation_loss` as one exact "draw": [batch, seq + 1] -> [batch, 1]."""
    return ar_validation_loss(model, tokens, rng, mask_id, num_mc)[:, None]
