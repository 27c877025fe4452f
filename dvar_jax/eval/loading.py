"""A trained run, loaded for evaluation and sampling: its config, tokenizer and model at a chosen
checkpoint (`best` by validation loss, `latest`, or a step number)."""

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from dvar_jax.checkpoint import flatten
from dvar_jax.config import transformer_config, validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.data.pipeline import TokenStreams, load_token_streams
from dvar_jax.metrics import read_metrics
from dvar_jax.model.transformer import Transformer
from dvar_jax.objectives import Objective, objective_from_config
from dvar_jax.train import make_optimizer, plan_train_state


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    workdir: Path
    cfg: ConfigDict
    objective: Objective
    model: Transformer
    streams: TokenStreams  # tokenizer and the train / validation token streams of the run
    step: int

    @property
    def tokenizer(self):
        return self.streams.tokenizer

    @property
    def mask_id(self) -> int:
        return self.streams.tokenizer.vocab_size


def saved_config(workdir: Path) -> ConfigDict:
    """The run's config.json over today's defaults (keys added since it was written keep their
    defaults; a key the code no longer knows is an error naming it)."""
    path = workdir / "config.json"
    if not path.is_file():
        raise ValueError(f"--workdir={str(workdir)!r} holds no trained run (no config.json)")
    cfg = get_config()
    saved = flatten(json.loads(path.read_text()))
    for key, value in saved.items():
        parent, _, leaf = key.rpartition(".")
        node = cfg
        for part in parent.split(".") if parent else ():
            node = node.get(part, None)
            if node is None:
                break
        if node is None or leaf not in node:
            raise ValueError(f"{path}: config key {key!r} is not known to this version")
        node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    validate_config(cfg)
    return cfg


def checkpoint_steps(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def choose_step(workdir: Path, checkpoint: str) -> int:
    """The step of `checkpoint`: "best" (lowest logged validation loss among the kept
    checkpoints), "latest", or a step number that has a checkpoint."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"--workdir={str(workdir)!r} has no checkpoints to load")
    if checkpoint == "latest":
        return steps[-1]
    if checkpoint == "best":
        evals = [r for r in read_metrics(workdir, "eval") if r["step"] in steps
                 and isinstance(r.get("val_loss"), float)]
        return min(evals, key=lambda r: r["val_loss"])["step"] if evals else steps[-1]
    if checkpoint.isdigit() and int(checkpoint) in steps:
        return int(checkpoint)
    raise ValueError(f"--checkpoint={checkpoint!r}: allowed best, latest or one of the saved "
                     f"steps {', '.join(map(str, steps))}")


def load_run(workdir: str | Path, checkpoint: str = "best", **model_overrides) -> LoadedRun:
    """The run in `workdir` with the parameters of `checkpoint`, on the default device.

    model_overrides replace fields of its TransformerConfig that do not change the parameters
    (e.g. attention_impl="xla" or loss_impl="chunked" to evaluate a kernel-trained model).
    """
    workdir = Path(workdir)
    cfg = saved_config(workdir)
    step = choose_step(workdir, checkpoint)
    streams = load_token_streams(cfg.data)
    model_cfg = transformer_config(cfg, streams.tokenizer.vocab_size)
    model_cfg = dataclasses.replace(model_cfg, **model_overrides)
    graphdef, init, _ = plan_train_state(model_cfg, make_optimizer(cfg.train, 1), cfg.seed)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(init))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore((workdir / "checkpoints" / str(step) / "state").absolute(),
                                     abstract)
    model = nnx.merge(graphdef, state.params)
    return LoadedRun(workdir, cfg, objective_from_config(cfg), model, streams, step)
