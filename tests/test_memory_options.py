"""The memory options (#16): remat policies, a scan over layers and gradient accumulation change
how a step is computed, never what it computes; "auto" picks implementations for the hardware."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.checkpoint import Checkpoints, abstract_like, array_signatures, relayout_blocks
from dvar_jax.config import hardware_choices, transformer_config, validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.model.transformer import REMAT_POLICIES, Transformer, TransformerConfig
from dvar_jax.objectives import get_objective, objective_from_config
from dvar_jax.sharding import make_mesh
from dvar_jax.step import (
    accumulated_loss_and_grads,
    checkpoint_layout,
    create_train_state,
    make_optimizer,
    make_train_step,
)

VOCAB = 61  # tokenizer ids; MASK is 61, the embedding 128 rows


def _model_cfg(**changes) -> TransformerConfig:
    base = TransformerConfig(vocab_size=128, d_model=32, n_layers=3, n_heads=4, head_dim=8,
                             causal=False, attention_dropout=0.1, hidden_dropout=0.1)
    return dataclasses.replace(base, **changes)


def _tokens(batch=4, seq=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, VOCAB)


@functools.cache  # the unrolled, remat-free reference serves several tests
def _loss_and_grads(model_cfg, objective_name="diffusion"):
    """Loss and gradients of one training loss call, parameters from the same seed."""
    objective = get_objective(objective_name)
    model_cfg = dataclasses.replace(model_cfg, causal=objective.causal)
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = _tokens()

    def loss(p):
        return objective.loss(nnx.merge(graphdef, p), tokens, jax.random.key(5), VOCAB)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), grads


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _unrolled(tree, like):
    """A scanned model's tree (parameters, gradients) in the unrolled layout of `like`."""
    return relayout_blocks(tree, like)


@pytest.mark.parametrize("objective_name", ["ar", "diffusion"])
def test_scanned_layers_equal_unrolled_ones_with_dropout_on(objective_name):
    # Same initial parameters (stacked from the same blocks), same dropout keys.
    plain_loss, plain_grads = _loss_and_grads(_model_cfg(), objective_name)
    scan_loss, scan_grads = _loss_and_grads(_model_cfg(scan_layers=True), objective_name)
    assert scan_loss == pytest.approx(plain_loss, rel=1e-6)
    assert jax.tree.leaves(scan_grads)[0].shape[0] == 3  # stacked: [n_layers, ...]
    assert _max_diff(_unrolled(scan_grads, plain_grads), plain_grads) < 1e-6


def test_a_scanned_model_stacks_the_unrolled_models_initial_blocks():
    unrolled = nnx.state(Transformer(_model_cfg(), rngs=nnx.Rngs(0)), nnx.Param)
    scanned = nnx.state(Transformer(_model_cfg(scan_layers=True), rngs=nnx.Rngs(0)), nnx.Param)
    # Reference: the stack written out by hand, layer by layer.
    for name in ("qkv", "attn_out", "mlp_in", "mlp_out"):
        np.testing.assert_array_equal(
            scanned["blocks"][name]["kernel"][...],
            np.stack([unrolled["blocks"][i][name]["kernel"][...] for i in range(3)]))
    assert scanned["blocks"]["attn_norm"]["scale"].get_metadata()["out_sharding"] == \
        (None, "norm")
    assert _max_diff(_unrolled(scanned, unrolled), unrolled) == 0.0
    assert _max_diff(relayout_blocks(unrolled, scanned), scanned) == 0.0


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_recompute_the_same_gradients(remat, scan):
    plain_loss, plain_grads = _loss_and_grads(_model_cfg())
    loss, grads = _loss_and_grads(_model_cfg(remat=remat, scan_layers=scan))
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert _max_diff(_unrolled(grads, plain_grads), plain_grads) < 1e-6


