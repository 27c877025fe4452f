"""The pure half of training: the train state, the optimizer, and the jitted train and eval
steps that every objective shares.

State lives in one place (`TrainState`). A step is a pure function of (state, tokens) whose
randomness is derived from (seed, step), so a run is reproducible from its config alone. The
loop that drives these (logging, evaluation cadence, checkpoints, preemption) is
`dvar_jax.train`; evaluation and memory planning use this module without it.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from dvar_jax.checkpoint import SavedLayout
from dvar_jax.model.transformer import Transformer, TransformerConfig, stacked_over_layers
from dvar_jax.objectives import Objective
from dvar_jax.objectives.rows import BatchRows
from dvar_jax.sharding import (
    LogicalRules,
    batch_sharding,
    replicated_rows,
    train_state_shardings,
)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps taken
    params: nnx.State
    opt_state: optax.OptState


# Where a train state holds the parameters evaluation uses, as its checkpoint names them: the
# moving average when train.ema_decay > 0 (make_optimizer's named chain), else the parameters.
_EMA = "ema"
EMA_PATH = ("opt_state", _EMA, "params")
PARAMS_PATH = ("params",)


def lr_schedule(train_cfg: ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup over warmup_fraction of the steps, then cosine to min_lr_ratio x peak at the
    last step: the schedule stretches with the run, as the study's (PAPER.md §4)."""
    warmup = max(1, round(train_cfg.warmup_fraction * num_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.peak_lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=train_cfg.peak_lr * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg: ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decay on parameters of >= 2 dimensions per layer
    only (not norm gains): a scanned model's [n_layers, d] gains are not decayed either."""
    def decayed(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, p: p.ndim - stacked_over_layers(path) >= 2, params)

    tx = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr_schedule(train_cfg, num_steps), b1=train_cfg.b1, b2=train_cfg.b2,
                    eps=train_cfg.eps, weight_decay=train_cfg.weight_decay, mask=decayed),
    )
    if not train_cfg.ema_decay:
        return tx
    # Named, so the average sits at a fixed path of the state (EMA_PATH) whatever the chain.
    return optax.named_chain(("optimizer", tx), (_EMA, params_ema(train_cfg.ema_decay)))


class ParamsEmaState(NamedTuple):
    count: jax.Array  # int32 scalar: updates averaged so far
    params: optax.Params  # the moving average, shaped like the parameters


def params_ema(decay: float) -> optax.GradientTransformation:
    """An exponential moving average of the parameters, kept in the optimizer state; the updates
    pass through unchanged, so it must come last in a chain. After update n (from 0) the
    average moves to the new parameters with weight 1 - d_n, d_n = min(decay, (1 + n) / (10 + n)):
    the ramp keeps the initialization from dominating early averages."""
    def init(params):
        return ParamsEmaState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        n = state.count.astype(jnp.float32)
        weight_of_new = 1.0 - jnp.minimum(decay, (1.0 + n) / (10.0 + n))
        average = optax.incremental_update(optax.apply_updates(params, updates), state.params,
                                           weight_of_new)
        return updates, ParamsEmaState(state.count + 1, average)

    return optax.GradientTransformation(init, update)


def evaluated_params_path(train_cfg: ConfigDict) -> tuple[str, ...]:
    return EMA_PATH if train_cfg.ema_decay else PARAMS_PATH


def evaluated_params(state: TrainState) -> nnx.State:
    """The parameters validation and checkpoint selection score: the moving average when the
    run keeps one, else the trained parameters."""
    if isinstance(state.opt_state, dict) and _EMA in state.opt_state:
        return state.opt_state[_EMA].params
    return state.params


class Placement(NamedTuple):
    """Where a run's arrays live: its mesh and the shardings derived from the rule table."""

    mesh: Mesh
    state: TrainState  # a NamedSharding per leaf
    batch: NamedSharding  # token batches [batch, seq + 1]
    replicated: NamedSharding


