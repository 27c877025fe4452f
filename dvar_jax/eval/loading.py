"""A trained run, loaded for evaluation and sampling: its config, objective, tokenizer and
model at a chosen checkpoint (`best` by validation loss, `latest`, or a step number)."""

import dataclasses
from pathlib import Path

import jax
from flax import nnx
from ml_collections import ConfigDict

from dvar_jax.checkpoint import relayout_blocks, restore_params
from dvar_jax.config import transformer_config, validate_config
from dvar_jax.data.pipeline import RunData, open_run_data
from dvar_jax.model.transformer import Transformer
from dvar_jax.objectives import Objective, objective_from_config
from dvar_jax.run_dir import RunDir
from dvar_jax.step import abstract_params, evaluated_params_path, saved_model_config


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    workdir: Path
    cfg: ConfigDict
    objective: Objective
    model: Transformer
    data: RunData  # the run's tokenizer and its train / validation token stores
    step: int

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def mask_id(self) -> int:
        return self.data.tokenizer.vocab_size


def saved_config(workdir: Path) -> ConfigDict:
    """The run's config.json over today's defaults, validated (keys added since it was written
    keep their defaults; a key the code no longer knows is an error naming it)."""
    cfg = RunDir(workdir).saved_config()
    validate_config(cfg)
    return cfg


def load_run(workdir: str | Path, checkpoint: str = "best", **model_overrides) -> LoadedRun:
    """The run in `workdir` with the parameters of `checkpoint`, on the default device.

    model_overrides replace fields of its TransformerConfig that do not change the parameters
    (e.g. attention_impl="xla" or loss_impl="chunked" to evaluate a kernel-trained model).
    """
    run = RunDir(workdir)
    cfg = saved_config(run.root)
    step = run.choose_checkpoint(checkpoint)
    data = open_run_data(cfg.data)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, data.tokenizer.vocab_size, objective)
    model_cfg = dataclasses.replace(model_cfg, **model_overrides)
    graphdef, abstract = abstract_params(model_cfg)
    saved_cfg = saved_model_config(model_cfg)
    saved = abstract if saved_cfg == model_cfg else abstract_params(saved_cfg)[1]
    params = restore_params(run.checkpoint_state_dir(step), saved, jax.devices()[0],
                            evaluated_params_path(cfg.train))
    if saved is not abstract:  # a scanned model: stack the saved blocks
        params = jax.jit(lambda p: relayout_blocks(p, abstract))(params)
    model = nnx.merge(graphdef, params)
    return LoadedRun(run.root, cfg, objective, model, data, step)
