"""Pallas kernels (interpret mode on CPU) against plain-jnp references, and compiled for TPU.

Shapes stay tiny: interpret mode runs the grid as a scan and compiles each variant for about a
second, so every test checks values and gradients from one compiled call. The TPU tests compile
(never run) the kernels for an abstract v5p device through libtpu, on every platform libtpu has
wheels for (tests/support.py: needs_libtpu).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import SingleDeviceSharding
from support import needs_libtpu

from dvar_jax.kernels import cross_entropy as ce
from dvar_jax.kernels.flash_attention import debug_block_visits, flash_attention, plan_blocks
from dvar_jax.kernels.splash import splash_attention
from dvar_jax.model.attention import dot_product_attention

BATCH, HEADS, HEAD_DIM = 2, 2, 16


def _qkv(seq: int, dtype=jnp.float32, seed: int = 0, heads: int = HEADS):
    """q, k, v, and an output cotangent, each [batch, seq, heads, head_dim]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return [jax.random.normal(k, (BATCH, seq, heads, HEAD_DIM)).astype(dtype) for k in keys]


def _packed_segments(seq: int) -> jnp.ndarray:
    """[batch, seq] document ids of packed sequences, boundaries off the block grid."""
    rows = []
    for cuts in ((13, 40), (29,)):
        ids = np.zeros(seq, np.int32)
        for cut in cuts:
            ids[cut:] += 1
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def _masked_reference(q, k, v, *, causal: bool, segment_ids):
    """Plain softmax attention with an explicit [batch, 1, seq, seq] mask (causal & segments)."""
    seq = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(q.shape[-1]))
    allowed = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((seq, seq), bool))
    probs = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def _value_and_grads(fn, q, k, v, do):
    """fn(q, k, v) and its vjp with cotangent do, as one jitted call."""
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)
    return jax.jit(run)(q, k, v, do)