def _matmuls_in_program(n_layers: int, scan: bool) -> int:
    cfg = _model_cfg(n_layers=n_layers, scan_layers=scan, attention_dropout=0.0,
                     hidden_dropout=0.0)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    return forward.lower(params, _tokens()[:, :-1]).as_text().count("dot_general")


def test_a_scanned_model_holds_one_block_whatever_its_depth():
    # The block is traced and compiled once (timings: benchmarks/scan_compile.py).
    assert _matmuls_in_program(8, scan=True) == _matmuls_in_program(2, scan=True)
    per_block = (_matmuls_in_program(8, scan=False) - _matmuls_in_program(2, scan=False)) / 6
    assert per_block >= 4  # q/k/v, scores, values, out, MLP in and out
    assert _matmuls_in_program(2, scan=True) == _matmuls_in_program(1, scan=False)


def _train_step_program(n_layers: int, scan: bool) -> str:
    cfg = _step_cfg("diffusion")
    cfg.model.n_layers, cfg.model.scan_layers = n_layers, scan
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, VOCAB, objective)
    tx = make_optimizer(cfg.train, num_steps=10)
    graphdef, state, _ = create_train_state(model_cfg, tx, seed=0)
    step = make_train_step(graphdef, objective, tx, VOCAB, seed=0)
    return step.lower(state, _tokens()).as_text()


def test_a_scanned_train_step_is_the_same_program_at_every_depth():
    """What keeps compile time flat in depth: the whole step (forward, backward, clipping and
    the AdamW update of the stacked parameters) has the same operations at 2 and 12 layers;
    only the layer count in the shapes differs. Unrolled, it grows with every layer."""
    def operations(program: str) -> list[str]:
        return [line.split("=", 1)[1].split()[0] for line in program.splitlines()
                if "=" in line and line.lstrip().startswith("%")]

    assert operations(_train_step_program(12, scan=True)) == \
        operations(_train_step_program(2, scan=True))
    assert len(operations(_train_step_program(12, scan=False))) > \
        len(operations(_train_step_program(2, scan=False))) + 100


def _step_cfg(objective_name: str):
    """objective_name: an objective, or "diffusion-stratified" (diffusion.noise_sampling)."""
    cfg = get_config()
    cfg.objective = objective_name.removesuffix("-stratified")
    if objective_name.endswith("-stratified"):
        cfg.diffusion.noise_sampling = "stratified"
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 4
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.seq_len = 16
    cfg.block_diffusion.block_size = 4
    cfg.train.warmup_fraction = 0.0  # the first update already moves the parameters
    return cfg


@pytest.mark.parametrize("objective_name",
                         ["ar", "diffusion", "diffusion-stratified", "block_diffusion"])
def test_accumulated_gradients_equal_one_big_batch(objective_name):
    cfg = _step_cfg(objective_name)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, VOCAB, objective)
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = _tokens(batch=8)
    rng = jax.random.key(3)

    def loss_fn(p, t, rows=None):
        return objective.loss(nnx.merge(graphdef, p), t, rng, VOCAB, rows=rows)

    (whole, _), whole_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    for m in (2, 8):
        loss, _, grads = jax.jit(accumulated_loss_and_grads, static_argnums=(0, 3))(
            loss_fn, params, tokens, m)
        assert float(loss) == pytest.approx(float(whole), rel=1e-5), m
        assert _max_diff(grads, whole_grads) < 1e-5, m


@pytest.mark.parametrize("objective_name", ["ar", "diffusion"])
def test_training_with_microbatches_follows_the_same_path(objective_name):
    cfg = _step_cfg(objective_name)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, VOCAB, objective)
    tx = make_optimizer(cfg.train, num_steps=10)
    runs = {}
    for m in (1, 4):
        graphdef, state, _ = create_train_state(model_cfg, tx, seed=0)
        step = make_train_step(graphdef, objective, tx, VOCAB, seed=0, microbatches=m)
        losses = []
        for i in range(3):
            state, metrics = step(state, _tokens(batch=8, seed=10 + i))
            losses.append(float(metrics["loss"]))
        runs[m] = (losses, state.params)
    np.testing.assert_allclose(runs[4][0], runs[1][0], rtol=1e-5)
    assert _max_diff(runs[4][1], runs[1][1]) < 1e-5


