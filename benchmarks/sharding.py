"""Sharding on simulated CPU devices: step time and per-device memory of the train step on each
mesh, next to the single-device run, in one table.

The meshes are (data, fsdp, tensor) = (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2) on 8 simulated
CPU devices, and (1, 1, 1) on one of them. Each runs `dvar_jax.step.make_train_step` with the
state from `create_train_state` and the rule table of `configs/base.py`, exactly as `dvar train`
places them. For each mesh the script reports:

* step time: median over repeats of (repeat time / steps), compile excluded (reported apart);
* tokens/s: batch x seq / step time;
* params, opt state: bytes of the parameters and of the optimizer state held by the mesh's
  first device, summed over the actual arrays' `addressable_shards`;
* XLA argument / output / temp: the compiled step's `memory_analysis()`, which on a
  partitioned program is per device.

The simulated devices share this machine's cores: step times show the cost of partitioning
(collectives, resharding, smaller kernels), not a speed-up.

Run from the repository root, as its own process (the device count is fixed when JAX starts):

    python benchmarks/sharding.py            # cpu-s, vocab 4096 (4224 rows), batch 32, seq 128
    python benchmarks/sharding.py --quick    # smoke run, 20-30 s (mostly compiling)
    python benchmarks/sharding.py --size cpu-m --objective diffusion --json /tmp/sharding.json
"""

import os

DEVICE_COUNT = 8
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _request_simulated_devices(count: int) -> None:
    """Asks XLA for `count` host devices. It must happen before JAX starts its CPU backend,
    hence before `import jax`; a device-count flag the user already set is left alone (and
    `main` reports it if it gives too few devices)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()


_request_simulated_devices(DEVICE_COUNT)

# The imports below must follow the XLA_FLAGS update above (E402 is deliberate).
import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dvar_jax.configs.base import get_config  # noqa: E402
from dvar_jax.configs.models import model_shape  # noqa: E402
from dvar_jax.model.transformer import TransformerConfig, padded_vocab_size  # noqa: E402
from dvar_jax.objectives import get_objective  # noqa: E402
from dvar_jax.sharding import (  # noqa: E402
    activation_sharding,
    global_batch,
    make_mesh,
    rules_from_config,
)
from dvar_jax.step import create_train_state, make_optimizer, make_train_step  # noqa: E402

MeshShape = tuple[int, int, int]  # (data, fsdp, tensor)
# The single-device baseline first, then the four meshes of 8 devices.
MESHES: tuple[MeshShape, ...] = ((1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))
# Length of the learning-rate schedule the optimizer is built for: warmup is one step, so every
# timed step applies a real (non-zero learning rate) update.
SCHEDULE_STEPS = 100
# Every mesh starts from the same parameters and batch, so its first loss must equal the single
# device's up to float32 reduction order; timings are only comparable if that holds.
LOSS_RTOL = 1e-5
MIB = 2**20

DEFAULTS = {"size": "cpu-s", "vocab": 4096, "batch": 32, "seq": 128, "warmup": 1, "steps": 5,
            "repeats": 5}
QUICK = {"size": "32,1,2,16", "vocab": 256, "batch": 8, "seq": 32, "warmup": 1, "steps": 2,
         "repeats": 2}


def bytes_on(tree: Any, device: jax.Device) -> int:
    """Bytes of `tree`'s arrays that live on `device`: its shard of each sharded leaf, the whole
    of each replicated one."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


def xla_memory(compiled: Any) -> dict[str, int | None]:
    """Per-device bytes from the compiled step's memory analysis; None where this backend or
    jax version does not report a field (or reports no analysis at all)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        stats = None
    fields = ("argument", "output", "alias", "temp", "generated_code")
    return {f: getattr(stats, f"{f}_size_in_bytes", None) for f in fields}


class MeshRun(NamedTuple):
    """One mesh's compiled step and live state. `run(n)` runs n steps, blocks, returns seconds."""

    shape: MeshShape
    devices: int
    compile_s: float
    first_loss: float
    memory: dict[str, int | None]  # params, opt_state (arrays on device 0) + XLA's analysis
    run: Callable[[int], float]


