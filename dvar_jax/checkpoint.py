"""Checkpoints of a run (orbax): the train state, and as JSON the step, the config and the
metrics not yet logged. RNG and data position need no saving: both are pure functions of
(config, step), so restoring the step restores them.

Saves are asynchronous, kept as the latest `checkpoint.keep` plus the best by validation loss.
A checkpoint that cannot be read (partial, truncated, an item missing) is skipped with a
warning and the one before it is used.
"""

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

log = logging.getLogger(__name__)

# The config keys whose change changes the run (model, objective, data, optimisation, seed);
# mesh, logging, evaluation and checkpoint cadence may change between restarts.
RUN_DEFINING = ("objective", "seed", "model.", "data.", "train.")
NOT_RUN_DEFINING = ("data.cache_dir", "train.log_every")


class CheckpointError(ValueError):
    """A workdir whose checkpoints cannot serve the requested run."""


def run_defining_differences(saved: dict, requested: dict) -> list[str]:
    """Keys (dotted) whose values differ between two flattened configs and change the run."""
    keys = sorted(set(saved) | set(requested))
    return [k for k in keys
            if k.startswith(RUN_DEFINING) and k not in NOT_RUN_DEFINING
            and saved.get(k) != requested.get(k)]


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


class Checkpoints:
    """The checkpoints of one workdir (`<workdir>/checkpoints/<step>/`)."""

    def __init__(self, workdir: Path, keep: int, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=async_save,
                create=True, cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, val_loss: float | None = None) -> None:
        """Starts an asynchronous save; `wait` blocks until every save has committed."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=None if val_loss is None else {"val_loss": val_loss}, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, placed as `abstract_state`
        says (shapes, dtypes, shardings: any mesh); None when there is none."""
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return step, restored.state, restored.meta
            except Exception as e:  # any damage means: use the one before
                damaged = self.directory / str(step)
                # Kept, not deleted, under a name the manager ignores: the run will write this
                # step again, and the user may still want to look at what was there.
                aside = damaged.with_name(f"{step}.unreadable-{int(time.time())}")
                damaged.rename(aside)
                self._manager.reload()
                log.warning("checkpoint %s is unreadable (%s: %s); moved to %s",
                            damaged, type(e).__name__, str(e)[:300], aside)
                print(f"warning: skipping unreadable checkpoint {damaged} "
                      f"({type(e).__name__}); moved it to {aside.name}", flush=True)
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(state) -> Any:
    """Shapes, dtypes and shardings of `state`, for restoring onto the same placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
