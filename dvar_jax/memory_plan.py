"""`dvar plan-memory`: compile the real train step for a TPU slice on a machine without one.

With libtpu installed (extra `tpu`), `jax.experimental.topologies` describes a named TPU
topology's devices; the train step of a config is lowered with abstract, sharded inputs and
compiled ahead of time for them. The compiled program tells the bytes each device holds and the
FLOPs and bytes it moves; a roofline over the chip's published peak turns that into a step-time
and MFU estimate, before anyone rents the slice.

A configuration that does not fit is a result, not a crash: XLA's compile-time out-of-memory
error carries the bytes the program needs, and the plan reports them with what would make it
fit (`fit_suggestions`). XLA's cost analysis does not see inside the TPU kernels (Pallas, splash):
our own kernels declare their FLOPs and bytes to XLA (`pl.CostEstimate`), and splash, which is
JAX's, is counted here (`splash_flops`), so the roofline covers every matmul of the step.
Nor does it multiply a loop's body by its trip count: with scanned layers or microbatches the
cost comes from a second compile of one microbatch with the layers unrolled (`_loop_free_cost`).
"""

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from dvar_jax import native_stderr_silenced
from dvar_jax.config import transformer_config, validate_config
from dvar_jax.kernels.common import lowering_for
from dvar_jax.objectives import objective_from_config
from dvar_jax.scaling.flops import matmul_flops_per_token
from dvar_jax.sharding import activation_sharding, make_mesh, rules_from_config
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

        # Loading libtpu on a machine without a TPU prints its initialisation errors ("Failed
        # to find host bounds ...") from C++; they say nothing about the compile asked for.
        with native_stderr_silenced():
            return list(topologies.get_topology_desc(platform="tpu",
                                                     topology_name=topology).devices)
    except (RuntimeError, ValueError) as e:  # no libtpu, or a name libtpu does not know
        raise ValueError(
            f"--topology={topology!r}: could not describe this TPU topology ({e}). It needs the "
            "`tpu` extra (pip install -e '.[tpu]', x86-64 Linux) and a name such as v5p:2x2x1, "
            "v5litepod-8's v5e:2x4 or v4:2x2x1") from e


# "... HLO temporaries (229.90G) exceeds available HBM (95.73G)": XLA's compile-time HBM OOM.
_HBM_OOM = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_hbm_oom(message: str) -> tuple[float, float] | None:
    """(bytes needed, bytes available) from XLA's compile-time HBM out-of-memory message, or
    None when the message is not one."""
    match = _HBM_OOM.search(message)
    if match is None:
        return None
    needed, needed_unit, available, available_unit = match.groups()
    return float(needed) * _UNITS[needed_unit], float(available) * _UNITS[available_unit]


def splash_flops(model_cfg, batch: int, seq: int) -> float:
    """FLOPs of the splash attention calls of one train step, all devices (XLA counts none).

    Per layer and head, the forward kernel does QK^T and PV (2 matmuls of 2 seq^2 head_dim
    FLOPs) over the blocks the mask keeps; the backward's dkv kernel recomputes QK^T and does
    dO V^T, P^T dO and dS^T Q (4), its dq kernel QK^T, dO V^T and dS K (3). With remat the
    forward kernel runs again in the backward pass (a kernel's output is not a dot, so no policy
    saves it). Causal masks keep n (n + 1) / 2 of the n^2 blocks (n = seq / block).
    """
    from dvar_jax.kernels.splash import splash_block

    n = seq // splash_block(seq)
    kept = (n * (n + 1) / 2) / n**2 if model_cfg.causal else 1.0
    per_matmul = 2.0 * batch * model_cfg.n_heads * seq * seq * model_cfg.head_dim * kept
    forwards = 2 if model_cfg.remat != "none" else 1
    return model_cfg.n_layers * per_matmul * (2 * forwards + 7)


