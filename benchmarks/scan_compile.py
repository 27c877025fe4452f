"""Compile time of the train step against depth, layers unrolled or scanned (`model.scan_layers`).

The train step of a narrow model (d_model 128, 4 heads, seq 128, batch 8) is lowered and
compiled on this machine's CPU for 2, 4, 8, 16 and 32 layers, unrolled then scanned at each
depth (interleaved, so both see the same load), and the seconds are printed as a table. A
scanned step compiles one block whatever the depth.

    python benchmarks/scan_compile.py
    python benchmarks/scan_compile.py --depths 2,8 --remat dots
"""

from __future__ import annotations

import argparse
import sys
import time


def compile_seconds(n_layers: int, scan: bool, remat: str) -> float:
    import jax

    from dvar_jax.config import transformer_config
    from dvar_jax.configs.base import get_config
    from dvar_jax.objectives import objective_from_config
    from dvar_jax.step import make_optimizer, make_train_step, plan_train_state

    cfg = get_config()
    cfg.model.name = "custom"
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 128, n_layers, 4
    cfg.model.scan_layers, cfg.model.remat = scan, remat
    cfg.data.seq_len, cfg.train.batch_size = 128, 8
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, 4096, objective)
    tx = make_optimizer(cfg.train, 100)
    graphdef, init, _ = plan_train_state(model_cfg, tx, cfg.seed)
    state = jax.eval_shape(init)
    batch = jax.ShapeDtypeStruct((8, 129), jax.numpy.int32)
    step = make_train_step(graphdef, objective, tx, 4096, cfg.seed)
    started = time.perf_counter()
    step.lower(state, batch).compile()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="2,4,8,16,32")
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    args = parser.parse_args(argv)
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        parser.error(f"--depths={args.depths!r}: comma-separated layer counts, e.g. 2,8,32")
    if not depths or min(depths) < 1:
        parser.error(f"--depths={args.depths!r}: every depth must be >= 1")
    print(f"train step compile time on this CPU (remat {args.remat}), seconds")
    print("| layers | unrolled | scanned |")
    print("|---|---|---|")
    for depth in depths:
        unrolled = compile_seconds(depth, False, args.remat)
        scanned = compile_seconds(depth, True, args.remat)
        print(f"| {depth} | {unrolled:.1f} | {scanned:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
