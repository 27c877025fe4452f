"""Polyak averaging (train.ema_decay): the average against a float64 recurrence, its place in the
optimizer state and its shardings, and a run whose validation, best checkpoint and `dvar eval`
all score the average."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dvar_jax.checkpoint import named_leaves, read_saved_arrays
from dvar_jax.configs.base import get_config
from dvar_jax.configs.recipes import tiny_config
from dvar_jax.step import (
    EMA_PATH,
    PARAMS_PATH,
    TrainState,
    evaluated_params,
    evaluated_params_path,
    make_optimizer,
    params_ema,
)


def _params(rng):
    return {"w": rng.randn(3, 4).astype(np.float32), "b": rng.randn(4).astype(np.float32)}


def test_the_average_follows_the_float64_recurrence_and_passes_updates_through():
    decay = 0.9
    tx = params_ema(decay)
    rng = np.random.RandomState(0)
    params = _params(rng)
    state = tx.init(params)
    expected = {k: v.astype(np.float64) for k, v in params.items()}
    current = {k: v.astype(np.float64) for k, v in params.items()}
    for n in range(30):
        updates = _params(rng)
        out, state = tx.update(updates, state, params)
        for k in params:
            np.testing.assert_array_equal(out[k], updates[k])  # untouched
        params = {k: params[k] + updates[k] for k in params}
        d = min(decay, (1 + n) / (10 + n))  # the ramp: 0.1, 0.18, ... up to 0.9 at n = 71
        current = {k: current[k] + updates[k] for k in params}
        expected = {k: d * expected[k] + (1 - d) * current[k] for k in params}
    assert int(state.count) == 30
    for k in params:
        np.testing.assert_allclose(state.params[k], expected[k], rtol=1e-5, atol=1e-6)


def test_the_optimizer_with_an_average_takes_the_same_steps_as_without():
    cfg = get_config().train
    cfg.peak_lr, cfg.warmup_fraction = 1e-2, 0.0
    plain = make_optimizer(cfg, 10)
    cfg.ema_decay = 0.99
    averaged = make_optimizer(cfg, 10)
    rng = np.random.RandomState(1)
    p_plain = p_avg = jax.tree.map(jnp.asarray, _params(rng))
    s_plain, s_avg = plain.init(p_plain), averaged.init(p_avg)
    for _ in range(5):
        grads = jax.tree.map(jnp.asarray, _params(rng))
        u, s_plain = plain.update(grads, s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
        u, s_avg = averaged.update(grads, s_avg, p_avg)
        p_avg = optax.apply_updates(p_avg, u)
    jax.tree.map(np.testing.assert_array_equal, p_plain, p_avg)
    state = TrainState(jnp.int32(5), p_avg, s_avg)
    average = evaluated_params(state)
    assert average is s_avg["ema"].params
    assert not np.allclose(average["w"], p_avg["w"])  # it lags the parameters
    assert evaluated_params(TrainState(jnp.int32(5), p_plain, s_plain)) is p_plain


def test_the_average_is_found_as_a_parameter_tree_for_sharding():
    """train_state_shardings places optimizer-state trees shaped like the parameters with the
    parameters (optax.tree_map_params): the average must be one, its count must not."""
    cfg = get_config().train
    cfg.ema_decay = 0.999
    tx = make_optimizer(cfg, 10)
    params = _params(np.random.RandomState(2))
    marked = optax.tree_map_params(tx, lambda _: "param", tx.init(params),
                                   transform_non_params=lambda _: "other")
    assert jax.tree.leaves(marked["ema"].params) == ["param", "param"]
    assert marked["ema"].count == "other"


def test_the_evaluated_path_follows_the_config():
    cfg = get_config().train
    assert evaluated_params_path(cfg) == PARAMS_PATH == ("params",)
    cfg.ema_decay = 0.5
    assert evaluated_params_path(cfg) == EMA_PATH


@pytest.mark.slow
def test_a_run_with_an_average_validates_and_evaluates_the_average(text_data_cfg, tmp_path):
    """Its logged validation loss is the average's: `dvar eval` of the last checkpoint (which
    loads the average) reproduces it exactly, and the trained parameters score otherwise.
    AR, so the loss is exact and any difference is the parameters'."""
    from dvar_jax.eval.loading import load_run
    from dvar_jax.eval.validation import evaluate_validation
    from dvar_jax.run_dir import RunDir, read_metrics
    from dvar_jax.train import train

    cfg = tiny_config("ar", text_data_cfg.path, text_data_cfg.cache_dir)
    cfg.train.ema_decay = 0.9
    summary = train(cfg, tmp_path, progress=False)
    assert summary.completed and summary.best_val_loss < math.log(400)

    run = load_run(tmp_path, "latest")
    saved = read_saved_arrays(RunDir(tmp_path).checkpoint_state_dir(run.step))
    loaded = dict(named_leaves(nnx.state(run.model, nnx.Param)))
    assert loaded
    for name, leaf in loaded.items():
        np.testing.assert_array_equal(leaf, saved["/".join(EMA_PATH) + "/" + name])
    assert not all(np.array_equal(leaf, saved["params/" + name])
                   for name, leaf in loaded.items())

    logged = [r for r in read_metrics(tmp_path) if "val_loss" in r][-1]
    result = evaluate_validation(run, num_mc=1, batch_size=cfg.eval.batch_size,
                                 seed=cfg.eval.seed, validation_tokens=cfg.data.validation_tokens)
    np.testing.assert_allclose(result["val_loss"], logged["val_loss"], rtol=1e-6)


def test_a_saved_average_is_restored_with_the_state(tmp_path):
    """The average rides in the optimizer state: a checkpoint restores it with the rest (a
    resumed run goes on averaging), restore_params reads it alone at EMA_PATH, and a state
    saved without one is refused by a run that keeps one, naming a path it lacks."""
    from dvar_jax.checkpoint import CheckpointError, Checkpoints, abstract_like, restore_params

    cfg = get_config().train
    cfg.ema_decay = 0.9
    tx = make_optimizer(cfg, 10)
    rng = np.random.RandomState(3)
    params = jax.tree.map(jnp.asarray, _params(rng))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    for _ in range(3):
        updates, opt_state = tx.update(jax.tree.map(jnp.asarray, _params(rng)), state.opt_state,
                                       state.params)
        state = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
    checkpoints = Checkpoints(tmp_path, keep=2, async_save=False)
    checkpoints.save(3, state, {"step": 3, "pending": []})
    checkpoints.close()
    step, restored, _ = Checkpoints(tmp_path, keep=2).restore_latest(abstract_like(state))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    from dvar_jax.run_dir import RunDir
    average = restore_params(RunDir(tmp_path).checkpoint_state_dir(3),
                             abstract_like(state.params), jax.devices()[0], EMA_PATH)
    jax.tree.map(np.testing.assert_array_equal, average, evaluated_params(state))

    cfg.ema_decay = 0.0
    plain = make_optimizer(cfg, 10)
    other = tmp_path / "plain"
    checkpoints = Checkpoints(other, keep=2, async_save=False)
    checkpoints.save(1, TrainState(jnp.int32(1), params, plain.init(params)),
                     {"step": 1, "pending": []})
    checkpoints.close()
    with pytest.raises(CheckpointError, match="holds another model: opt_state/optimizer/"):
        Checkpoints(other, keep=2).restore_latest(abstract_like(state))
