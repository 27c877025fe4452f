"""Sharding by logical axes: a device mesh from config, one rule table, and the helpers that
place parameters, optimizer state, batches and activations on it.

Parameters carry logical axis names (`vocab`, `embed`, `qkv`, `heads`, `mlp`, `norm`; see
`dvar_jax/model/transformer.py`); activations are constrained with `batch`, `seq`,
`activation_embed`. The rule table (`mesh.rules` in the config) maps each logical name to mesh
axes (`data`, `fsdp`, `tensor`) or to None (replicated). The same code runs on 1 CPU, on 8
simulated CPU devices (tests) and on a multi-host TPU slice.
"""

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DISTRIBUTED_MODES = ("auto", "on", "off")
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# The mesh and rules activations are constrained to while a step is traced (None: no constraint).
_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "dvar_sharding", default=None)


def _described(sizes: Sequence[int]) -> str:
    return ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))


def mesh_size_problems(mesh_cfg) -> list[str]:
    """What is wrong with mesh.data/fsdp/tensor before the devices are known, one message per
    problem (empty: none): each must be >= 1 or -1 (fill), and at most one may be -1."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    problems = [f"mesh.{a}={s}: must be >= 1 or -1 (fill)"
                for a, s in zip(MESH_AXES, sizes, strict=True) if not (s == -1 or s >= 1)]
    if sizes.count(-1) > 1:
        problems.append(f"{_described(sizes)}: at most one may be -1 (fill)")
    return problems


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from config; one of them may be -1 = the remaining devices."""
    problems = mesh_size_problems(mesh_cfg)
    if problems:
        raise ValueError("; ".join(problems))
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    described = _described(sizes)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ValueError(f"{described}: the {device_count} devices do not divide by {known}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"{described}: the product {math.prod(sizes)} does not match the "
                         f"{device_count} devices (use -1 on one axis to fill)")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The rule table as hashable tuples, checked: mesh axes must exist, names appear once."""
    table, seen = [], set()
    for name, axes in rules:
        if name in seen:
            raise ValueError(f"mesh.rules: logical axis {name!r} has more than one rule")
        seen.add(name)
        axes = tuple(axes) if isinstance(axes, list | tuple) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules: {name!r} -> {axis!r}; mesh axes are {MESH_AXES}")
        table.append((name, axes))
    return tuple(table)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """PartitionSpec over mesh axes for one array's logical axis names."""
    table = dict(rules)
    missing = [n for n in names if n is not None and n not in table]
    if missing:
        raise ValueError(f"logical axes {missing} have no rule in mesh.rules "
                         f"(known: {sorted(table)})")
    return PartitionSpec(*(None if n is None else table[n] for n in names))


def param_specs(params: nnx.State, rules: LogicalRules) -> nnx.State:
    """Mesh PartitionSpec of every parameter, from its logical names and the rules."""
    table = dict(rules)
    for path, spec in _flat(nnx.get_partition_spec(params)):
        missing = [n for n in spec if n is not None and n not in table]
        if missing:
            raise ValueError(f"parameter {path}: logical axes {missing} have no rule in "
                             f"mesh.rules (known: {sorted(table)})")
    with nnx.logical_axis_rules(list(rules)):
        return nnx.get_partition_spec(params)


def _flat(tree) -> Iterator[tuple[str, PartitionSpec]]:
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, PartitionSpec | nnx.Variable))
    for path, leaf in leaves:
        spec = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        yield jax.tree_util.keystr(path), spec


def spec_table(params: nnx.State, rules: LogicalRules) -> dict[str, list]:
    """{parameter path: mesh axes per dimension}: a readable, JSON-able view (golden files)."""
    return {path: [list(a) if isinstance(a, tuple) else a for a in spec]
            for path, spec in _flat(param_specs(params, rules))}


def train_state_shardings(abstract_state, tx: optax.GradientTransformation, mesh: Mesh,
                          rules: LogicalRules):
    """NamedShardings for a TrainState: parameters by their rules, each optimizer moment like
    its parameter, everything else (step, counters) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                          param_specs(abstract_state.params, rules))
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state.opt_state, params,
        transform_non_params=lambda _: replicated)
    return type(abstract_state)(replicated, params, opt_state)


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of a token batch [batch, seq + 1]: rows over the batch axes."""
    return NamedSharding(mesh, logical_to_spec(("batch", None), rules))


def global_batch(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """The global batch array from this process's rows (all processes call it together)."""
    rows = local_rows.shape[0] * jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local_rows,
                                                  (rows, *local_rows.shape[1:]))


def replicated_rows(rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from data every process holds whole (e.g. validation windows)."""
    return jax.make_array_from_callback(rows.shape, sharding, lambda index: rows[index])


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Within this context, `constrain` pins activations to the mesh while steps are traced."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names at a block boundary; a no-op outside a mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def per_shard(fn, args: Sequence[jax.Array], names, out_names: Sequence[str | None] | None = None
              ) -> jax.Array:
    """fn(*args) on each device's shard, for kernels XLA cannot partition; a plain call outside
    a mesh.

    names: the logical names of every arg's axes, either one tuple shared by all args (then also
    the output's, unless `out_names` is given) or a list with one tuple per arg. An axis named
    None is whole on every device: an arg replicated that way is all-gathered before the call,
    and its gradient is summed over the devices that used it.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    per_arg = names if isinstance(names, list) else [names] * len(args)
    if out_names is None:
        if isinstance(names, list):
            raise ValueError("per_shard: out_names is needed when names are given per arg")
        out_names = names
    in_specs = tuple(logical_to_spec(n, rules) for n in per_arg)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=logical_to_spec(out_names, rules), check_vma=False)(*args)


def distributed_problems(mode: str) -> list[str]:
    """What is wrong with the `distributed` setting (empty: nothing)."""
    if mode in DISTRIBUTED_MODES:
        return []
    return [f"distributed={mode!r}: allowed {', '.join(DISTRIBUTED_MODES)}"]


def maybe_initialize_distributed(mode: str) -> bool:
    """Calls jax.distributed.initialize() for a multi-host run; returns whether it did.

    mode "on": always; "off": never; "auto": when the environment names a coordinator or
    several TPU workers (what a TPU VM slice or a launcher sets).
    """
    problems = distributed_problems(mode)
    if problems:
        raise ValueError(problems[0])
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    multi = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or len(hosts) > 1
    if mode == "on" or (mode == "auto" and multi):
        jax.distributed.initialize()
        return True
    return False
