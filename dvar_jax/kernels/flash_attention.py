"""Flash attention as Pallas kernels: forward and backward, causal or full, with segment ids.

Contract. `flash_attention(q, k, v, causal=...)` takes q, k, v [batch, seq, heads, head_dim]
(one dtype) and returns [batch, seq, heads, head_dim] in that dtype: what
`dvar_jax.model.attention.dot_product_attention` computes (scale 1/sqrt(head_dim), float32
softmax and accumulation, no dropout), differentiable in q, k, v (custom VJP), without ever
materialising the [batch, heads, seq, seq] logits. Values differ from the reference only by
floating-point rounding (the online softmax and the blocked sums reorder the arithmetic); which
scores are masked is exact (`diffusion_block` evaluates the reference's own predicate,
kernels/masks.py). Options: causal, block diffusion's [noisy; clean] mask, [batch, seq] segment
ids (packed documents).

* forward: one program per (batch, head, query block); the key blocks are the innermost,
  sequential grid axis, folded in with an online softmax. It saves the logsumexp of each row.
* backward: a `dq` kernel (key blocks innermost) and a `dk, dv` kernel (query blocks
  innermost) that recompute each block's probabilities from the saved logsumexp.

Block pairs wholly above the causal diagonal, key blocks made only of padding and (in the
backward) query blocks made only of padding are skipped, neither computed nor fetched;
`debug_block_visits` reports which grid steps ran their body.

Shapes. A seq not divisible by the blocks is padded internally (zeros), the padded keys masked
and the padded query rows dropped; a block larger than the sequence is shrunk to it. Bad block
sizes (not positive multiples of 8, or blocks that do not divide one another) raise a ValueError
naming seq and the blocks. On TPU, blocks should be multiples of 128, and with segment_ids
block_k must be one (or the whole padded seq).

When it runs. `model.attention_impl="pallas"` (dvar_jax/model/attention.py). interpret=None runs
Pallas interpret mode on a CPU backend and compiles through Mosaic on TPU; a GPU backend raises
NotImplementedError (interpret=True runs anywhere, slowly). Attention dropout is not supported
(use the xla path). The kernels' layout, block skipping, TPU compile checks and the GPU porting
notes are in docs/kernels.md.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
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
from dvar_jax.kernels.masks import block_diffusion_allowed

_PARALLEL, _ARBITRARY = "parallel", "arbitrary"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static decisions of one call; hashable, so it can be a custom_vjp non-diff argument."""

    causal: bool
    diffusion_block: int  # > 0: block diffusion's [noisy; clean] mask (kernels/masks.py)
    seq_len: int  # real sequence length
    padded_len: int  # multiple of both blocks
    block_q: int
    block_k: int
    scale: float
    has_segments: bool
    interpret: bool
    record_visits: bool = False  # extra int32 output: 1 where a grid step ran its body

    @property
    def num_q_blocks(self) -> int:
        return self.padded_len // self.block_q

    @property
    def num_k_blocks(self) -> int:
        return self.padded_len // self.block_k

    @property
    def padded(self) -> bool:
        return self.padded_len != self.seq_len