def plan_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
                     mesh: Mesh | None = None, rules: LogicalRules = ()
                     ) -> tuple[nnx.GraphDef, Callable[[], TrainState], Placement | None]:
    """The model's static graph, the pure init function of the train state, and (with a mesh)
    where every array of it goes. Nothing is allocated: shapes are worked out abstractly."""
    init_key = jax.random.fold_in(jax.random.key(seed), 0)

    def init() -> TrainState:
        params = nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(params=init_key)), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    graphdef, _ = abstract_params(model_cfg)
    placement = None
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        placement = Placement(mesh, train_state_shardings(jax.eval_shape(init), tx, mesh, rules),
                              batch_sharding(mesh, rules), replicated)
    return graphdef, init, placement


def saved_model_config(model_cfg: TransformerConfig) -> TransformerConfig:
    """The model whose parameter tree checkpoints hold: the blocks unrolled, one entry each,
    whether or not this one scans them (dvar_jax/checkpoint.py)."""
    return dataclasses.replace(model_cfg, scan_layers=False)


def checkpoint_layout(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
                      mesh: Mesh, rules: LogicalRules = ()) -> SavedLayout | None:
    """How checkpoints hold this model's train state when it holds it otherwise (a scanned
    model): the saved layout's abstract state with its shardings on `mesh`; None when the two
    are the same."""
    saved_cfg = saved_model_config(model_cfg)
    if saved_cfg == model_cfg:
        return None
    _, init, placement = plan_train_state(saved_cfg, tx, seed, mesh, rules)
    abstract = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                     sharding=sharding),
                            jax.eval_shape(init), placement.state)
    return SavedLayout.of(abstract)


def abstract_params(model_cfg: TransformerConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's static graph and its parameters' shapes and dtypes (ShapeDtypeStruct
    leaves), with nothing allocated: what loading a trained model for evaluation needs."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.graphdef(model), nnx.state(model, nnx.Param)


def create_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh | None = None, rules: LogicalRules = ()
                       ) -> tuple[nnx.GraphDef, TrainState, Placement | None]:
    """A freshly initialised model, split into its static graph and its parameters, + optimizer.

    With a mesh, one jitted init creates every array directly in its shards: no device ever
    holds a full copy of a sharded parameter.
    """
    graphdef, init, placement = plan_train_state(model_cfg, tx, seed, mesh, rules)
    state = jax.jit(init, out_shardings=None if placement is None else placement.state)()
    return graphdef, state, placement


def make_train_step(graphdef: nnx.GraphDef, objective: Objective,
                    tx: optax.GradientTransformation, mask_id: int, seed: int,
                    placement: Placement | None = None, skip_nonfinite: bool = False,
                    microbatches: int = 1):
    """The jitted step (state, tokens [batch, seq + 1]) -> (state, metrics); state is donated.

    With a placement, inputs and outputs have explicit shardings and metrics come back
    replicated. With skip_nonfinite, a step whose loss or gradient norm is not finite leaves
    parameters and optimizer state as they were and reports `skipped` = 1.
    With microbatches = m > 1 the gradient is accumulated over m slices of the batch inside the
    step (`accumulated_loss_and_grads`): one optimizer update, activations of batch / m rows.
    """
    step_key = jax.random.fold_in(jax.random.key(seed), 1)
    batch_sharding = None if placement is None else placement.batch

    def step_fn(state: TrainState, tokens: jax.Array):
        rng = jax.random.fold_in(step_key, state.step)

        def loss_fn(params, tokens, rows=None):
            return objective.loss(nnx.merge(graphdef, params), tokens, rng, mask_id, rows=rows)

        if microbatches == 1:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params,
                                                                               tokens)
        else:
            loss, metrics, grads = accumulated_loss_and_grads(loss_fn, state.params, tokens,
                                                              microbatches, batch_sharding)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
        if skip_nonfinite:  # keep the old parameters and moments; the step still counts
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
            metrics["skipped"] = (~finite).astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    if placement is None:
        return jax.jit(step_fn, donate_argnums=0)
    return jax.jit(step_fn, donate_argnums=0,
                   in_shardings=(placement.state, placement.batch),
                   out_shardings=(placement.state, placement.replicated))