def _relative_error(got, want) -> float:
    """Largest deviation over the largest reference magnitude (near-zero entries cannot
    inflate it)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _assert_attention_matches(fn, reference, q, k, v, do, *, rel):
    """Output and dq, dk, dv within `rel` relative error (float32: 1e-5; bfloat16: 2e-2)."""
    out, grads = _value_and_grads(fn, q, k, v, do)
    ref_out, ref_grads = _value_and_grads(reference, q, k, v, do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads),
                               strict=True):
        assert _relative_error(got, want) <= rel, f"{name}: {_relative_error(got, want):.2e}"


@pytest.mark.parametrize(("causal", "heads"), [(True, 1), (False, 3)])
def test_flash_attention_matches_reference(causal, heads):
    # Observed float32 relative errors 1e-7 to 6e-7 (output and gradients, 1 to 3 heads).
    q, k, v, do = _qkv(64, heads=heads)
    _assert_attention_matches(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=32, block_k=32),
        lambda q, k, v: dot_product_attention(q, k, v, causal=causal),
        q, k, v, do, rel=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_segment_ids(causal):
    q, k, v, do = _qkv(64, seed=1)
    segments = _packed_segments(64)
    _assert_attention_matches(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=segments,
                                        block_q=32, block_k=32),
        lambda q, k, v: _masked_reference(q, k, v, causal=causal, segment_ids=segments),
        q, k, v, do, rel=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_pads_seq_not_divisible_by_blocks(causal):
    # seq 72 with blocks (32, 16): padded to 96, padding masked, padded rows dropped.
    assert plan_blocks(72, 32, 16) == (32, 16, 96)
    q, k, v, do = _qkv(72, seed=2)
    _assert_attention_matches(
        lambda q, k, v: flash_attention(q, k, v, causal=causal, block_q=32, block_k=16),
        lambda q, k, v: dot_product_attention(q, k, v, causal=causal),
        q, k, v, do, rel=1e-5)


@pytest.mark.parametrize(("block", "seq"), [(4, 64), (8, 80)])
def test_flash_attention_block_diffusion_mask(block, seq):
    """Block diffusion's [noisy; clean] mask as a kernel mask kind equals the XLA path's (which
    test_model checks against the rule written out by position), also when seq is padded (80
    with blocks 32: half 40, blocks straddle tiles and halves)."""
    q, k, v, do = _qkv(seq, seed=3)
    _assert_attention_matches(
        lambda q, k, v: flash_attention(q, k, v, causal=False, diffusion_block=block,
                                        block_q=32, block_k=32),
        lambda q, k, v: dot_product_attention(q, k, v, causal=False, diffusion_block=block),
        q, k, v, do, rel=1e-5)
    with pytest.raises(ValueError, match="diffusion_block=4 needs causal=False"):
        flash_attention(q, k, v, causal=True, diffusion_block=4)


def test_block_planning_and_bad_blocks():
    assert plan_blocks(40, 128, 128) == (40, 40, 40)  # blocks shrink to a short sequence
    assert plan_blocks(72, 128, 64) == (128, 64, 128)
    assert plan_blocks(256, 64, 128) == (64, 128, 256)
    q, k, v, _ = _qkv(64)
    with pytest.raises(ValueError, match=r"block_q=12 must be a positive multiple of 8.*seq=64"):
        flash_attention(q, k, v, causal=True, block_q=12, block_k=32)
    with pytest.raises(ValueError, match="block_k=0"):
        flash_attention(q, k, v, causal=True, block_q=32, block_k=0)
    with pytest.raises(ValueError, match="divide one another"):
        flash_attention(q, k, v, causal=True, block_q=32, block_k=48)


def test_causal_skips_blocks_above_the_diagonal():
    q, k, v, _ = _qkv(128)
    visits = debug_block_visits(q, k, v, causal=True, block_q=32, block_k=32)
    lower = np.tril(np.ones((4, 4), np.int32))  # [q block, k block]
    np.testing.assert_array_equal(visits["forward"], np.broadcast_to(lower, (BATCH, HEADS, 4, 4)))
    np.testing.assert_array_equal(visits["dq"], visits["forward"])
    np.testing.assert_array_equal(visits["dkv"], np.swapaxes(visits["forward"], 2, 3))
    assert visits["forward"].sum() == BATCH * HEADS * 10  # 10 of 16 blocks computed


def test_flash_attention_bfloat16():
    q, k, v, do = _qkv(64, dtype=jnp.bfloat16, seed=3)
    _assert_attention_matches(
        lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=32, block_k=32),
        lambda q, k, v: dot_product_attention(q, k, v, causal=True),
        q, k, v, do, rel=2e-2)


# ----------------------------------------------------------------------------------------------
# TPU: every kernel compiled ahead of time for an abstract v5p device (libtpu on this CPU
# machine, no TPU needed). `compile()` runs Mosaic's own passes and code generation on each
# kernel, which catches what the Pallas lowering alone does not (layouts, shape casts, VMEM).
# Shapes are TPU-sized tiles: bf16, head_dim 128, seq 256 = 2 blocks of 128.

TPU_KERNEL = 'custom_call_target="tpu_custom_call"'  # one per Mosaic kernel in compiled HLO


@pytest.fixture(scope="module")
def tpu_device():
    from dvar_jax.memory_plan import tpu_devices

    return tpu_devices("v5p:2x2x1")[0]


def _compile_for_tpu(fn, device, *specs):
    """fn jitted and compiled for `device`; specs are (shape, dtype) pairs of the arguments."""
    sharding = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in specs]
    return jax.jit(fn).lower(*args).compile()


def _attention_grads(attention_fn):
    """(q, k, v, *extra) -> d sum(attention) / d(q, k, v): the forward and backward kernels."""
    def grads(q, k, v, *extra):
        loss = lambda q, k, v: attention_fn(q, k, v, *extra).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    return grads


QKV_SPEC = ((1, 256, 2, 128), jnp.bfloat16)


def _assert_compiled_kernels(compiled, count: int) -> None:
    assert compiled.as_text().count(TPU_KERNEL) == count  # forward + backward kernels
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@needs_libtpu
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_compiles_for_tpu(tpu_device, causal, segments):
    if segments:
        fn = lambda q, k, v, ids: flash_attention(q, k, v, causal=causal, segment_ids=ids,
                                                  interpret=False)
        specs = (QKV_SPEC,) * 3 + (((1, 256), jnp.int32),)
    else:
        fn = lambda q, k, v: flash_attention(q, k, v, causal=causal, interpret=False)
        specs = (QKV_SPEC,) * 3
    _assert_compiled_kernels(_compile_for_tpu(_attention_grads(fn), tpu_device, *specs), 3)


@needs_libtpu
def test_block_diffusion_flash_attention_compiles_for_tpu(tpu_device):
    fn = lambda q, k, v: flash_attention(q, k, v, causal=False, diffusion_block=16,
                                         interpret=False)
    _assert_compiled_kernels(_compile_for_tpu(_attention_grads(fn), tpu_device, *(QKV_SPEC,) * 3),
                             3)


@needs_libtpu
@pytest.mark.parametrize("causal", [True, False])
def test_splash_attention_compiles_for_tpu(tpu_device, causal):
    fn = lambda q, k, v: splash_attention(q, k, v, causal=causal, interpret=False)
    _assert_compiled_kernels(_compile_for_tpu(_attention_grads(fn), tpu_device, *(QKV_SPEC,) * 3),
                             3)  # forward, dq, dkv


@needs_libtpu
def test_fused_cross_entropy_compiles_for_tpu(tpu_device):
    def loss_grads(h, e, t, w):  # V 1000: the last vocab block is padded and masked
        loss = lambda h, e: ce.fused_cross_entropy(h, e, t, w, interpret=False)[0]
        return jax.grad(loss, argnums=(0, 1))(h, e)

    compiled = _compile_for_tpu(loss_grads, tpu_device, ((512, 128), jnp.bfloat16),
                                ((1000, 128), jnp.bfloat16), ((512,), jnp.int32),
                                ((512,), jnp.float32))
    _assert_compiled_kernels(compiled, 3)  # forward, dh, dE


@needs_libtpu
def test_tpu_compile_runs_mosaic(tpu_device):
    """Control: a kernel that Pallas lowers but Mosaic cannot compile fails at compile(), so the
    tests above check more than the lowering."""
    def kernel(x_ref, o_ref):  # a select between boolean vectors: Mosaic has no layout for it
        x = x_ref[...]  # (jax 0.12's Mosaic compiles the shape casts an older control used)
        o_ref[...] = jnp.where(x > 0, x > 1, x > 2).astype(jnp.float32)

    fn = lambda x: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32))(x)
    lowered = jax.jit(fn).lower(jax.ShapeDtypeStruct((8, 128), jnp.float32,
                                                     sharding=SingleDeviceSharding(tpu_device)))
    with pytest.raises(Exception, match="Mosaic failed to compile"):
        lowered.compile()


def test_kernels_lower_for_tpu_with_jax_export():
    """Mosaic TPU lowering via jax.export, which needs no libtpu (so it also runs where the
    compile tests above are skipped, e.g. on aarch64): causal flash attention with segment ids,
    splash, fused cross-entropy, each forward + backward."""
    x = jax.ShapeDtypeStruct(*QKV_SPEC)
    ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    flash = lambda q, k, v, ids: flash_attention(q, k, v, causal=True, segment_ids=ids,
                                                 interpret=False)
    splash = lambda q, k, v: splash_attention(q, k, v, causal=True, interpret=False)

    def loss_grads(h, e, t, w):
        loss = lambda h, e: ce.fused_cross_entropy(h, e, t, w, interpret=False)[0]
        return jax.grad(loss, argnums=(0, 1))(h, e)

    export = lambda fn: jax.export.export(jax.jit(fn), platforms=["tpu"])
    exported = [
        export(_attention_grads(flash))(x, x, x, ids),
        export(_attention_grads(splash))(x, x, x),
        export(loss_grads)(
            jax.ShapeDtypeStruct((512, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((1000, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((512,), jnp.int32), jax.ShapeDtypeStruct((512,), jnp.float32)),
    ]
    for module in exported:  # forward + two backward kernels each
        assert module.mlir_module().count("tpu_custom_call") == 3


# ----------------------------------------------------------------------------------------------
# Cross-entropy.

DIM, VOCAB = 32, 300


def _reference_loss(hidden, embedding, targets, weights):
    """Full [T, V] float32 logits and log_softmax: (weighted loss sum, weight sum)."""
    log_probs = jax.nn.log_softmax(jnp.dot(hidden, embedding.T), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]
    return jnp.sum(weights * nll), jnp.sum(weights)


def _loss_inputs(tokens: int, weighting: str, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (tokens, DIM))
    embedding = 0.5 * jax.random.normal(keys[1], (VOCAB, DIM))
    targets = jax.random.randint(keys[2], (tokens,), 0, VOCAB)
    if weighting == "ar":
        weights = jnp.ones((tokens,))
    else:  # masked diffusion: 1/p on masked positions, 0 elsewhere
        p = 0.4
        weights = jnp.where(jax.random.bernoulli(keys[3], p, (tokens,)), 1.0 / p, 0.0)
    return hidden, embedding, targets, weights


IMPLS = {
    "chunked": lambda h, e, t, w: ce.chunked_cross_entropy(h, e, t, w, block_v=128),
    "pallas": lambda h, e, t, w: ce.fused_cross_entropy(h, e, t, w, block_t=32, block_v=128),
}


@pytest.mark.parametrize(("impl", "weighting", "tokens"), [
    ("chunked", "ar", 64), ("chunked", "diffusion", 50),
    ("pallas", "ar", 64), ("pallas", "diffusion", 50),  # T 50: not divisible by block_t 32
])
def test_cross_entropy_matches_reference(impl, weighting, tokens):
    # V 300 is not divisible by block_v 128: the last block is padded and masked.
    hidden, embedding, targets, weights = _loss_inputs(tokens, weighting)

    def run(fn):
        def total(h, e, w):
            loss_sum, weight_sum = fn(h, e, targets, w)
            return loss_sum + 0.5 * weight_sum, (loss_sum, weight_sum)
        return jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(hidden, embedding,
                                                                         weights)

    grads, (loss_sum, weight_sum) = run(IMPLS[impl])
    ref_grads, (ref_loss, ref_weight_sum) = run(_reference_loss)
    np.testing.assert_allclose(loss_sum, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(weight_sum, ref_weight_sum, rtol=1e-6)
    for name, got, want in zip(("hidden", "embedding", "weights"), grads, ref_grads, strict=True):
        assert _relative_error(got, want) <= 1e-5, f"{name}: {_relative_error(got, want):.2e}"


def test_cross_entropy_registry_and_bad_blocks():
    hidden, embedding, targets, weights = _loss_inputs(16, "ar")
    np.testing.assert_allclose(ce.get_cross_entropy("xla")(hidden, embedding, targets, weights),
                               _reference_loss(hidden, embedding, targets, weights), rtol=1e-6)
    assert ce.plan_axis("block_v", 300, 128) == (128, 384)
    assert ce.plan_axis("block_t", 20, 256) == (24, 24)
    # A near divisor instead of padding: the study's 50,304 rows and our 4,224 split into 384s.
    assert ce.plan_axis("block_v", 50304, 512) == (384, 50304)
    assert ce.plan_axis("block_v", 4224, 512) == (384, 4224)
    assert ce.plan_axis("block_v", 50257, 512) == (512, 50688)  # no near divisor: padded
    with pytest.raises(ValueError, match=r"block_v=100 must be a positive multiple of 8"):
        ce.fused_cross_entropy(hidden, embedding, targets, weights, block_v=100)
    with pytest.raises(ValueError, match="block_v=-8"):
        ce.chunked_cross_entropy(hidden, embedding, targets, weights, block_v=-8)
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        ce.get_cross_entropy("fused")


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_cross_entropy_bfloat16(impl):
    """bfloat16 hidden states and embedding: the loss and gradients within 2e-2 of the float32
    reference on the same (bfloat16-rounded) inputs."""
    hidden, embedding, targets, weights = _loss_inputs(64, "diffusion", seed=4)
    hidden, embedding = hidden.astype(jnp.bfloat16), embedding.astype(jnp.bfloat16)

    def grads(fn, h, e):
        return jax.jit(jax.value_and_grad(lambda h, e: fn(h, e, targets, weights)[0],
                                          argnums=(0, 1)))(h, e)

    value, (dh, de) = grads(IMPLS[impl], hidden, embedding)
    ref_value, (ref_dh, ref_de) = grads(_reference_loss, hidden.astype(jnp.float32),
                                        embedding.astype(jnp.float32))
    assert _relative_error(value, ref_value) <= 2e-2
    assert _relative_error(dh, ref_dh) <= 2e-2
    assert _relative_error(de, ref_de) <= 2e-2
