"""`dvar plan-memory`: compile the real train step for a TPU slice on a machine without one.

With libtpu installed (extra `tpu`), `jax.experimental.topologies` describes a named TPU
topology's devices; the train step of a config is lowered with abstract, sharded inputs and
compiled ahead of time for them. The compiled program tells the bytes each device holds and the
FLOPs and bytes it moves; a roofline over the chip's published peak turns that into a step-time
and MFU estimate, before anyone rents the slice.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dvar_jax.config import transformer_config, validate_config
from dvar_jax.objectives import objective_from_config
from dvar_jax.scaling.flops import matmul_flops_per_token
from dvar_jax.sharding import make_mesh, rules_from_config
from dvar_jax.step import make_optimizer, make_train_step, plan_train_state


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: dense bf16 FLOP/s, HBM bandwidth (bytes/s) and capacity."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: float


# Keyed by jax's device_kind for the topology's devices (Google Cloud TPU documentation).
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 1228e9, 32 * 2**30),
    "TPU v5 lite": Chip("v5e", 197e12, 819e9, 16 * 2**30),
    "TPU v5": Chip("v5p", 459e12, 2765e9, 95 * 2**30),
    "TPU v6 lite": Chip("v6e", 918e12, 1640e9, 32 * 2**30),
}


def tpu_devices(topology: str) -> list:
    """The abstract devices of a named TPU topology, e.g. "v5p:2x2x1" (needs libtpu)."""
    # libtpu takes a machine-wide lock file; any other JAX process (a test worker, a training
    # run) may hold it, and compiling for an abstract topology needs no exclusive chip access.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu",
                                                 topology_name=topology).devices)
    except (RuntimeError, ValueError) as e:  # no libtpu, or a name libtpu does not know
        raise ValueError(
            f"--topology={topology!r}: could not describe this TPU topology ({e}). It needs the "
            "`tpu` extra (pip install -e '.[tpu]', x86-64 Linux) and a name such as v5p:2x2x1, "
            "v5litepod-8's v5e:2x4 or v4:2x2x1") from e


def _per_device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan_memory(cfg: ConfigDict, devices: list) -> dict:
    """Compiles cfg's train step for `devices` (abstract TPU devices) and measures it.

    Returns per-device bytes of parameters and optimizer state (from the shardings), the
    compiled program's argument/output/temporary bytes, its FLOPs and bytes accessed per device,
    and a roofline step time and MFU from the chip's published peak.
    """
    validate_config(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_from_config(cfg.mesh.rules)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, cfg.data.vocab_size, objective)
    tx = make_optimizer(cfg.train, num_steps=1000)
    graphdef, init, placement = plan_train_state(model_cfg, tx, cfg.seed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init), placement.state)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=placement.batch)
    step = make_train_step(graphdef, objective, tx, cfg.data.vocab_size, cfg.seed, placement)
    compiled = step.lower(abstract, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost

    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    n = len(devices)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    flops = float(cost.get("flops", float("nan")))
    bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    plan = {
        "topology_devices": n, "device_kind": kind, "mesh": dict(mesh.shape),
        "param_bytes": _per_device_bytes(abstract.params),
        "opt_state_bytes": _per_device_bytes(abstract.opt_state),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "flops_per_device": flops, "bytes_accessed_per_device": bytes_accessed,
        "model_flops_per_step": matmul_flops_per_token(model_cfg, cfg.data.seq_len) * tokens,
        "tokens_per_step": tokens,
    }
    # Arguments are donated (the state) and reused for outputs, so the peak is about
    # arguments + temporaries, not arguments + outputs + temporaries.
    plan["peak_bytes_estimate"] = plan["argument_bytes"] + plan["temp_bytes"]
    if chip is not None:
        step_time = max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
        plan |= {"chip": chip.name, "hbm_bytes": chip.hbm_bytes,
                 "fits": plan["peak_bytes_estimate"] <= chip.hbm_bytes,
                 "roofline_step_s": step_time,
                 "roofline_mfu": plan["model_flops_per_step"] / (n * chip.peak_flops * step_time),
                 "bound": "compute" if flops / chip.peak_flops >= bytes_accessed
                 / chip.hbm_bandwidth else "memory"}
    return plan


def _gib(x: float) -> str:
    return f"{x / 2**30:,.3f} GiB"


def format_plan(plan: dict, cfg: ConfigDict, topology: str) -> str:
    lines = [
        f"{cfg.objective} {cfg.model.name} on {topology} ({plan['topology_devices']} x "
        f"{plan['device_kind']}), mesh {plan['mesh']}, batch {cfg.train.batch_size} x "
        f"{cfg.data.seq_len}, vocab {cfg.data.vocab_size}, compute {cfg.model.dtype}",
        "per device:",
        f"  parameters           {_gib(plan['param_bytes'])}",
        f"  optimizer state      {_gib(plan['opt_state_bytes'])}",
        f"  arguments (compiled) {_gib(plan['argument_bytes'])}",
        f"  outputs (compiled)   {_gib(plan['output_bytes'])}",
        f"  temporaries          {_gib(plan['temp_bytes'])}",
        f"  peak estimate        {_gib(plan['peak_bytes_estimate'])} (arguments + temporaries;"
        " the state is donated)",
        f"compiled cost per device: {plan['flops_per_device']:.3e} FLOPs, "
        f"{plan['bytes_accessed_per_device']:.3e} bytes accessed",
        f"model FLOPs per step (all devices): {plan['model_flops_per_step']:.3e}",
    ]
    if "chip" in plan:
        lines += [
            f"fits in {plan['chip']} HBM ({_gib(plan['hbm_bytes'])}): "
            f"{'yes' if plan['fits'] else 'NO'}",
            f"roofline step time {plan['roofline_step_s'] * 1e3:,.1f} ms ({plan['bound']}-bound), "
            f"{plan['tokens_per_step'] / plan['roofline_step_s']:,.0f} tokens/s, "
            f"MFU estimate {plan['roofline_mfu']:.2f}",
        ]
    else:
        lines.append(f"no published peak for {plan['device_kind']!r}: no roofline estimate")
    return "\n".join(lines)
