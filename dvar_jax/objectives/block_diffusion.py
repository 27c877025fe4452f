"""Block diffusion (Arriola et al., ICLR 2025): AR over blocks of B tokens, masked diffusion
within each block.

The sequence x [batch, L] (the window's first L tokens, as masked diffusion) is cut into L / B
blocks. Each block b gets its own noise level t_b ~ U(0, 1) and is masked as in
diffusion.mask_tokens. The model reads [noisy; clean] (2L tokens, both halves at positions
0..L-1) under kernels/masks.py's block mask: a noisy block sees itself and the clean blocks
before it, so its loss is the diffusion loss of block b given a clean prefix. The loss is the
1/p-weighted cross-entropy on masked noisy positions, summed and divided by batch * L, as
masked diffusion. B = L is exactly masked diffusion; B = 1 predicts each token from the clean
tokens before it, as AR.
"""

import jax
import jax.numpy as jnp

from dvar_jax.objectives.diffusion import MASK_EPS, mask_tokens, stratified_times
from dvar_jax.objectives.rows import BatchRows, batch_size, dropout_key, take


def block_diffusion_sequence_losses(model, clean: jax.Array, t: jax.Array, rng: jax.Array,
                                    mask_id: int, dropout_rng: jax.Array | None = None,
                                    eps: float = MASK_EPS, rows: BatchRows | None = None
                                    ) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sums of CE / p over masked positions: ([batch], weights [batch, L]).

    clean: [batch, L]; t: [batch, L / B] noise levels, one per block (the model's
    `diffusion_block` is B).
    """
    length = clean.shape[1]
    block = length // t.shape[1]
    noisy, weights = mask_tokens(clean, jnp.repeat(t, block, axis=1), rng, mask_id, eps, rows)
    positions = jnp.tile(jnp.arange(length), 2)[None]
    losses = model.sequence_losses(jnp.concatenate([noisy, clean], axis=1), clean, weights,
                                   positions, dropout_rng)
    return losses, weights


def block_diffusion_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                         block_size: int, rows: BatchRows | None = None) -> tuple[jax.Array, dict]:
    """Training loss on windows [batch, seq + 1]: weighted masked CE summed / (batch * seq).

    rows: which rows of the global batch `tokens` are (objectives/rows.py); None: all of it."""
    clean = tokens[:, :-1]
    t_rng, mask_rng, dropout_rng = jax.random.split(rng, 3)
    total = batch_size(rows, clean.shape[0])
    t = take(rows, jax.random.uniform(t_rng, (total, clean.shape[1] // block_size)))
    losses, weights = block_diffusion_sequence_losses(model, clean, t, mask_rng, mask_id,
                                                      dropout_key(rows, dropout_rng), rows=rows)
    return losses.sum() / clean.size, {"masked_fraction": jnp.mean(weights > 0)}


def block_diffusion_validation_draws(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                                     num_mc: int, block_size: int) -> jax.Array:
    """Per-sequence negative-ELBO terms of num_mc draws: [batch, seq + 1] -> [batch, num_mc].

    Each (sequence, block) has its own stratified set of num_mc noise levels.
    """
    clean = tokens[:, :-1]
    batch, length = clean.shape
    n_blocks = length // block_size
    t_rng, mask_rng = jax.random.split(rng)
    t = jax.vmap(stratified_times, in_axes=(0, None))(
        jax.random.split(t_rng, batch * n_blocks), num_mc).reshape(batch, n_blocks, num_mc)

    def one_draw(_, k):
        losses, _ = block_diffusion_sequence_losses(
            model, clean, t[:, :, k], jax.random.fold_in(mask_rng, k), mask_id)
        return None, losses

    _, draws = jax.lax.scan(one_draw, None, jnp.arange(num_mc))  # [num_mc, batch]
    return draws.T


def block_diffusion_validation_loss(model, tokens: jax.Array, rng: jax.Array, mask_id: int,
                                    num_mc: int, block_size: int) -> jax.Array:
    """Per-sequence negative-ELBO estimate: [batch, seq + 1] -> [batch], mean of num_mc draws."""
    return block_diffusion_validation_draws(model, tokens, rng, mask_id, num_mc,
                                            block_size).mean(axis=-1)
