"""The output layer's loss: weighted cross-entropy of the final hidden states against the tied
embedding, summed per sequence, by `model.loss_impl`.

* `xla`: the [batch, seq, vocab] float32 logits, then log-softmax (the reference).
* `chunked`: pure JAX, vocabulary chunks with an online logsumexp (never the whole logits).
* `pallas`: the fused Pallas kernels (tokens x vocabulary blocks, VMEM only; interpret mode on
  CPU). XLA cannot partition a Pallas call, so on a mesh it runs per batch shard with the
  embedding gathered whole (its gradient summed back), as the attention kernel does.

All three give, per sequence b, sum_s weights[b, s] * CE(logits[b, s], targets[b, s]): AR calls
it with weights 1, masked diffusion with 1/p on masked positions and 0 elsewhere.
"""

from functools import partial

import jax
import jax.numpy as jnp
import optax

from dvar_jax.kernels.cross_entropy import CROSS_ENTROPY_IMPLS
from dvar_jax.sharding import per_shard

LOSS_IMPLS = tuple(CROSS_ENTROPY_IMPLS)
# Logical names, per shard: a sequence's states and the vocabulary must be whole on a device.
_HIDDEN_AXES = ("batch", None, None)
_TOKEN_AXES = ("batch", None)
_EMBEDDING_AXES = (None, None)


def logits_sequence_losses(logits: jax.Array, targets: jax.Array,
                           weights: jax.Array) -> jax.Array:
    """sum_s weights * CE per sequence from logits [batch, seq, vocab]: -> [batch] float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(weights * ce, axis=-1)


def _kernel_sequence_losses(impl: str, hidden, embedding, targets, weights, *, block_t: int,
                            block_v: int) -> jax.Array:
    blocks = {"block_v": block_v} if impl == "chunked" else {"block_t": block_t, "block_v": block_v}
    cross_entropy = partial(CROSS_ENTROPY_IMPLS[impl], **blocks)
    # One call per sequence (vmap adds a grid axis to the kernels) keeps per-sequence sums, which
    # validation needs, at no cost over one call on the flattened tokens.
    return jax.vmap(lambda h, t, w: cross_entropy(h, embedding, t, w)[0])(hidden, targets,
                                                                          weights)


def kernel_sequence_losses(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                           weights: jax.Array, *, impl: str, block_t: int = 256,
                           block_v: int = 512) -> jax.Array:
    """sum_s weights * CE per sequence without [batch, seq, vocab] logits.

    hidden: [batch, seq, d_model]; embedding: [vocab, d_model] (cast to hidden's dtype, as the
    reference's matmul does); targets: [batch, seq] int; weights: [batch, seq]. -> [batch].
    """
    if impl not in ("chunked", "pallas"):
        raise ValueError(f"model.loss_impl={impl!r}: kernel paths are chunked, pallas")
    embedding = embedding.astype(hidden.dtype)
    fn = partial(_kernel_sequence_losses, impl, block_t=block_t, block_v=block_v)
    if impl == "chunked":  # pure JAX: XLA partitions it like any other op
        return fn(hidden, embedding, targets, weights)
    return per_shard(fn, (hidden, embedding, targets, weights),
                     [_HIDDEN_AXES, _EMBEDDING_AXES, _TOKEN_AXES, _TOKEN_AXES],
                     out_names=("batch",))