@pytest.mark.parametrize("objective_name", ["ar", "diffusion"])
def test_training_scanned_follows_the_unrolled_path(objective_name):
    """Three optimizer steps: same losses, same parameters and moments. Covers the weight decay
    mask too: a scanned model's [n_layers, d] norm gains are not decayed, as unrolled."""
    cfg = _step_cfg(objective_name)
    cfg.train.weight_decay = 0.5  # large, so a gain wrongly decayed would show
    objective = objective_from_config(cfg)
    tx = make_optimizer(cfg.train, num_steps=10)
    runs = {}
    for scan in (False, True):
        cfg.model.scan_layers = scan
        graphdef, state, _ = create_train_state(transformer_config(cfg, VOCAB, objective), tx,
                                                seed=0)
        step = make_train_step(graphdef, objective, tx, VOCAB, seed=0)
        losses = []
        for i in range(3):
            state, metrics = step(state, _tokens(batch=8, seed=10 + i))
            losses.append(float(metrics["loss"]))
        runs[scan] = (losses, state)
    (plain_losses, plain), (scan_losses, scanned) = runs[False], runs[True]
    np.testing.assert_allclose(scan_losses, plain_losses, rtol=1e-5)
    assert _max_diff(_unrolled(scanned, plain), plain) < 1e-5


def test_a_scanned_run_saves_the_unrolled_layout_and_resumes_either_way(tmp_path):
    cfg = _step_cfg("ar")
    objective = objective_from_config(cfg)
    tx = make_optimizer(cfg.train, num_steps=10)
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    states, layouts = {}, {}
    for scan in (False, True):
        cfg.model.scan_layers = scan
        model_cfg = transformer_config(cfg, VOCAB, objective)
        graphdef, state, _ = create_train_state(model_cfg, tx, 0, mesh, cfg.mesh.rules)
        state, _ = make_train_step(graphdef, objective, tx, VOCAB, seed=0)(state, _tokens())
        states[scan] = state
        layouts[scan] = checkpoint_layout(model_cfg, tx, 0, mesh, cfg.mesh.rules)
    assert layouts[False] is None
    saved = Checkpoints(tmp_path / "scanned", keep=1, async_save=False, layout=layouts[True])
    saved.save(1, states[True], {"step": 1, "pending": []})
    saved.close()
    # On disk: the unrolled run's names, shapes and dtypes.
    from orbax.checkpoint import PyTreeCheckpointHandler
    on_disk = PyTreeCheckpointHandler().metadata(tmp_path / "scanned" / "checkpoints" / "1" /
                                                 "state").tree
    assert array_signatures(on_disk) == array_signatures(states[False])
    # Read back unrolled (as an unrolled run or a tool would) and scanned.
    step, unrolled, _ = Checkpoints(tmp_path / "scanned", keep=1).restore_latest(
        abstract_like(states[False]))
    assert step == 1
    assert _max_diff(unrolled, _unrolled(states[True], states[False])) == 0.0
    _, rescanned, _ = Checkpoints(tmp_path / "scanned", keep=1,
                                  layout=layouts[True]).restore_latest(abstract_like(states[True]))
    assert _max_diff(rescanned, states[True]) == 0.0
    assert jax.tree.structure(rescanned) == jax.tree.structure(states[True])


def _choices(platform, vocab=4096, **model):
    cfg = get_config()
    cfg.data.seq_len = 2048
    for key, value in model.items():
        cfg.model[key] = value
    return hardware_choices(cfg, platform, vocab, objective_from_config(cfg))