def plan_blocks(seq: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(block_q, block_k, padded_seq) actually used for a sequence of length `seq`.

    Blocks must be positive multiples of 8 that divide one another (so one padded length serves
    both). A block longer than the sequence (rounded up to 8, then to the smaller block) is
    shrunk to it; the sequence is then padded up to a multiple of the larger block.
    """
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(block, int) or block <= 0 or block % SUBLANE:
            raise ValueError(f"flash_attention: {name}={block!r} must be a positive multiple of "
                             f"{SUBLANE} (seq={seq}, block_q={block_q}, block_k={block_k})")
    if max(block_q, block_k) % min(block_q, block_k):
        raise ValueError(f"flash_attention: block_q={block_q} and block_k={block_k} must divide "
                         f"one another (seq={seq})")
    small = min(block_q, block_k, round_up(seq, SUBLANE))
    cap = round_up(seq, small)
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    return block_q, block_k, round_up(seq, max(block_q, block_k))


# ----------------------------------------------------------------------------------------------
# Which blocks are live. i: query block, j: key block (traced int32 scalars in kernels and index
# maps). A pair is live when some query of block i may attend to some real key of block j.


def _div(a: jax.Array, b: int) -> jax.Array:
    """a // b for non-negative traced a: truncating division, which needs no sign fix-up (the
    floor_divide lowering would add one, and queries the TPU generation to do so)."""
    return lax.div(a, jnp.int32(b))


def _last_live_k(plan: _Plan, i: jax.Array) -> jax.Array:
    """Last key block that query block i needs: the diagonal (causal) or the last real one."""
    last_real = (plan.seq_len - 1) // plan.block_k
    if not plan.causal:
        return jnp.int32(last_real)
    return jnp.minimum(_div((i + 1) * plan.block_q - 1, plan.block_k), last_real)


def _first_live_q(plan: _Plan, j: jax.Array) -> jax.Array:
    """First query block that attends to key block j (0 unless causal)."""
    return _div(j * plan.block_k, plan.block_q) if plan.causal else jnp.int32(0)


def _last_real_q(plan: _Plan) -> int:
    return (plan.seq_len - 1) // plan.block_q


def _block_live(plan: _Plan, i: jax.Array, j: jax.Array, *, skip_padded_q: bool) -> jax.Array:
    """Whether block pair (i, j) has work. The forward keeps all-padding query blocks (their
    outputs must stay finite, as the backward multiplies them by a zero cotangent); the backward
    skips them, their dO being zero."""
    live = j <= _last_live_k(plan, i)
    if skip_padded_q:
        live = jnp.logical_and(live, i <= _last_real_q(plan))
    return live


def _logit_mask(plan: _Plan, i: jax.Array, j: jax.Array, q_seg_ref, kv_seg_ref) -> jax.Array | None:
    """[block_q, block_k] bool: which scores of block pair (i, j) are kept; None keeps all."""
    shape = (plan.block_q, plan.block_k)
    mask = None
    if plan.diffusion_block:  # the one predicate the XLA path also uses; it hides padded keys
        q_pos = i * plan.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = j * plan.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = block_diffusion_allowed(q_pos, k_pos, plan.seq_len // 2, plan.diffusion_block)
    elif plan.causal or plan.padded:
        q_pos = i * plan.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = j * plan.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
        # Causal already hides padded keys (positions >= seq) from every real query.
        mask = q_pos >= k_pos if plan.causal else k_pos < plan.seq_len
    if q_seg_ref is not None:
        same = q_seg_ref[...] == kv_seg_ref[...]  # [block_q, 1] == [1, block_k]
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _scores(plan: _Plan, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Scaled, masked float32 scores q k^T: [block_q, head_dim] x [block_k, head_dim]."""
    s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * plan.scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _record_visit(visits_ref, value: int) -> None:
    if visits_ref is not None:
        visits_ref[...] = jnp.full(visits_ref.shape, value, jnp.int32)


def _split_refs(plan: _Plan, refs: tuple, n_inputs: int, n_outputs: int):
    """(inputs, segment refs or Nones, outputs, visits ref or None, scratch) of a kernel call."""
    refs = list(refs)
    inputs, refs = refs[:n_inputs], refs[n_inputs:]
    segs = (refs.pop(0), refs.pop(0)) if plan.has_segments else (None, None)
    outputs, refs = refs[:n_outputs], refs[n_outputs:]
    visits = refs.pop(0) if plan.record_visits else None
    return inputs, segs, outputs, visits, refs


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are blocks: q/k/v/do [block, head_dim], lse/delta [block_q, 1], q segment ids
# [block_q, 1], kv segment ids [1, block_k].


def _forward_kernel(plan: _Plan, *refs) -> None:
    """Grid (batch, heads, q blocks, k blocks): online softmax over the key blocks."""
    (q_ref, k_ref, v_ref), segs, (o_ref, lse_ref), visits_ref, scratch = _split_refs(
        plan, refs, 3, 2)
    m_ref, l_ref, acc_ref = scratch
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    _record_visit(visits_ref, 0)

    @pl.when(_block_live(plan, i, j, skip_padded_q=False))
    def _compute():
        _record_visit(visits_ref, 1)
        s = _scores(plan, q_ref[...], k_ref[...], _logit_mask(plan, i, j, *segs))
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)  # rescales what was accumulated under the old max
        l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
        v = v_ref[...]
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        total = l_ref[...]
        total = jnp.where(total == 0.0, 1.0, total)  # nothing to attend to: output 0, not NaN
        o_ref[...] = (acc_ref[...] / total).astype(o_ref.dtype)
        lse_ref[...] = m_ref[...] + jnp.log(total)


