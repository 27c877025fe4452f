"""Structural attention masks as pure functions of query and key positions.

One predicate per mask kind, shared by the XLA attention (dvar_jax/model/attention.py,
evaluated on the whole [seq, seq] grid) and the Pallas kernel (flash_attention.py, evaluated per
[block_q, block_k] tile), so the two cannot disagree. True means the query may attend to the
key. It lives with the kernels, the lower of its two users.
"""

import jax
import jax.numpy as jnp


def _block_index(pos: jax.Array, block: int) -> jax.Array:
    """pos // block for non-negative int positions, as float32 whole numbers.

    TPU vector units have no integer division, so Mosaic rejects it in a kernel; (pos + 1/2) /
    block sits 1/(2 block) away from any integer, far beyond float32 rounding for positions
    below 2^20, so its floor is exact.
    """
    return jnp.floor((pos.astype(jnp.float32) + 0.5) / block)


def block_diffusion_allowed(q_pos: jax.Array, k_pos: jax.Array, half: int,
                            block: int) -> jax.Array:
    """Block diffusion's mask over a [noisy; clean] sequence of 2 * half positions.

    Arriola et al. 2025: a noisy token of block b sees the noisy tokens of block b (diffusion
    within the block) and the clean tokens of blocks < b (the clean context); a clean token of
    block b sees the clean tokens of blocks <= b (block-causal). q_pos, k_pos: broadcastable int
    arrays of positions in [0, 2 * half); positions >= 2 * half (padding) are never attended.
    """
    q_noisy, k_noisy = q_pos < half, k_pos < half
    q_block = _block_index(jnp.where(q_noisy, q_pos, q_pos - half), block)
    k_block = _block_index(jnp.where(k_noisy, k_pos, k_pos - half), block)
    # and/or only: a select between boolean vectors does not lower in Mosaic.
    k_clean = ~k_noisy
    noisy_query = (k_noisy & (q_block == k_block)) | (k_clean & (k_block < q_block))
    clean_query = k_clean & (k_block <= q_block)
    allowed = (q_noisy & noisy_query) | (~q_noisy & clean_query)
    return allowed & (k_pos < 2 * half)


def block_diffusion_mask(seq: int, block: int) -> jax.Array:
    """`block_diffusion_allowed` on the whole grid: [seq, seq] bool for seq = 2 * half."""
    if seq % 2:
        raise ValueError(f"block diffusion needs an even [noisy; clean] length, got {seq}")
    pos = jnp.arange(seq)
    return block_diffusion_allowed(pos[:, None], pos[None, :], seq // 2, block)
