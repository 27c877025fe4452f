"""Weighted cross-entropy against a tied output embedding without the [T, V] logits.

Every implementation has the signature

    impl(hidden [T, d], embedding [V, d], targets [T] int, weights [T] float)
        -> (weighted_loss_sum, weight_sum)

with weighted_loss_sum = sum_t w_t * (logsumexp_v(h_t . E_v) - h_t . E_{target_t}) and
weight_sum = sum_t w_t, both float32 scalars. AR training uses w = 1 (loss = sum / weight sum);
masked diffusion uses w = 1/p on masked positions and 0 elsewhere (loss = sum / (batch * seq)).

* `xla_cross_entropy`: the plain path, full float32 logits and log_softmax (the reference).
* `chunked_cross_entropy`: pure JAX, `lax.scan` over vocabulary chunks with an online
  logsumexp; a custom VJP rescans the chunks, so neither pass holds more than [T, block_v]
  logits.
* `fused_cross_entropy`: Pallas kernels blocked over tokens and vocabulary (online logsumexp in
  VMEM), and a custom VJP with two more kernels (dh over vocab blocks, dE over token blocks)
  that recompute each logits tile from the saved logsumexp.

Gradients: hidden and embedding get exact gradients; targets get none (integers); weights get
their true gradient, d loss_sum / d w_t = nll_t (plus 1 from weight_sum), which costs nothing
since the per-token nll is already at hand (the objectives do not need it).

Padding: a vocabulary not divisible by block_v is padded with zero embedding rows whose logits
are masked to a large negative value (exp gives exactly 0), so they change neither the
logsumexp nor the gradients; T not divisible by block_t is padded with zero-weight tokens. Blocks
must be positive multiples of 8 (ValueError otherwise); a block larger than the (8-rounded) axis
is shrunk to it. On TPU prefer block_v a multiple of 128 (the logits tile's lane axis).

Matmuls take the inputs' dtype and accumulate in float32; logits, logsumexp and the loss are
float32. For bfloat16 inputs the logits cotangent is cast to bfloat16 before the gradient
matmuls (as the MXU wants), so gradients carry bfloat16 rounding. Otherwise the three differ
only by floating-point rounding (the chunked and fused ones reorder the sums).

When each runs: `model.loss_impl` picks one (dvar_jax/model/output.py). interpret=None runs
`fused_cross_entropy` in Pallas interpret mode on a CPU backend and through Mosaic on TPU; a GPU
backend raises NotImplementedError. Memory figures, TPU compile checks and why the kernels do
not lower on GPU: docs/kernels.md.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dvar_jax.kernels.common import (
    MASK_VALUE,
    NN,
    NT,
    SUBLANE,
    TN,
    resolve_interpret,
    round_up,
)


def plan_axis(name: str, size: int, block: int) -> tuple[int, int]:
    """(block, padded size) for one axis: block a positive multiple of 8, shrunk to the axis,
    or lowered to a divisor of the axis when one is near."""
    if not isinstance(block, int) or block <= 0 or block % SUBLANE:
        raise ValueError(f"cross_entropy: {name}={block!r} must be a positive multiple of "
                         f"{SUBLANE} (axis size {size})")
    rounded = round_up(size, SUBLANE)
    block = min(block, rounded)
    # Padding costs memory and work on the whole axis (the embedding and its gradient are padded
    # copies): a smaller block that divides the axis is better, e.g. 384 for the study's 50,304
    # rows where 512 would pad 384 rows. Only blocks of the same tiling (multiples of 128 for
    # a 128+ block: the TPU lane width) and at least half the requested size are considered.
    unit = 128 if block >= 128 else SUBLANE
    for smaller in range(block, block // 2 - 1, -unit):
        if smaller % unit == 0 and rounded % smaller == 0:
            return smaller, rounded
    return block, round_up(size, block)


# Mosaic's default scoped VMEM limit is 16 MiB on every TPU generation; a kernel's blocks must
# fit under it with room for Mosaic's own temporaries.
VMEM_BUDGET = 12 * 2**20


def kernel_vmem_bytes(block_t: int, block_v: int, dim: int, itemsize: int) -> int:
    """VMEM the largest of the three kernels (dh or dE) holds: double-buffered hidden and
    embedding blocks and output block, a float32 accumulator of the output block, and the
    float32 logits tile with its cotangent."""
    larger = max(block_t, block_v)
    inputs = 2 * (block_t + block_v) * dim * itemsize
    output = 2 * larger * dim * itemsize + larger * dim * 4
    return inputs + output + 2 * block_t * block_v * 4


def fit_blocks_to_vmem(block_t: int, block_v: int, dim: int, itemsize: int) -> tuple[int, int]:
    """The requested blocks, the larger made smaller until the kernels fit VMEM_BUDGET: a wide
    model (d = 2560 at blocks 256 x 384 needs 14.5 MiB) gets smaller tiles. Blocks above 128
    step down by 128 (staying lane-aligned), smaller ones halve to a multiple of 8."""

    def smaller(block: int) -> int:
        return block - 128 if block > 128 else max(SUBLANE, block // 2 // SUBLANE * SUBLANE)

    while kernel_vmem_bytes(block_t, block_v, dim, itemsize) > VMEM_BUDGET:
        if max(block_t, block_v) <= SUBLANE:
            break
        if block_v >= block_t:
            block_v = smaller(block_v)
        else:
            block_t = smaller(block_t)
    return block_t, block_v


def _check_inputs(hidden, embedding, targets, weights) -> None:
    tokens, dim = hidden.shape
    if embedding.ndim != 2 or embedding.shape[1] != dim:
        raise ValueError(f"cross_entropy: embedding must be [V, {dim}], got {embedding.shape}")
    if targets.shape != (tokens,) or weights.shape != (tokens,):
        raise ValueError(f"cross_entropy: targets and weights must be [{tokens}], got "
                         f"{targets.shape} and {weights.shape}")


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(x, ((0, rows - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def _weighted_sums(weights: jax.Array, nll: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(weights * nll), jnp.sum(weights)


def xla_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                      weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reference: full float32 logits [T, V] = hidden @ embedding^T, then log_softmax."""
    _check_inputs(hidden, embedding, targets, weights)
    logits = jnp.dot(hidden, embedding.T, preferred_element_type=jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _weighted_sums(weights.astype(jnp.float32), nll)


def _masked_logits(hidden, chunk, start, vocab: int, padded: bool) -> tuple[jax.Array, jax.Array]:
    """float32 logits [T, block_v] of one vocab chunk, padded ids masked; and their vocab ids."""
    logits = lax.dot_general(hidden, chunk, NT, preferred_element_type=jnp.float32)
    ids = start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    if padded:
        logits = jnp.where(ids < vocab, logits, MASK_VALUE)
    return logits, ids


def _online_update(m, total, logits):
    """Folds one chunk of logits into the running max m and sum exp(logit - m) (both [T, 1])."""
    m_new = jnp.maximum(m, logits.max(axis=1, keepdims=True))
    total = jnp.exp(m - m_new) * total + jnp.exp(logits - m_new).sum(axis=1, keepdims=True)
    return m_new, total


def _logits_cotangent(logits, ids, targets, lse, coef):
    """d loss / d logits = coef * (softmax - onehot(target)): [T, block_v] float32."""
    probs = jnp.exp(logits - lse)  # masked (padded) ids give exactly 0
    return coef * (probs - (ids == targets).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes of one call; hashable for custom_vjp."""

    tokens: int  # padded T
    vocab: int  # real V
    padded_vocab: int
    block_t: int
    block_v: int
    interpret: bool = False

    @property
    def vocab_padded(self) -> bool:
        return self.padded_vocab != self.vocab


# ----------------------------------------------------------------------------------------------
# chunked_cross_entropy: pure JAX.


def _chunks(plan: _Plan, embedding: jax.Array):
    """[padded V, d] -> ([n chunks, block_v, d], chunk start ids [n chunks])."""
    n = plan.padded_vocab // plan.block_v
    starts = jnp.arange(n, dtype=jnp.int32) * plan.block_v
    return embedding.reshape(n, plan.block_v, embedding.shape[1]), starts


def _chunked_stats(plan: _Plan, hidden, embedding, targets):
    """Per-token logsumexp and target logit, [T, 1] float32 each, one vocab chunk at a time."""
    tokens = hidden.shape[0]

    def fold(carry, chunk_and_start):
        m, total, target_logit = carry
        chunk, start = chunk_and_start
        logits, ids = _masked_logits(hidden, chunk, start, plan.vocab, plan.vocab_padded)
        m, total = _online_update(m, total, logits)
        target_logit = target_logit + jnp.sum(jnp.where(ids == targets, logits, 0.0), axis=1,
                                              keepdims=True)
        return (m, total, target_logit), None

    column = lambda value: jnp.full((tokens, 1), value, jnp.float32)
    (m, total, target_logit), _ = lax.scan(
        fold, (column(MASK_VALUE), column(0.0), column(0.0)), _chunks(plan, embedding))
    return m + jnp.log(total), target_logit


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(plan: _Plan, hidden, embedding, targets, weights):
    return _chunked_fwd(plan, hidden, embedding, targets, weights)[0]


def _chunked_fwd(plan: _Plan, hidden, embedding, targets, weights):
    lse, target_logit = _chunked_stats(plan, hidden, embedding, targets[:, None])
    nll = (lse - target_logit)[:, 0]
    return _weighted_sums(weights, nll), (hidden, embedding, targets, weights, lse, nll)


def _chunked_bwd(plan: _Plan, residuals, cotangents):
    hidden, embedding, targets, weights, lse, nll = residuals
    g_loss, g_weight_sum = cotangents
    coef = (g_loss * weights)[:, None]
    targets = targets[:, None]

    def grads(dh, chunk_and_start):
        chunk, start = chunk_and_start
        logits, ids = _masked_logits(hidden, chunk, start, plan.vocab, plan.vocab_padded)
        dlogits = _logits_cotangent(logits, ids, targets, lse, coef)
        dh = dh + lax.dot_general(dlogits.astype(chunk.dtype), chunk, NN,
                                  preferred_element_type=jnp.float32)
        de = lax.dot_general(dlogits.astype(hidden.dtype), hidden, TN,
                             preferred_element_type=jnp.float32)
        return dh, de.astype(embedding.dtype)

    dh, de = lax.scan(grads, jnp.zeros(hidden.shape, jnp.float32), _chunks(plan, embedding))
    dw = g_loss * nll + g_weight_sum
    return dh.astype(hidden.dtype), de.reshape(embedding.shape), None, dw


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                          weights: jax.Array, *, block_v: int = 512) -> tuple[jax.Array, jax.Array]:
    """(weighted_loss_sum, weight_sum) for hidden [T, d], embedding [V, d], targets/weights [T].

    Pure JAX: scans vocabulary chunks of block_v rows, never building more than [T, block_v]
    logits, forward or backward (custom VJP; see the module docstring for gradients/padding).
    """
    _check_inputs(hidden, embedding, targets, weights)
    block_v, padded_vocab = plan_axis("block_v", embedding.shape[0], block_v)
    plan = _Plan(tokens=hidden.shape[0], vocab=embedding.shape[0], padded_vocab=padded_vocab,
                 block_t=hidden.shape[0], block_v=block_v)
    return _chunked(plan, hidden, _pad_rows(embedding, padded_vocab), targets.astype(jnp.int32),
                    weights.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# fused_cross_entropy: Pallas. Blocks: hidden [block_t, d], embedding [block_v, d], per-token
# columns (targets, lse, coef) [block_t, 1].


def _forward_kernel(plan: _Plan, h_ref, e_ref, tgt_ref, lse_ref, tlogit_ref, m_ref, l_ref,
                    t_ref) -> None:
    """Grid (token blocks, vocab blocks): online logsumexp and target logit per token."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        t_ref[...] = jnp.zeros(t_ref.shape, jnp.float32)

    logits, ids = _masked_logits(h_ref[...], e_ref[...], j * plan.block_v, plan.vocab,
                                 plan.vocab_padded)
    m_ref[...], l_ref[...] = _online_update(m_ref[...], l_ref[...], logits)
    t_ref[...] += jnp.sum(jnp.where(ids == tgt_ref[...], logits, 0.0), axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])
        tlogit_ref[...] = t_ref[...]


def _dlogits_block(plan: _Plan, h_ref, e_ref, tgt_ref, lse_ref, coef_ref, j) -> jax.Array:
    logits, ids = _masked_logits(h_ref[...], e_ref[...], j * plan.block_v, plan.vocab,
                                 plan.vocab_padded)
    return _logits_cotangent(logits, ids, tgt_ref[...], lse_ref[...], coef_ref[...])


def _dh_kernel(plan: _Plan, h_ref, e_ref, tgt_ref, lse_ref, coef_ref, dh_ref, acc_ref) -> None:
    """Grid (token blocks, vocab blocks): dh = sum over vocab blocks of dlogits E."""
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    e = e_ref[...]
    dlogits = _dlogits_block(plan, h_ref, e_ref, tgt_ref, lse_ref, coef_ref, j)
    acc_ref[...] += lax.dot_general(dlogits.astype(e.dtype), e, NN,
                                    preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _de_kernel(plan: _Plan, h_ref, e_ref, tgt_ref, lse_ref, coef_ref, de_ref, acc_ref) -> None:
    """Grid (vocab blocks, token blocks): dE = sum over token blocks of dlogits^T h."""
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    h = h_ref[...]
    dlogits = _dlogits_block(plan, h_ref, e_ref, tgt_ref, lse_ref, coef_ref, j)
    acc_ref[...] += lax.dot_general(dlogits.astype(h.dtype), h, TN,
                                    preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        de_ref[...] = acc_ref[...].astype(de_ref.dtype)


def _specs(plan: _Plan, dim: int, tokens_outer: bool):
    """BlockSpecs (hidden, embedding, token column) for grid (i, j) or (j, i)."""
    # Grid (token block, vocab block) or (vocab block, token block): pick -> (token, vocab).
    pick = (lambda a, b: (a, b)) if tokens_outer else (lambda a, b: (b, a))
    hidden = pl.BlockSpec((plan.block_t, dim), lambda a, b: (pick(a, b)[0], 0))
    embedding = pl.BlockSpec((plan.block_v, dim), lambda a, b: (pick(a, b)[1], 0))
    column = pl.BlockSpec((plan.block_t, 1), lambda a, b: (pick(a, b)[0], 0))
    return hidden, embedding, column


# Matmuls of one (token block, vocabulary block) tile, each 2 block_t block_v d FLOPs: the
# forward computes the logits tile; dh and dE recompute it, then multiply its cotangent.
_TILE_MATMULS = {"cross_entropy_forward": 1, "cross_entropy_dh": 2, "cross_entropy_de": 2}


def _cost_estimate(plan: _Plan, dim: int, itemsize: int, name: str) -> pl.CostEstimate:
    """What one kernel does, for XLA's cost analysis (which cannot see inside a kernel): the
    tiles' matmuls, one exp per logit, and the hidden and embedding blocks each tile reads."""
    tiles = (plan.tokens // plan.block_t) * (plan.padded_vocab // plan.block_v)
    logits = tiles * plan.block_t * plan.block_v
    reads = tiles * (plan.block_t + plan.block_v) * dim * itemsize
    return pl.CostEstimate(flops=2 * logits * dim * _TILE_MATMULS[name], transcendentals=logits,
                           bytes_accessed=reads)


def _pallas(plan: _Plan, kernel, grid, in_specs, out_specs, out_shape, scratch, name: str,
            cost: pl.CostEstimate):
    return pl.pallas_call(
        functools.partial(kernel, plan), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=plan.interpret, name=name, cost_estimate=cost)


def _fused_stats(plan: _Plan, hidden, embedding, targets):
    """(lse, target logit), [T, 1] float32 each; targets [T, 1] int32."""
    n_t, n_v = plan.tokens // plan.block_t, plan.padded_vocab // plan.block_v
    hidden_spec, embedding_spec, column = _specs(plan, hidden.shape[1], tokens_outer=True)
    stat = jax.ShapeDtypeStruct((plan.tokens, 1), jnp.float32)
    scratch = [pltpu.VMEM((plan.block_t, 1), jnp.float32) for _ in range(3)]
    return _pallas(plan, _forward_kernel, (n_t, n_v), [hidden_spec, embedding_spec, column],
                   [column, column], [stat, stat], scratch, "cross_entropy_forward",
                   _cost_estimate(plan, hidden.shape[1], hidden.dtype.itemsize,
                                  "cross_entropy_forward"))(hidden, embedding, targets)


def _fused_grads(plan: _Plan, hidden, embedding, targets, lse, coef):
    """(dh [T, d], dE [padded V, d]) from the saved lse and coef = g * w, [T, 1] each."""
    n_t, n_v = plan.tokens // plan.block_t, plan.padded_vocab // plan.block_v
    dim = hidden.shape[1]
    args = (hidden, embedding, targets, lse, coef)
    h_spec, e_spec, column = _specs(plan, dim, tokens_outer=True)
    dh = _pallas(plan, _dh_kernel, (n_t, n_v), [h_spec, e_spec, column, column, column], h_spec,
                 jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
                 [pltpu.VMEM((plan.block_t, dim), jnp.float32)], "cross_entropy_dh",
                 _cost_estimate(plan, dim, hidden.dtype.itemsize, "cross_entropy_dh"))(*args)
    h_spec, e_spec, column = _specs(plan, dim, tokens_outer=False)
    de = _pallas(plan, _de_kernel, (n_v, n_t), [h_spec, e_spec, column, column, column], e_spec,
                 jax.ShapeDtypeStruct(embedding.shape, embedding.dtype),
                 [pltpu.VMEM((plan.block_v, dim), jnp.float32)], "cross_entropy_de",
                 _cost_estimate(plan, dim, hidden.dtype.itemsize, "cross_entropy_de"))(*args)
    return dh, de


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(plan: _Plan, hidden, embedding, targets, weights):
    return _fused_fwd(plan, hidden, embedding, targets, weights)[0]


def _fused_fwd(plan: _Plan, hidden, embedding, targets, weights):
    lse, target_logit = _fused_stats(plan, hidden, embedding, targets[:, None])
    nll = (lse - target_logit)[:, 0]
    return _weighted_sums(weights, nll), (hidden, embedding, targets, weights, lse, nll)


def _fused_bwd(plan: _Plan, residuals, cotangents):
    hidden, embedding, targets, weights, lse, nll = residuals
    g_loss, g_weight_sum = cotangents
    coef = (g_loss * weights)[:, None]
    dh, de = _fused_grads(plan, hidden, embedding, targets[:, None], lse, coef)
    return dh, de, None, g_loss * nll + g_weight_sum


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array,
                        weights: jax.Array, *, block_t: int = 256, block_v: int = 512,
                        interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(weighted_loss_sum, weight_sum) for hidden [T, d], embedding [V, d], targets/weights [T].

    Pallas kernels over (block_t tokens) x (block_v vocabulary rows), smaller when the model is
    too wide for VMEM at those blocks (`fit_blocks_to_vmem`); never builds [T, V] logits.
    interpret: None = interpret mode on a CPU backend. See the module docstring for gradients
    and padding.
    """
    _check_inputs(hidden, embedding, targets, weights)
    block_t, tokens = plan_axis("block_t", hidden.shape[0], block_t)
    block_v, padded_vocab = plan_axis("block_v", embedding.shape[0], block_v)
    fitted = fit_blocks_to_vmem(block_t, block_v, hidden.shape[1], hidden.dtype.itemsize)
    if fitted != (block_t, block_v):
        block_t, tokens = plan_axis("block_t", hidden.shape[0], fitted[0])
        block_v, padded_vocab = plan_axis("block_v", embedding.shape[0], fitted[1])
    plan = _Plan(tokens=tokens, vocab=embedding.shape[0], padded_vocab=padded_vocab,
                 block_t=block_t, block_v=block_v, interpret=resolve_interpret(interpret))
    # Padded tokens: zero hidden, target 0, weight 0, so they add nothing to sums or gradients.
    return _fused(plan, _pad_rows(hidden, tokens), _pad_rows(embedding, padded_vocab),
                  _pad_rows(targets.astype(jnp.int32), tokens),
                  _pad_rows(weights.astype(jnp.float32), tokens))


CROSS_ENTROPY_IMPLS = {
    "xla": xla_cross_entropy,
    "chunked": chunked_cross_entropy,
    "pallas": fused_cross_entropy,
}


def get_cross_entropy(name: str):
    """The `loss_impl` implementation by name: xla, chunked or pallas."""
    if name not in CROSS_ENTROPY_IMPLS:
        raise ValueError(f"loss_impl must be one of {sorted(CROSS_ENTROPY_IMPLS)}, got {name!r}")
    return CROSS_ENTROPY_IMPLS[name]
