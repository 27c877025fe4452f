"""JAX's TPU splash attention kernel behind the model's [batch, seq, heads, head_dim] layout.

`splash_attention(q, k, v, causal=...)` computes what
`dvar_jax.model.attention.dot_product_attention` computes (scale 1/sqrt(head_dim), float32
softmax, no dropout) with `jax.experimental.pallas.ops.tpu.splash_attention`, the block-sparse
flash attention kernel that JAX ships for TPU (forward, dq and dkv kernels under its own
custom VJP). This module only adapts shapes:

* splash takes one batch element as [heads, seq, head_dim]: the wrapper transposes and vmaps
  over batch;
* splash does not scale the scores: q is multiplied by 1/sqrt(head_dim) first (in q's dtype,
  so bfloat16 inputs carry one extra rounding of q that the reference does not have);
* the mask is a `CausalMask` or `FullMask` per head (`MultiHeadMask`), turned into splash's
  block-sparsity tables once per (causal, heads, seq, block, interpret) and cached.

Splash needs seq to be a multiple of its blocks, and its blocks to be multiples of 128 (the TPU
lane width); it does not pad. The block used is the largest of 512, 256, 128 that divides seq,
for the forward and both backward kernels; any other seq raises a ValueError. Dropout on the
attention probabilities is not supported (use the xla implementation).

interpret: None runs Pallas interpret mode on a CPU backend and compiles through Mosaic on TPU;
a GPU backend is refused (splash is a Mosaic TPU kernel), as in `flash_attention`.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from dvar_jax.kernels.common import resolve_interpret

LANES = 128  # splash blocks must be multiples of the TPU lane width
BLOCK_CHOICES = (512, 256, 128)  # largest first: bigger blocks amortise per-step overhead


def splash_block(seq: int) -> int:
    """The block size (queries and keys, every kernel) used for a sequence of length `seq`."""
    for block in BLOCK_CHOICES:
        if seq > 0 and seq % block == 0:
            return block
    raise ValueError(f"splash_attention: seq={seq} must be a positive multiple of {LANES} "
                     "(splash neither pads nor takes smaller blocks); use attention_impl "
                     "'pallas' or 'xla' for this length")


@functools.lru_cache(maxsize=64)
def _kernel(causal: bool, heads: int, seq: int, block: int, interpret: bool):
    """The splash kernel for one [heads, seq, head_dim] batch element.

    Cached because building it evaluates the mask block by block in numpy. Built under
    `ensure_compile_time_eval` so that its mask tables are concrete arrays even when the first
    call happens inside a trace: a cached tracer would leak into every later trace.
    """
    one = sm.CausalMask((seq, seq)) if causal else sm.FullMask((seq, seq))
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha_single_device(sm.MultiHeadMask([one] * heads),
                                                block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                     interpret: bool | None = None) -> jax.Array:
    """Softmax attention over [batch, seq, heads, head_dim] q, k, v; returns the same shape.

    Matches `dot_product_attention(q, k, v, causal=causal)`, differentiable in q, k, v.
    seq must be a multiple of 128 (ValueError otherwise). interpret: None = interpret mode on a
    CPU backend, Mosaic on TPU; GPU raises NotImplementedError.
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("splash_attention: q, k, v must share one [batch, seq, heads, head_dim] "
                         f"shape, got {q.shape}, {k.shape}, {v.shape}")
    _, seq, heads, head_dim = q.shape
    kernel = _kernel(bool(causal), heads, seq, splash_block(seq), resolve_interpret(interpret))
    scale = 1.0 / math.sqrt(head_dim)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # [batch, heads, seq, head_dim] and back
    out = jax.vmap(kernel)(to_heads((q * scale).astype(q.dtype)), to_heads(k), to_heads(v))
    return to_heads(out)
