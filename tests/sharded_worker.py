"""Runs training on simulated CPU devices and prints the results as JSON (used by
tests/test_sharding.py in a subprocess, because the device count is fixed when JAX starts).

For every mesh and objective: the shard shape of every parameter, the loss of each of 3 steps,
the parameters after them, and a validation loss; and the same on a single device. The meshes
in KERNEL_MESHES run again with the Pallas attention and loss kernels (interpret mode, per shard).
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

from dvar_jax.configs.base import get_config
from dvar_jax.model.transformer import TransformerConfig
from dvar_jax.objectives import get_objective
from dvar_jax.sharding import (
    activation_sharding,
    global_batch,
    make_mesh,
    rules_from_config,
)
from dvar_jax.step import (
    create_train_state,
    evaluate,
    make_eval_step,
    make_optimizer,
    make_train_step,
)

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
KERNEL_MESHES = [(2, 2, 2), (1, 4, 2)]
MASK_ID = 200
STEPS = 3


def run(mesh_shape, objective_name, kernels=False):
    cfg = get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_from_config(cfg.mesh.rules)
    objective = get_objective(objective_name)
    model_cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, head_dim=16,
                                  causal=objective.causal,
                                  **(dict(attention_impl="pallas", attention_block_q=8,
                                          attention_block_k=8, loss_impl="pallas",
                                          loss_block_t=8, loss_block_v=128) if kernels else {}))
    cfg.train.peak_lr, cfg.train.warmup_fraction = 1e-2, 0.0
    tx = make_optimizer(cfg.train, 10)
    rng = np.random.RandomState(0)
    batches = [rng.randint(0, MASK_ID, (8, 17)).astype(np.int32) for _ in range(STEPS)]
    windows = rng.randint(0, MASK_ID, (8, 17)).astype(np.int32)
    with activation_sharding(mesh, rules):
        graphdef, state, placement = create_train_state(model_cfg, tx, seed=1, mesh=mesh,
                                                        rules=rules)
        shards = {jax.tree_util.keystr(path): {"shape": list(x.shape),
                                               "shard": list(x.sharding.shard_shape(x.shape))}
                  for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
        opt_leaves = [(list(x.shape), list(x.sharding.shard_shape(x.shape)))
                      for x in jax.tree.leaves(state.opt_state)]
        step = make_train_step(graphdef, objective, tx, MASK_ID, seed=1, placement=placement)
        losses = []
        for tokens in batches:
            state, metrics = step(state, global_batch(tokens, placement.batch))
            losses.append(float(metrics["loss"]))
        eval_step = make_eval_step(graphdef, objective, MASK_ID, num_mc=2, placement=placement)
        val = evaluate(eval_step, state.params, windows, batch_size=8, seed=0)
    params = {jax.tree_util.keystr(p): np.asarray(x).ravel().tolist()
              for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state.params))}
    return {"mesh": list(mesh_shape), "objective": objective_name, "kernels": kernels,
            "shards": shards,
            "opt_leaves": opt_leaves, "losses": losses, "val_loss": val, "params": params,
            "step": int(state.step)}


def main():
    assert jax.device_count() >= 8, f"needs 8 devices, has {jax.device_count()}"
    results = [run(m, o) for o in ("ar", "diffusion") for m in MESHES]
    results += [run(m, o, kernels=True) for o in ("ar", "diffusion") for m in KERNEL_MESHES]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