def _per_device_bytes(tree) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def plan_memory(cfg: ConfigDict, devices: list) -> dict:
    """Compiles cfg's train step for `devices` (abstract TPU devices) and measures it.

    Returns per-device bytes of parameters and optimizer state (from the shardings), the
    compiled program's argument/output/temporary bytes, its FLOPs and bytes accessed per device
    (splash attention added, see `splash_flops`), the compile time here, and a roofline step
    time and MFU from the chip's published peak. When XLA finds that the program does not fit
    the chip's memory, `fits` is False and `needed_bytes` / `hbm_bytes` say by how much (no
    cost figures then); `suggestions` lists what would make it fit.
    """
    validate_config(cfg)
    lower, abstract, model_cfg, mesh = _abstract_step(cfg, devices)
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    n = len(devices)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    plan = {
        "topology_devices": n, "device_kind": kind, "mesh": dict(mesh.shape),
        "model": {k: getattr(model_cfg, k) for k in ("attention_impl", "loss_impl", "dtype",
                                                       "remat", "scan_layers")},
        "microbatches": cfg.train.microbatches,
        "param_bytes": _per_device_bytes(abstract.params),
        "opt_state_bytes": _per_device_bytes(abstract.opt_state),
        "model_flops_per_step": matmul_flops_per_token(model_cfg, cfg.data.seq_len) * tokens,
        "tokens_per_step": tokens,
    }
    if chip is not None:
        plan |= {"chip": chip.name, "hbm_bytes": chip.hbm_bytes}
    started = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        plan |= {"fits": False, "compile_s": time.perf_counter() - started,
                 "needed_bytes": oom[0] + plan["param_bytes"] + plan["opt_state_bytes"],
                 "temp_bytes": oom[0], "hbm_bytes": oom[1]}
        plan["suggestions"] = fit_suggestions(plan, cfg)
        return plan
    plan["compile_s"] = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = _cost(compiled)
    if model_cfg.scan_layers or cfg.train.microbatches > 1:
        cost = _loop_free_cost(cfg, devices)
    kernel_flops = 0.0
    if model_cfg.attention_impl == "splash":
        kernel_flops = splash_flops(model_cfg, cfg.train.batch_size, cfg.data.seq_len) / n
    flops = float(cost.get("flops", float("nan"))) + kernel_flops
    bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    plan |= {
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "generated_code_bytes": memory.generated_code_size_in_bytes,
        "flops_per_device": flops, "splash_flops_per_device": kernel_flops,
        "bytes_accessed_per_device": bytes_accessed,
    }
    # Arguments are donated (the state) and reused for outputs, so the peak is about
    # arguments + temporaries, not arguments + outputs + temporaries.
    plan["peak_bytes_estimate"] = plan["argument_bytes"] + plan["temp_bytes"]
    plan["needed_bytes"] = plan["peak_bytes_estimate"]
    if chip is not None:
        step_time = max(flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
        plan |= {"fits": plan["peak_bytes_estimate"] <= chip.hbm_bytes,
                 "roofline_step_s": step_time,
                 "roofline_mfu": plan["model_flops_per_step"] / (n * chip.peak_flops * step_time),
                 "bound": "compute" if flops / chip.peak_flops >= bytes_accessed
                 / chip.hbm_bandwidth else "memory"}
        if not plan["fits"]:
            plan["suggestions"] = fit_suggestions(plan, cfg)
    return plan


def _abstract_step(cfg: ConfigDict, devices: list):
    """(lower, abstract sharded state, model config, mesh) of cfg's train step on `devices`,
    with nothing allocated. lower() traces and lowers the step as `dvar train` would on those
    devices: activations constrained by the rules, kernels lowered for their platform."""
    mesh = make_mesh(cfg.mesh, devices)
    rules = rules_from_config(cfg.mesh.rules)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, cfg.data.vocab_size, objective,
                                   platform=devices[0].platform)
    tx = make_optimizer(cfg.train, num_steps=1000)
    graphdef, init, placement = plan_train_state(model_cfg, tx, cfg.seed, mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(init), placement.state)
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len + 1), jnp.int32,
                                 sharding=placement.batch)
    step = make_train_step(graphdef, objective, tx, cfg.data.vocab_size, cfg.seed, placement,
                           microbatches=cfg.train.microbatches)

    def lower():
        with activation_sharding(mesh, rules), lowering_for(devices[0].platform):
            return step.lower(abstract, batch)

    return lower, abstract, model_cfg, mesh


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, list | tuple) else cost