def prepare(shape: MeshShape, devices: list[jax.Device], args: argparse.Namespace,
            tokens: np.ndarray) -> MeshRun:
    """Places a fresh train state on the mesh, compiles the step, and takes one step."""
    d_model, n_layers, n_heads, head_dim = model_shape(args.size)
    objective = get_objective(args.objective)
    model_cfg = TransformerConfig(
        vocab_size=padded_vocab_size(args.vocab), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, head_dim=head_dim, causal=objective.causal, dtype="float32")
    cfg = get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
    mesh = make_mesh(cfg.mesh, devices[:math.prod(shape)])
    rules = rules_from_config(cfg.mesh.rules)
    tx = make_optimizer(cfg.train, SCHEDULE_STEPS)
    # Activation constraints apply while the step is traced, i.e. during `lower` below.
    with activation_sharding(mesh, rules):
        graphdef, state, placement = create_train_state(model_cfg, tx, args.seed, mesh, rules)
        step = make_train_step(graphdef, objective, tx, args.vocab, args.seed, placement)
        batch = global_batch(tokens, placement.batch)
        # Count before the first step: the step donates its input state.
        first = mesh.devices.flat[0]
        memory: dict[str, int | None] = {"params": bytes_on(state.params, first),
                                         "opt_state": bytes_on(state.opt_state, first)}
        start = time.perf_counter()
        # Compiled ahead of time so that the same executable gives the memory analysis and
        # runs the timed steps (no second compile hiding in the first call).
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
    memory |= {f"xla_{k}": v for k, v in xla_memory(compiled).items()}

    box = {"state": state}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            box["state"], _ = compiled(box["state"], batch)
        jax.block_until_ready(box["state"])
        return time.perf_counter() - start

    box["state"], metrics = compiled(box["state"], batch)
    return MeshRun(shape, mesh.devices.size, compile_s, float(metrics["loss"]), memory, run)