def _probs_and_dscores(plan: _Plan, i, j, q, k, v, do, lse, delta, segs):
    """Recomputed probabilities p and score cotangents ds = p * (dO v^T - delta): [bq, bk]."""
    p = jnp.exp(_scores(plan, q, k, _logit_mask(plan, i, j, *segs)) - lse)
    dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def _dq_kernel(plan: _Plan, *refs) -> None:
    """Grid (batch, heads, q blocks, k blocks): dq = scale * sum over key blocks of ds k."""
    inputs, segs, (dq_ref,), visits_ref, (acc_ref,) = _split_refs(plan, refs, 6, 1)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    _record_visit(visits_ref, 0)

    @pl.when(_block_live(plan, i, j, skip_padded_q=True))
    def _compute():
        _record_visit(visits_ref, 1)
        k = k_ref[...]
        _, ds = _probs_and_dscores(plan, i, j, q_ref[...], k, v_ref[...], do_ref[...],
                                   lse_ref[...], delta_ref[...], segs)
        acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                        preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * plan.scale).astype(dq_ref.dtype)


def _dkv_kernel(plan: _Plan, *refs) -> None:
    """Grid (batch, heads, k blocks, q blocks): dv = sum p^T dO, dk = scale * sum ds^T q."""
    inputs, segs, (dk_ref, dv_ref), visits_ref, scratch = _split_refs(plan, refs, 6, 2)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = inputs
    dk_acc, dv_acc = scratch
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    _record_visit(visits_ref, 0)

    @pl.when(_block_live(plan, i, j, skip_padded_q=True))
    def _compute():
        _record_visit(visits_ref, 1)
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dscores(plan, i, j, q, k_ref[...], v_ref[...], do, lse_ref[...],
                                   delta_ref[...], segs)
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, TN,
                                       preferred_element_type=jnp.float32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, TN,
                                       preferred_element_type=jnp.float32)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * plan.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call builders. Grid index maps get (batch, head, outer block, inner block).


def _seq_spec(block: int, width: int, pick) -> pl.BlockSpec:
    """[batch, heads, seq, width] blocked as (block, width) tiles; pick(outer, inner) -> block."""
    return pl.BlockSpec((None, None, block, width), lambda b, h, x, y: (b, h, pick(x, y), 0))


def _segment_specs(plan: _Plan, pick_q, pick_k) -> list[pl.BlockSpec]:
    """q segment ids [batch, seq, 1] as columns, kv segment ids [batch, 1, seq] as rows."""
    return [pl.BlockSpec((None, plan.block_q, 1), lambda b, h, x, y: (b, pick_q(x, y), 0)),
            pl.BlockSpec((None, 1, plan.block_k), lambda b, h, x, y: (b, 0, pick_k(x, y)))]


def _visits_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None, None, 1, 1), lambda b, h, x, y: (b, h, x, y))


def _call(plan: _Plan, kernel, grid, in_specs, args, segs, seg_specs, out_shape, out_specs,
          scratch, name: str):
    """Shared pallas_call plumbing: optional segment inputs and visits output."""
    if plan.has_segments:
        in_specs, args = [*in_specs, *seg_specs], [*args, *segs]
    if plan.record_visits:
        out_shape = [*out_shape, jax.ShapeDtypeStruct(grid, jnp.int32)]
        out_specs = [*out_specs, _visits_spec()]
    return pl.pallas_call(
        functools.partial(kernel, plan),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
        interpret=plan.interpret,
        name=name,
    )(*args)


def _forward_call(plan: _Plan, q, k, v, segs):
    """q, k, v [batch, heads, padded_seq, head_dim] -> out (same), lse [batch, heads, seq, 1]."""
    batch, heads, _, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k
    pick_q = lambda i, j: i
    pick_k = lambda i, j: jnp.minimum(j, _last_live_k(plan, i))  # skipped steps fetch nothing
    q_rows = lambda width: _seq_spec(bq, width, pick_q)
    k_rows = _seq_spec(bk, head_dim, pick_k)
    return _call(
        plan, _forward_kernel, (batch, heads, plan.num_q_blocks, plan.num_k_blocks),
        [q_rows(head_dim), k_rows, k_rows], [q, k, v], segs,
        _segment_specs(plan, pick_q, pick_k),
        [jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((batch, heads, plan.padded_len, 1), jnp.float32)],
        [q_rows(head_dim), q_rows(1)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
         pltpu.VMEM((bq, head_dim), jnp.float32)],
        "flash_attention_forward")