def _loop_free_cost(cfg: ConfigDict, devices: list) -> dict:
    """FLOPs and bytes accessed per device of cfg's whole step, from a program without loops.

    XLA's cost analysis counts a while loop's body once, so a scanned or accumulated step is
    compiled again with its layers unrolled for one microbatch (batch / m rows, which fits
    where the real step does), and the cost is m times that. The optimizer update is then
    counted m times instead of once: a few reads and writes of the per-device state each,
    small next to the activations (an overestimate of bytes, never an underestimate).
    """
    one = cfg.copy_and_resolve_references()
    m = cfg.train.microbatches
    one.model.scan_layers = False
    one.train.microbatches = 1
    one.train.batch_size = cfg.train.batch_size // m
    lower, _, _, _ = _abstract_step(one, devices)
    cost = _cost(lower().compile())
    return {k: m * float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed")}


def fit_suggestions(plan: dict, cfg: ConfigDict) -> list[str]:
    """What would make a plan that does not fit fit, most direct first: each a flag to try.

    Estimates, not promises (run plan-memory again with it): activations shrink about in
    proportion to the microbatch rows, fsdp divides the parameters and optimizer state by the
    chips, remat keeps less of each block, and more chips divide both.
    """
    hbm, needed, n = plan["hbm_bytes"], plan["needed_bytes"], plan["topology_devices"]
    state = plan["param_bytes"] + plan["opt_state_bytes"]
    over = needed / hbm
    out = []
    mesh = plan["mesh"]
    if mesh["fsdp"] * mesh["tensor"] < n and state > 0.1 * hbm:
        out.append(f"fsdp: shard parameters and optimizer state over all {n} chips "
                   f"(--mesh=1,{n},1): {state / 2**30:,.1f} GiB of state per chip now")
    if cfg.model.remat != "full":
        out.append("remat: --config.model.remat=full keeps only each block's input for the "
                   "backward pass" + (" (or dots, which keeps the projections)"
                                      if cfg.model.remat == "none" else ""))
    rows = cfg.train.batch_size // cfg.train.microbatches
    shards = mesh["data"] * mesh["fsdp"]
    for m in range(cfg.train.microbatches + 1, cfg.train.batch_size + 1):
        if cfg.train.batch_size % m or (cfg.train.batch_size // m) % shards:
            continue
        if (needed - state) * cfg.train.microbatches / m + state <= 0.9 * hbm:
            out.append(f"microbatches: --config.train.microbatches={m} ({cfg.train.batch_size // m}"
                       f" rows a slice instead of {rows})")
            break
    chips = n * 2 ** max(1, math.ceil(math.log2(over)))
    out.append(f"more chips: about {chips} (this plan needs {over:.1f}x one chip's memory); a "
               f"slice of that size with --mesh=1,{chips},1")
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:,.3f} GiB"


def format_plan(plan: dict, cfg: ConfigDict, topology: str) -> str:
    """The plan as the lines `dvar plan-memory` prints."""
    m = plan["model"]
    lines = [
        f"{cfg.objective} {cfg.model.name} on {topology} ({plan['topology_devices']} x "
        f"{plan['device_kind']}), mesh {plan['mesh']}, batch {cfg.train.batch_size} x "
        f"{cfg.data.seq_len} in {plan['microbatches']} microbatch(es), vocab "
        f"{cfg.data.vocab_size}",
        f"model: compute {m['dtype']}, attention {m['attention_impl']}, loss {m['loss_impl']}, "
        f"remat {m['remat']}, scan_layers {m['scan_layers']} (compiled in {plan['compile_s']:.1f}"
        " s here)",
        "per device:",
        f"  parameters           {_gib(plan['param_bytes'])}",
        f"  optimizer state      {_gib(plan['opt_state_bytes'])}",
    ]
    if "peak_bytes_estimate" not in plan:  # XLA stopped at its out-of-memory check
        lines += [
            f"  temporaries          {_gib(plan['temp_bytes'])} (XLA's out-of-memory check)",
            f"does not fit: needs about {_gib(plan['needed_bytes'])} per chip, "
            f"{_gib(plan['hbm_bytes'])} available",
        ]
    else:
        lines += [
            f"  arguments (compiled) {_gib(plan['argument_bytes'])}",
            f"  outputs (compiled)   {_gib(plan['output_bytes'])}",
            f"  temporaries          {_gib(plan['temp_bytes'])}",
            f"  peak estimate        {_gib(plan['peak_bytes_estimate'])} (arguments + "
            "temporaries; the state is donated)",
            f"compiled cost per device: {plan['flops_per_device']:.3e} FLOPs"
            + (f" (splash attention's {plan['splash_flops_per_device']:.3e} added)"
               if plan["splash_flops_per_device"] else "")
            + f", {plan['bytes_accessed_per_device']:.3e} bytes accessed",
            f"model FLOPs per step (all devices): {plan['model_flops_per_step']:.3e}",
        ]
        if "chip" in plan:
            fits = ("fits" if plan["fits"] else
                    f"does not fit: needs {_gib(plan['needed_bytes'])} per chip, "
                    f"{_gib(plan['hbm_bytes'])} available")
            lines += [
                f"{plan['chip']} HBM {_gib(plan['hbm_bytes'])}: {fits}",
                f"roofline step time {plan['roofline_step_s'] * 1e3:,.1f} ms ({plan['bound']}"
                f"-bound), {plan['tokens_per_step'] / plan['roofline_step_s']:,.0f} tokens/s, "
                f"MFU estimate {plan['roofline_mfu']:.2f}",
            ]
        else:
            lines.append(f"no published peak for {plan['device_kind']!r}: no roofline estimate")
    if plan.get("suggestions"):
        lines.append("to make it fit, try:")
        lines += [f"  - {s}" for s in plan["suggestions"]]
    return "\n".join(lines)
