"""Attention and rotary position embeddings: pure functions of arrays.

`model.attention_impl` selects the implementation: `xla` (the reference every other one is
checked against), `pallas` (dvar_jax/kernels/flash_attention.py: our blocked kernel, no
[seq, seq] matrix in memory; interpret mode on CPU) or `splash` (dvar_jax/kernels/splash.py:
JAX's TPU splash attention kernel; seq a multiple of 128; interpret mode on CPU).

What may attend to what is, besides `causal`, one of two extras: a structural block-diffusion
mask (`diffusion_block`: kernels/masks.py, on the xla and pallas paths) or a dense per-sequence
mask chosen by the objective (`mask`: AR token masking, xla only).
"""

from functools import partial

import jax
import jax.numpy as jnp

from dvar_jax.kernels.masks import block_diffusion_mask
from dvar_jax.sharding import per_shard

ATTENTION_IMPLS = ("xla", "pallas", "splash")
# Logical names of q, k, v and the output [batch, seq, heads, head_dim].
QKV_AXES = ("batch", "seq", "heads", None)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles, NeoX rotate-half layout (PAPER.md §1.1).

    positions: [batch or 1, seq] integer position ids. Returns two float32
    [batch or 1, seq, head_dim] arrays, the frequencies repeated as cat(angle, angle).
    """
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin for x: [batch, seq, heads, head_dim].

    cos, sin: [batch or 1, seq, head_dim] from `rope_tables`.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    # Rotate in float32: bfloat16 angles lose the low-order position bits at long sequences.
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    diffusion_block: int = 0,
    mask: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention over [batch, seq, heads, head_dim] inputs; returns the same shape.

    Scale 1/sqrt(head_dim) (Megatron's 1/sqrt(kv_channels)). Softmax in float32. Dropout on the
    attention probabilities when `dropout_rng` is given and the rate is positive.
    diffusion_block: > 0 applies `block_diffusion_mask` with that block (inputs [noisy; clean]).
    mask: [batch, seq, seq] bool, True where query may attend key; AND-ed with the others.
    """
    head_dim = q.shape[-1]
    seq_q, seq_k = q.shape[1], k.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / jnp.sqrt(jnp.float32(head_dim)))
    allowed = None  # [batch or 1, 1, seq_q, seq_k]
    if causal:
        allowed = jnp.tril(jnp.ones((seq_q, seq_k), dtype=bool))[None, None]
    if diffusion_block:
        allowed = block_diffusion_mask(seq_q, diffusion_block)[None, None]
    if mask is not None:
        allowed = mask[:, None] if allowed is None else jnp.logical_and(allowed, mask[:, None])
    if allowed is not None:
        logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _kernel(impl: str):
    """The Pallas attention function of `impl`; imported lazily (Pallas import is not free)."""
    if impl == "pallas":
        from dvar_jax.kernels.flash_attention import flash_attention

        return flash_attention
    from dvar_jax.kernels.splash import splash_attention

    return splash_attention


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str, causal: bool,
              diffusion_block: int = 0, mask: jax.Array | None = None,
              dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
              blocks: tuple[int, int] = (128, 128)) -> jax.Array:
    """Attention by the chosen implementation; [batch, seq, heads, head_dim] in and out.

    diffusion_block, mask: as `dot_product_attention` (mask: xla only; diffusion_block: xla and
    pallas). blocks: (query, key) block sizes of the pallas kernel (splash picks its own).

    A Pallas kernel (pallas, splash) is not partitioned by XLA: on a mesh it runs per shard
    (batch and heads are independent), through `per_shard`.
    """
    if impl == "xla":
        return dot_product_attention(q, k, v, causal=causal, diffusion_block=diffusion_block,
                                     mask=mask, dropout_rate=dropout_rate,
                                     dropout_rng=dropout_rng)
    if impl in ("pallas", "splash"):
        if dropout_rate > 0.0 and dropout_rng is not None:
            raise ValueError(f"attention dropout needs model.attention_impl='xla', not {impl!r}")
        if mask is not None:
            raise ValueError(f"a per-sequence attention mask (AR token masking) needs "
                             f"model.attention_impl='xla', not {impl!r}")
        if diffusion_block and impl == "splash":
            raise ValueError("block diffusion needs model.attention_impl 'xla' or 'pallas', "
                             "not 'splash'")
        kernel = partial(_kernel(impl), causal=causal)
        if impl == "pallas":
            kernel = partial(kernel, diffusion_block=diffusion_block, block_q=blocks[0],
                             block_k=blocks[1])
        return per_shard(kernel, (q, k, v), QKV_AXES)
    raise ValueError(f"model.attention_impl={impl!r}: allowed {', '.join(ATTENTION_IMPLS)}")