def _dq_call(plan: _Plan, q, k, v, do, lse, delta, segs):
    """dq [batch, heads, padded_seq, head_dim]; grid over (query block, key block)."""
    batch, heads, _, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k
    pick_q = lambda i, j: i
    pick_k = lambda i, j: jnp.minimum(j, _last_live_k(plan, i))
    q_rows = lambda width: _seq_spec(bq, width, pick_q)
    k_rows = _seq_spec(bk, head_dim, pick_k)
    return _call(
        plan, _dq_kernel, (batch, heads, plan.num_q_blocks, plan.num_k_blocks),
        [q_rows(head_dim), k_rows, k_rows, q_rows(head_dim), q_rows(1), q_rows(1)],
        [q, k, v, do, lse, delta], segs, _segment_specs(plan, pick_q, pick_k),
        [jax.ShapeDtypeStruct(q.shape, q.dtype)], [q_rows(head_dim)],
        [pltpu.VMEM((bq, head_dim), jnp.float32)],
        "flash_attention_dq")


def _dkv_call(plan: _Plan, q, k, v, do, lse, delta, segs):
    """dk, dv [batch, heads, padded_seq, head_dim]; grid over (key block, query block)."""
    batch, heads, _, head_dim = q.shape
    bq, bk = plan.block_q, plan.block_k

    def pick_q(j, i):  # skipped steps re-use a live block's index, so fetch nothing new
        first = jnp.minimum(_first_live_q(plan, j), _last_real_q(plan))
        return jnp.clip(i, first, _last_real_q(plan))

    pick_k = lambda j, i: j
    q_rows = lambda width: _seq_spec(bq, width, pick_q)
    k_rows = _seq_spec(bk, head_dim, pick_k)
    seg_specs = _segment_specs(plan, pick_q, pick_k)
    return _call(
        plan, _dkv_kernel, (batch, heads, plan.num_k_blocks, plan.num_q_blocks),
        [q_rows(head_dim), k_rows, k_rows, q_rows(head_dim), q_rows(1), q_rows(1)],
        [q, k, v, do, lse, delta], segs, seg_specs,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [k_rows, k_rows],
        [pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
        "flash_attention_dkv")


# ----------------------------------------------------------------------------------------------
# custom_vjp on the [batch, heads, padded_seq, head_dim] layout.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, segs):
    return _forward_call(plan, q, k, v, segs)[0]


def _attention_fwd(plan: _Plan, q, k, v, segs):
    out, lse = _forward_call(plan, q, k, v, segs)[:2]
    return out, (q, k, v, segs, out, lse)


def _attention_bwd(plan: _Plan, residuals, do):
    q, k, v, segs, out, lse = residuals
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = _dq_call(plan, q, k, v, do, lse, delta, segs)[0]
    dk, dv = _dkv_call(plan, q, k, v, do, lse, delta, segs)[:2]
    seg_cotangents = None if segs is None else (None, None)  # integer ids: no gradient
    return dq, dk, dv, seg_cotangents


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# Public API.


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError("flash_attention: q, k, v must share one [batch, seq, heads, head_dim] "
                         f"shape, got {q.shape}, {k.shape}, {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"flash_attention: segment_ids must be [batch, seq] = {q.shape[:2]}, "
                         f"got {segment_ids.shape}")


def _make_plan(q: jax.Array, causal: bool, diffusion_block: int, segment_ids, block_q: int,
               block_k: int, interpret: bool | None, record_visits: bool = False) -> _Plan:
    seq, head_dim = q.shape[1], q.shape[3]
    if diffusion_block and (causal or seq % 2 or diffusion_block < 0):
        raise ValueError(f"flash_attention: diffusion_block={diffusion_block} needs causal=False "
                         f"and an even [noisy; clean] seq (got causal={causal}, seq={seq})")
    block_q, block_k, padded_len = plan_blocks(seq, block_q, block_k)
    return _Plan(causal=bool(causal), diffusion_block=int(diffusion_block), seq_len=seq,
                 padded_len=padded_len, block_q=block_q,
                 block_k=block_k, scale=1.0 / math.sqrt(head_dim),
                 has_segments=segment_ids is not None,
                 interpret=resolve_interpret(interpret), record_visits=record_visits)


def _to_kernel_layout(plan: _Plan, x: jax.Array) -> jax.Array:
    """[batch, seq, heads, head_dim] -> [batch, heads, padded_seq, head_dim] (zero padding).

    Heads before seq so that every block's last two dims are a (seq block, head_dim) tile, as
    Mosaic TPU wants, with batch and heads in the grid.
    """
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, plan.padded_len - plan.seq_len), (0, 0)))