def test_auto_choices_suit_the_hardware():
    assert _choices("cpu") == {"attention_impl": "xla", "loss_impl": "xla", "dtype": "float32"}
    assert _choices("cpu", vocab=50304)["loss_impl"] == "chunked"
    assert _choices("gpu")["dtype"] == "bfloat16"
    # Attention dropout (the base config's 0.1) needs the xla path even on TPU.
    assert _choices("tpu") == {"attention_impl": "xla", "loss_impl": "pallas",
                               "dtype": "bfloat16"}
    assert _choices("tpu", attention_dropout=0.0)["attention_impl"] == "splash"
    # Explicit choices are kept.
    assert _choices("tpu", attention_impl="xla", loss_impl="chunked", dtype="float32",
                    attention_dropout=0.0) == {"attention_impl": "xla", "loss_impl": "chunked",
                                               "dtype": "float32"}


def test_auto_stays_on_xla_where_splash_cannot_serve():
    cfg = get_config()
    cfg.model.attention_dropout = 0.0
    cfg.data.seq_len = 200  # not a multiple of 128
    assert hardware_choices(cfg, "tpu", 4096, objective_from_config(cfg))["attention_impl"] \
        == "xla"
    cfg.data.seq_len = 256
    cfg.ar.randmask_ratio = 0.5  # token masking: a dense per-sequence mask
    validate_config(cfg)
    assert hardware_choices(cfg, "tpu", 4096, objective_from_config(cfg))["attention_impl"] \
        == "xla"
    cfg.ar.randmask_ratio = 0.0
    cfg.objective = "block_diffusion"
    assert hardware_choices(cfg, "tpu", 4096, objective_from_config(cfg))["attention_impl"] \
        == "xla"


@pytest.mark.parametrize("key, value, message", [
    ("train.microbatches", 3, "train.microbatches=3: must be >= 1 and divide train.batch_size=32"),
    ("train.microbatches", 0, "train.microbatches=0"),
    ("model.remat", "some", "model.remat='some': allowed none, full, dots"),
    ("model.dtype", "float16", "model.dtype='float16': allowed auto, float32, bfloat16"),
])
def test_bad_memory_options_are_named(key, value, message):
    cfg = get_config()
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)


def test_a_run_may_change_how_its_step_fits_in_memory_on_resume():
    from dvar_jax.run_dir import run_defining_differences

    saved = {"model.remat": "none", "model.scan_layers": False, "train.microbatches": 1,
             "model.d_model": 64}
    moved = {"model.remat": "dots", "model.scan_layers": True, "train.microbatches": 4,
             "model.d_model": 64}
    assert run_defining_differences(saved, moved) == []
    assert run_defining_differences(saved, {**moved, "model.d_model": 128}) == ["model.d_model"]


@pytest.mark.parametrize("hidden_dropout", [0.1, 0.0])
def test_block_dropout_keys_are_the_keys_an_rngs_stream_hands_out_in_order(hidden_dropout):
    """Reference: nnx's own stream, drawn as the model used to draw it (embedding dropout,
    then per block attention and, with hidden dropout, the two residual branches; nnx's
    Dropout draws nothing at rate 0). Same keys, so older runs keep their numbers."""
    from dvar_jax.model.transformer import block_dropout_keys

    cfg = _model_cfg(n_layers=3, hidden_dropout=hidden_dropout)
    base = jax.random.key(11)
    stream = nnx.Rngs(dropout=base)
    embed = stream.dropout() if hidden_dropout else None
    draws_per_block = 3 if hidden_dropout else 1
    expected = [[stream.dropout() for _ in range(draws_per_block)] for _ in range(3)]
    embed_key, keys = block_dropout_keys(cfg, base)
    data = jax.random.key_data
    if hidden_dropout:
        np.testing.assert_array_equal(data(embed_key), data(embed))
    for layer in range(3):
        for j in range(draws_per_block):
            np.testing.assert_array_equal(data(keys[layer, j]), data(expected[layer][j]))
