"""Checkpoints of a run (orbax): the train state, and as JSON the step, the config and the
metrics not yet logged. RNG and data position need no saving: both are pure functions of
(config, step), so restoring the step restores them.

Saves are asynchronous, kept as the latest `checkpoint.keep` plus the best by validation loss.
A checkpoint that cannot be read (partial, truncated, an item missing) is skipped with a
warning, set aside, and the one before it is used. A readable checkpoint of another model (its
saved shapes differ from the requested ones) is an error instead and is left untouched: it is
somebody's finished work, not damage.

Checkpoints always hold one entry per transformer block ("params/blocks/3/qkv/kernel"), the
unrolled layout. A scanned model (`model.scan_layers`) holds its blocks stacked along a leading
layer axis; it is rearranged by name on the way out and in (`relayout_blocks`, given to
`Checkpoints` as a `SavedLayout`), so a run may resume with scan on or off and every tool reads
one layout. The rearranged copy costs one train state of memory while a save starts.

A run folder on gs:// works the same: orbax writes there natively (metadata through epath,
arrays through TensorStore's GCS driver). On a multi-host run every process calls save and
restore (orbax coordinates them; each writes its own shards); only process 0 sets a damaged
checkpoint aside, the others waiting for it.
"""

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from dvar_jax import storage
from dvar_jax.run_dir import RunDir

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A workdir whose checkpoints cannot serve the requested run."""


def _key_name(key) -> str:
    """One step of a pytree path as text: dict keys, attribute names and indices alike, so the
    train state and orbax's saved metadata (plain dicts and lists) name a leaf the same way."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def array_signatures(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """`path -> (shape, dtype)` of every array leaf (jax arrays, ShapeDtypeStructs, orbax
    ArrayMetadata); paths like "params/blocks/0/qkv/kernel", in flattening order."""
    return {name: (tuple(leaf.shape), str(leaf.dtype)) for name, leaf in named_leaves(tree)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype")}


def first_mismatch(saved: dict, requested: dict) -> str | None:
    """How the first differing array of two `array_signatures` differs, or None if none does.

    Requested paths come first (in the state's order: step, params, optimizer), so a model of
    another size is reported by a parameter rather than by an optimizer moment."""
    def describe(sig):
        return f"{sig[1]}{list(sig[0])}"

    for path, want in requested.items():
        have = saved.get(path)
        if have is None:
            return f"{path} is not in the checkpoint (this config's model has {describe(want)})"
        if have != want:
            return f"{path} is {describe(have)} in the checkpoint but {describe(want)} here"
    for path, have in saved.items():
        if path not in requested:
            return f"{path} ({describe(have)}) is in the checkpoint but not in this model"
    return None


# "blocks/<layer>/" in a leaf's name: one entry per block (the saved layout).
_LAYER_INDEX = re.compile(r"(?:^|/)blocks/(\d+)/")


def relayout_blocks(tree, target):
    """`tree`'s leaves arranged as `target` (a tree of ShapeDtypeStruct or arrays), matched by
    name: a leaf named alike in both is passed through; a per-block leaf of `target`
    ("params/blocks/3/qkv/kernel") is layer 3 of `tree`'s stacked leaf ("params/blocks/qkv/
    kernel", [n_layers, ...]), and a stacked leaf of `target` stacks `tree`'s per-block leaves
    in layer order. Pure jnp: jit it with `target`'s shardings to place the result."""
    source = dict(named_leaves(tree))

    def leaf(name: str):
        if name in source:
            return source[name]
        per_block = _LAYER_INDEX.search(name)
        if per_block:
            start, end = per_block.span(1)
            stacked = name[:start] + name[end + 1:]
            if stacked not in source:
                raise KeyError(f"{name}: neither it nor {stacked} is in the tree to rearrange")
            return source[stacked][int(per_block.group(1))]
        layers = []
        while (layer := name.replace("blocks/", f"blocks/{len(layers)}/", 1)) in source:
            layers.append(source[layer])
        if not layers:
            raise KeyError(f"{name}: neither it nor its per-block leaves are in the tree")
        return jnp.stack(layers)

    names = [name for name, _ in named_leaves(target)]
    return jax.tree.unflatten(jax.tree.structure(target), [leaf(name) for name in names])


@dataclasses.dataclass(frozen=True)
class SavedLayout:
    """How a train state held in another layout than the saved one (a scanned model's) is
    written and read: `abstract` is the saved layout (ShapeDtypeStruct leaves with shardings),
    `to_saved` rearranges a state into it."""

    abstract: object
    to_saved: Callable

    @classmethod
    def of(cls, saved_abstract) -> "SavedLayout":
        return cls(saved_abstract, _placed_relayout(saved_abstract))

    def from_saved(self, saved, abstract_state):
        """A restored saved-layout state rearranged as `abstract_state` says (its shardings)."""
        return _placed_relayout(abstract_state)(saved)


def _placed_relayout(target) -> Callable:
    """`relayout_blocks` into `target`, jitted to place every leaf as `target`'s shardings say."""
    shardings = jax.tree.map(lambda x: x.sharding, target)
    return jax.jit(lambda tree: relayout_blocks(tree, target), out_shardings=shardings)


def _epath(where: "str | Path | epath.Path") -> epath.Path:
    """An absolute epath.Path for orbax (gs:// kept as it is)."""
    return epath.Path(where if storage.is_gcs(where) else Path(where).absolute())


class Checkpoints:
    """The checkpoints of one run folder (`RunDir(workdir).checkpoints_dir / <step>`), local or
    gs://."""

    def __init__(self, workdir: "str | Path | epath.Path", keep: int, async_save: bool = True,
                 layout: SavedLayout | None = None):
        """layout: how to write and read a state not held in the saved layout (None: it is)."""
        self.directory = _epath(RunDir(workdir).checkpoints_dir)
        self.layout = layout
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1,
                                      keep_checkpoints_without_metrics=False),
        ])
        # Handlers named up front, so the saved shapes can be read before anything is restored.
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=async_save,
                create=True, cleanup_tmp_directories=True))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, val_loss: float | None = None) -> None:
        """Starts an asynchronous save; `wait` blocks until every save has committed."""
        if self.layout is not None:
            state = self.layout.to_saved(state)
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=None if val_loss is None else {"val_loss": val_loss}, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, placed as `abstract_state`
        says (shapes, dtypes, shardings: any mesh, any device count); None when there is none.

        A damaged checkpoint is set aside and the one before it tried; a readable one whose
        arrays differ from `abstract_state` raises CheckpointError and stays as it is.
        """
        wanted = abstract_state
        if self.layout is not None:
            abstract_state = self.layout.abstract
        requested = array_signatures(abstract_state)
        for step in reversed(self.steps()):
            try:
                saved = self._manager.item_metadata(step)["state"]
                if saved is None:
                    raise ValueError("the state item has no metadata")
                saved = array_signatures(saved.tree if hasattr(saved, "tree") else saved)
            except Exception as e:  # any damage means: use the one before
                self._set_aside(step, e)
                continue
            mismatch = first_mismatch(saved, requested)
            if mismatch is not None:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} holds another model: {mismatch}; "
                    f"it was left untouched. Train this config in another workdir, or continue "
                    f"the saved run with its own config ({self.directory.parent}/config.json)")
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # any damage means: use the one before
                self._set_aside(step, e)
                continue
            state = restored.state
            if self.layout is not None:
                state = self.layout.from_saved(state, wanted)
            return step, state, restored.meta
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        damaged = self.directory / str(step)
        # Kept, not deleted, under a name the manager ignores: the run will write this step
        # again, and the user may still want to look at what was there.
        aside = damaged.with_name(f"{step}.unreadable-{int(time.time())}")
        if jax.process_count() > 1:
            # Every process found the damage; one moves it, all reload after the move.
            from jax.experimental import multihost_utils

            aside = damaged.with_name(f"{step}.unreadable-" + str(int(
                multihost_utils.broadcast_one_to_all(np.int64(time.time())))))
            if jax.process_index() == 0:
                damaged.rename(aside)
            multihost_utils.sync_global_devices(f"dvar set aside checkpoint {step}")
        else:
            damaged.rename(aside)
        self._manager.reload()
        log.warning("checkpoint %s is unreadable (%s: %s); moved to %s",
                    damaged, type(error).__name__, str(error)[:300], aside)
        print(f"warning: skipping unreadable checkpoint {damaged} "
              f"({type(error).__name__}); moved it to {aside.name}", flush=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_saved_arrays(state_dir: Path) -> dict[str, np.ndarray]:
    """`path -> array` of a saved state item (`<workdir>/checkpoints/<step>/state`) as host
    numpy arrays, named as `array_signatures` names them: readable whatever mesh or device
    count saved it (for checks and tools; a run restores with `restore_latest`)."""
    directory = _epath(state_dir)
    tree = ocp.PyTreeCheckpointHandler().metadata(directory).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(directory,
                                        args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {path: np.asarray(leaf) for path, leaf in named_leaves(restored)}


def named_leaves(tree) -> list[tuple[str, Any]]:
    """(path, leaf) of every leaf, paths as `array_signatures` names them."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(_key_name(k) for k in path)
        out.append((name.removesuffix("/value"), leaf))  # nnx.Variable's payload: no name
    return out


def abstract_like(state) -> Any:
    """Shapes, dtypes and shardings of `state`, for restoring onto the same placement."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def restore_params(state_dir: Path, abstract_params: Any, device: jax.Device,
                   path: tuple[str, ...] = ("params",)) -> Any:
    """One parameter-shaped subtree of a saved train state (`<step>/state`), onto `device`:
    what evaluation and sampling need, without building or reading the rest of the state.

    abstract_params: the parameters' tree of ShapeDtypeStruct (`step.abstract_params`).
    path: where the subtree sits in the saved state (`step.evaluated_params_path`): the
    parameters, or their moving average in the optimizer state; dict keys all the way down.
    """
    sharding = jax.sharding.SingleDeviceSharding(device)
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        abstract_params)
    for key in reversed(path):
        item = {key: item}
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), item)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            _epath(state_dir),
            args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True))
    for key in path:
        restored = restored[key]
    return restored