def accumulated_loss_and_grads(loss_fn: Callable, params: nnx.State, tokens: jax.Array,
                               microbatches: int, batch_sharding: NamedSharding | None = None
                               ) -> tuple[jax.Array, dict, nnx.State]:
    """Loss, metrics and gradient of a batch [batch, seq + 1] as the mean over `microbatches`
    slices, summed in float32 under a scan (one slice's activations live at a time).

    loss_fn(params, tokens, rows) -> (loss, metrics), a per-token mean over its rows. Slice i
    holds global rows i, m + i, 2m + i, ...: every data shard keeps its rows local (a strided
    slice of a row-sharded batch is still sharded the same way), and `rows` tells the objective
    which rows it has, so it draws the same noise as for the whole batch (objectives/rows.py).
    All slices have batch / m rows and every objective's loss is a mean over rows x positions,
    so the mean of slice means is the whole batch's mean.
    batch_sharding: the token batch's sharding, kept on each slice.
    """
    batch = tokens.shape[0]
    rows_per_slice = batch // microbatches
    # [batch, w] -> [rows_per_slice, m, w] -> [m, rows_per_slice, w]: slice i = rows i::m.
    slices = jnp.swapaxes(tokens.reshape(rows_per_slice, microbatches, -1), 0, 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one_slice(acc, i):
        part = jax.lax.dynamic_index_in_dim(slices, i, keepdims=False)
        if batch_sharding is not None:
            part = jax.lax.with_sharding_constraint(part, batch_sharding)
        rows = BatchRows(jnp.arange(rows_per_slice) * microbatches + i, batch, i)
        (loss, metrics), grads = grad_fn(params, part, rows)
        return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

    (loss, metrics), grads = jax.eval_shape(
        grad_fn, params, slices[0], BatchRows(jnp.arange(rows_per_slice), batch, jnp.int32(0)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss, metrics, grads))
    total, _ = jax.lax.scan(one_slice, zeros, jnp.arange(microbatches))
    loss, metrics, grads = jax.tree.map(lambda x: x / microbatches, total)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, grads


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective, mask_id: int, num_mc: int,
                   placement: Placement | None = None):
    """(params, tokens [batch, seq + 1] numpy, rng) -> per-sequence summed loss [batch]."""

    def eval_fn(params, tokens, rng):
        return objective.validation_loss(nnx.merge(graphdef, params), tokens, rng, mask_id, num_mc)

    if placement is None:
        return jax.jit(eval_fn)
    jitted = jax.jit(eval_fn, in_shardings=(placement.state.params, placement.batch,
                                            placement.replicated),
                     out_shardings=placement.replicated)
    # Every process holds all validation windows: each contributes the rows of its devices.
    return lambda params, tokens, rng: jitted(
        params, replicated_rows(np.asarray(tokens), placement.batch), rng)


def evaluate(eval_step, params: nnx.State, windows: np.ndarray, batch_size: int,
             seed: int) -> float:
    """Mean per-token validation loss over all windows [n, seq + 1].

    Batch j always uses the key fold_in(seed, j), so every evaluation of every run with the same
    validation data draws the same masks and noise levels: curves are comparable.
    """
    n, seq = windows.shape[0], windows.shape[1] - 1
    key = jax.random.key(seed)
    total = 0.0
    for j, start in enumerate(range(0, n, batch_size)):
        chunk = windows[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:  # pad with repeats so one compiled shape serves every batch
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        sums = eval_step(params, chunk, jax.random.fold_in(key, j))
        total += float(jnp.sum(sums[:real]))
    return total / (n * seq)
