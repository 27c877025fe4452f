"""Pallas kernels (TPU; interpret mode on CPU) and their pure-JAX counterparts.

flash_attention: blocked softmax attention with a custom VJP, [batch, seq, heads, head_dim].
splash_attention: JAX's TPU splash attention kernel adapted to the same layout.
cross_entropy: weighted cross-entropy against the tied embedding without [T, V] logits
(`xla`, `chunked` and `pallas` implementations behind one signature).
masks: the structural attention mask predicates, shared with the model's XLA attention.
common: what the kernels share (masked-score value, tile unit, interpret-or-compile choice).

In the lowest layer (with sharding, the packaged configs and the file modules), and imports
nothing else from dvar_jax (docs/architecture.md; tests/test_layers.py enforces it). Design
notes: docs/kernels.md.
"""

from dvar_jax.kernels.cross_entropy import (
    CROSS_ENTROPY_IMPLS,
    chunked_cross_entropy,
    fused_cross_entropy,
    get_cross_entropy,
    xla_cross_entropy,
)
from dvar_jax.kernels.flash_attention import debug_block_visits, flash_attention
from dvar_jax.kernels.splash import splash_attention

__all__ = [
    "CROSS_ENTROPY_IMPLS",
    "chunked_cross_entropy",
    "debug_block_visits",
    "flash_attention",
    "fused_cross_entropy",
    "get_cross_entropy",
    "splash_attention",
    "xla_cross_entropy",
]