def _segment_layout(plan: _Plan, segment_ids: jax.Array | None):
    """[batch, seq] ids -> (columns [batch, padded_seq, 1], rows [batch, 1, padded_seq])."""
    if segment_ids is None:
        return None
    # Padding gets id -1; padded keys are masked by position anyway.
    ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, plan.padded_len - plan.seq_len)),
                  constant_values=-1)
    return ids[:, :, None], ids[:, None, :]


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    diffusion_block: int = 0,
    segment_ids: jax.Array | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax attention over [batch, seq, heads, head_dim] q, k, v; returns the same shape.

    Matches `dot_product_attention(q, k, v, causal=causal)` (scale 1/sqrt(head_dim), float32
    softmax and accumulation, output in q's dtype), differentiable in q, k, v.

    diffusion_block: > 0 applies block diffusion's mask with that block size to a [noisy; clean]
    sequence (dvar_jax/kernels/masks.py; needs causal=False and an even seq). Every block pair is
    computed (no skipping).
    segment_ids: optional [batch, seq] ints; a query attends only to keys with its id (packed
    documents), combined with the causal mask when `causal`. Every query must be allowed at least
    one key (always true for self-attention: it sees itself); a query with none outputs 0.
    block_q, block_k: tile sizes along seq, positive multiples of 8 that divide one another
    (on TPU: multiples of 128; block_k must be one when segment_ids are given). A seq not
    divisible by them is padded internally and the padding masked; blocks longer than seq are
    shrunk. Bad sizes raise ValueError.
    interpret: None runs Pallas interpret mode on a CPU backend and compiles on TPU; a GPU
    backend raises NotImplementedError unless interpret=True (docs/kernels.md, "GPU").
    """
    _check_qkv(q, k, v, segment_ids)
    plan = _make_plan(q, causal, diffusion_block, segment_ids, block_q, block_k, interpret)
    q_, k_, v_ = (_to_kernel_layout(plan, x) for x in (q, k, v))
    out = _attention(plan, q_, k_, v_, _segment_layout(plan, segment_ids))
    return jnp.swapaxes(out[:, :, :plan.seq_len], 1, 2)


def debug_block_visits(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    diffusion_block: int = 0,
    segment_ids: jax.Array | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool | None = None,
) -> dict[str, np.ndarray]:
    """Which grid steps of each kernel ran their body (1) or were skipped (0); for tests.

    Returns {"forward": [batch, heads, q blocks, k blocks], "dq": same,
    "dkv": [batch, heads, k blocks, q blocks]} int32, each written from inside the kernel's
    `pl.when` body, so a 0 means the block's matmuls never executed.
    """
    _check_qkv(q, k, v, segment_ids)
    plan = _make_plan(q, causal, diffusion_block, segment_ids, block_q, block_k, interpret,
                      record_visits=True)
    q_, k_, v_ = (_to_kernel_layout(plan, x) for x in (q, k, v))
    segs = _segment_layout(plan, segment_ids)
    out, lse, forward = _forward_call(plan, q_, k_, v_, segs)
    do = jnp.ones_like(out)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    dq = _dq_call(plan, q_, k_, v_, do, lse, delta, segs)[-1]
    dkv = _dkv_call(plan, q_, k_, v_, do, lse, delta, segs)[-1]
    return {"forward": np.asarray(forward), "dq": np.asarray(dq), "dkv": np.asarray(dkv)}
