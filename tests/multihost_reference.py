"""The run tests/multihost_worker.py makes, as plain functions both sides share."""

import numpy as np

from dvar_jax.configs.base import get_config
from dvar_jax.data.pipeline import TrainBatches
from dvar_jax.model.transformer import TransformerConfig
from dvar_jax.objectives import get_objective
from dvar_jax.sharding import rules_from_config
from dvar_jax.step import make_optimizer

STEPS = 3


def setup(objective_name: str):
    cfg = get_config()
    cfg.train.peak_lr, cfg.train.warmup_fraction = 1e-2, 0.0
    objective = get_objective(objective_name)
    model_cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                  head_dim=16, causal=objective.causal)
    return (cfg, model_cfg, make_optimizer(cfg.train, 10), objective,
            rules_from_config(cfg.mesh.rules))


def batches_for(process_index: int, process_count: int) -> TrainBatches:
    tokens = np.random.RandomState(0).randint(0, 200, 2000).astype(np.int32)
    return TrainBatches(tokens, seq_len=16, unique_tokens=2000, epochs=1, batch_size=8, seed=3,
                        process_index=process_index, process_count=process_count)