def bench(args: argparse.Namespace, devices: list[jax.Device]) -> list[dict[str, Any]]:
    """All meshes, timed interleaved; returns one row per mesh, MESHES' order."""
    tokens = np.random.RandomState(args.seed + 1).randint(
        0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
    runs = []
    for shape in MESHES:
        runs.append(prepare(shape, devices, args, tokens))
        print(f"  compiled {'x'.join(map(str, shape))} in {runs[-1].compile_s:.1f} s",
              file=sys.stderr, flush=True)
    reference = runs[0].first_loss
    for r in runs:
        if abs(r.first_loss - reference) > LOSS_RTOL * max(1.0, abs(reference)):
            raise AssertionError(f"mesh {r.shape}: first loss {r.first_loss:.7f} differs from "
                                 f"the single device's {reference:.7f}")
    for r in runs:
        r.run(args.warmup)
    # Interleaved (mesh 1, 2, ..., 1, 2, ...) so that background load hits every mesh alike.
    times: dict[MeshShape, list[float]] = {r.shape: [] for r in runs}
    for _ in range(args.repeats):
        for r in runs:
            times[r.shape].append(r.run(args.steps) / args.steps)
    rows = []
    for r in runs:
        step_s = statistics.median(times[r.shape])
        rows.append({"mesh": list(r.shape), "devices": r.devices, "compile_s": r.compile_s,
                     "step_s": step_s, "step_s_repeats": times[r.shape],
                     "tokens_per_s": args.batch * args.seq / step_s, "first_loss": r.first_loss,
                     "bytes_per_device": r.memory})
    return rows


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("mesh (d,f,t)", "devices", "compile s", "step ms", "tokens/s", "params MiB",
              "opt state MiB", "XLA argument MiB", "XLA output MiB", "XLA temp MiB")
    cells = [header]
    for r in rows:
        m = r["bytes_per_device"]
        cells.append(("x".join(map(str, r["mesh"])), str(r["devices"]), f"{r['compile_s']:.1f}",
                      f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                      _mib(m["params"]), _mib(m["opt_state"]), _mib(m["xla_argument"]),
                      _mib(m["xla_output"]), _mib(m["xla_temp"])))
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", help="model size: a name from configs/models.py or d_model,"
                                  f"n_layers,n_heads,head_dim (default {DEFAULTS['size']})")
    p.add_argument("--objective", choices=("ar", "diffusion"), default="ar",
                   help="objective of the train step (default ar)")
    p.add_argument("--batch", type=int,
                   help=f"sequences per step; must divide by {DEVICE_COUNT} (default 32)")
    p.add_argument("--seq", type=int, help="sequence length (default 128)")
    p.add_argument("--vocab", type=int,
                   help="tokenizer vocabulary; the embedding has it + MASK rounded up to 128 "
                        "rows (default 4096 -> 4224)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps per mesh after the compiling one (default 1)")
    p.add_argument("--steps", type=int, help="steps per timed repeat (default 5)")
    p.add_argument("--repeats", type=int, help="timed repeats per mesh (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every row (exact bytes, all repeat "
                                             "times) here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 1-layer d=32 model, batch 8, seq 32, vocab 256, "
                        "2 repeats of 2 steps")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        model_shape(args.size)
    except ValueError as e:
        p.error(str(e))
    for key in ("batch", "seq", "vocab", "steps", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    # The batch is split over data x fsdp, which is up to 8 ways here.
    batch_shards = max(data * fsdp for data, fsdp, _ in MESHES)
    if args.batch % batch_shards:
        p.error(f"--batch {args.batch} must divide by {batch_shards} (the largest data x fsdp)")
    return args


def cpu_devices() -> list[jax.Device]:
    """The simulated CPU devices; a clear error if JAX started with too few of them."""
    devices = jax.devices("cpu")
    if len(devices) < DEVICE_COUNT:
        raise SystemExit(
            f"benchmarks/sharding.py needs {DEVICE_COUNT} simulated CPU devices but JAX has "
            f"{len(devices)}. Either JAX's CPU backend started before this script set XLA_FLAGS "
            f"(jax imported and used first in this process: run the script as its own process), "
            f"or XLA_FLAGS already sets {_DEVICE_FLAG} lower (XLA_FLAGS="
            f"{os.environ.get('XLA_FLAGS', '')!r}).")
    return devices


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the table, returns its rows."""
    args = parse_args(argv)
    start = time.perf_counter()
    devices = cpu_devices()
    d_model, n_layers, n_heads, head_dim = model_shape(args.size)
    print(f"jax {jax.__version__}, {len(devices)} simulated CPU devices "
          f"({_DEVICE_FLAG}), host cpus {os.cpu_count()}")
    print(f"NOTE: the simulated devices share the same {os.cpu_count()} cores, so step times "
          "show partitioning overhead (collectives, resharding, smaller kernels), not speed-up")
    print(f"model {args.size} (d_model {d_model}, {n_layers} layers, {n_heads} heads x "
          f"{head_dim}), vocab {args.vocab} -> {padded_vocab_size(args.vocab)} rows, float32, "
          f"dropout 0; objective {args.objective}; batch {args.batch} x seq {args.seq} = "
          f"{args.batch * args.seq} tokens/step; rules from configs/base.py")
    print(f"timing: compile + {args.warmup} warm-up steps excluded; median of {args.repeats} "
          f"repeats of {args.steps} steps, meshes interleaved", flush=True)

    rows = bench(args, devices)
    print()
    print(format_table(rows))
    print("params, opt state: bytes held by the mesh's first device (its shard of each sharded "
          "array, all of each replicated one).")
    print("XLA argument / output / temp: the compiled step's memory_analysis(), per device; the "
          "state is donated, so the output aliases most of the argument.")
    worst = max(abs(r["first_loss"] - rows[0]["first_loss"]) for r in rows)
    print(f"checked: every mesh's first loss equals the single device's (rtol {LOSS_RTOL:g}); "
          f"largest difference {worst:.2e}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.json:
        meta = {"jax": jax.__version__, "devices": len(devices), "host_cpus": os.cpu_count(),
                "model": {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                          "head_dim": head_dim, "vocab_rows": padded_vocab_size(args.vocab)},
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
