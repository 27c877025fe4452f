"""Downstream scoring speed: examples/s for AR and masked diffusion, and compile reuse across tasks.

For each objective's trained run this builds a `Scorer` (diffusion: the study's `mc` method,
--num-mc draws, default 32) and scores two tasks of made-up 4-choice examples with
`Scorer.loglikelihood_with_stderr`, the call `dvar eval` makes for multiple-choice tasks:

1. the first call on a task compiles (the first task) or should not (the second: every request
   is packed into the same [batch, seq_len] rows, so the compiled function is reused); its time,
   and the trace/compile count and seconds JAX reports for it (`jax.monitoring`), are printed;
2. then --repeats timed calls on the same requests (the median is reported): examples/s,
   requests/s, sequence forward passes/s, achieved GFLOP/s and MFU against the float32 matmul
   peak measured in the same process (`dvar_jax.perf.measure_matmul_peak`, before and after
   the timings, the higher kept).

A forward pass is one [seq_len] row through the model: AR needs one per request, diffusion
`mc` one per request per draw. FLOPs per forward token are `matmul_flops_per_token(cfg,
seq_len) / 3` (that function counts forward + backward = 3 x forward): 2 x the weights used in
matmuls (tied output projection included) + 4 * n_layers * seq_len * attention width. Rows
padding the last batch are computed, so they are counted.

With no --workdir it first trains a tiny AR and a tiny diffusion model (cpu-xs, seq 32; about
20-40 s on 2 shared cores). Run from the repository root:

    python benchmarks/eval_speed.py --workdir runs/demo       # the demo's ar/ and diffusion/
    python benchmarks/eval_speed.py --workdir RUN_A RUN_B     # two `dvar train` runs
    python benchmarks/eval_speed.py --quick                   # smoke run on the tiny models
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import jax

from dvar_jax.eval.downstream import requests
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.scoring import Scorer
from dvar_jax.model.transformer import count_params
from dvar_jax.perf import measure_matmul_peak
from dvar_jax.scaling.flops import matmul_flops_per_token


def _load_sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module: the scripts are not a package, and the tests load them
    by path, so sys.path cannot be relied on."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _load_sibling("eval_variance")  # made-up examples, the tiny model, finding runs

OBJECTIVES = ("ar", "diffusion")
TASK_ORDER = ("questions", "completions")  # the second shows the first one's compile reused
DEFAULTS = {"num_mc": 32, "examples": 32, "batch": 16, "repeats": 3}
# --quick: K = 8 is eval_variance.py --quick's largest K, so in one process (the tests) the two
# share the compiled scoring function.
QUICK = {"num_mc": 8, "examples": 8, "batch": 16, "repeats": 2}

# What JAX reports for one jit cache miss: tracing to a jaxpr, lowering, XLA compilation.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENTS = (TRACE_EVENT, "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
BACKEND_COMPILE_EVENT = COMPILE_EVENTS[-1]


class CompileWatch:
    """Counts traces and backend compiles, sums their seconds and names what was compiled,
    while in its `with` block."""

    def __init__(self) -> None:
        self.traces = self.compiles = 0
        self.seconds = 0.0
        self.names: list[str] = []

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.traces += event == TRACE_EVENT
            if event == BACKEND_COMPILE_EVENT:
                self.compiles += 1
                name = str(kwargs.get("fun_name", "?"))
                self.names.append(name.removeprefix("jit(").removesuffix(")"))

    def __enter__(self) -> CompileWatch:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


def timed(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds of one call; the Scorer returns Python floats, so the work has finished."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_objective(objective: str, workdir: Path,
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per task for one trained run: first-call time and compiles, warm throughput
    (the caller adds `mfu` once the peak is known)."""
    run = load_run(workdir, args.checkpoint)
    seq = run.cfg.data.seq_len
    num_mc = 1 if run.objective.exact else args.num_mc
    scorer = Scorer(run.model, run.objective, run.mask_id, seq, eod_id=run.tokenizer.eod_id,
                    batch_size=args.batch, num_mc=num_mc, seed=args.seed)
    forward_flops_per_token = matmul_flops_per_token(run.model.cfg, seq) / 3
    rows = []
    for task in TASK_ORDER:
        examples = _shared.made_up_examples(args.examples, task)
        reqs = requests(examples, run.tokenizer)
        with CompileWatch() as watch:
            first_s = timed(scorer.loglikelihood_with_stderr, reqs)
        warm = [timed(scorer.loglikelihood_with_stderr, reqs) for _ in range(args.repeats)]
        warm_s = statistics.median(warm)
        rows_computed = math.ceil(len(reqs) / args.batch) * args.batch  # padding included
        forwards = rows_computed * num_mc
        flops = forwards * seq * forward_flops_per_token
        rows.append({
            "objective": objective, "task": task, "model": _shared.model_label(run),
            "params": count_params(run.model), "seq_len": seq, "num_mc": num_mc,
            "examples": len(examples), "requests": len(reqs), "forward_passes": forwards,
            "forward_flops_per_token": forward_flops_per_token,
            "first_call_s": first_s, "warm_s": warm_s, "warm_all_s": warm,
            "first_call_overhead_s": first_s - warm_s,
            "traces": watch.traces, "compiles": watch.compiles, "compile_s": watch.seconds,
            "compiled": watch.names,
            "examples_per_s": len(examples) / warm_s, "requests_per_s": len(reqs) / warm_s,
            "forwards_per_s": forwards / warm_s, "gflops_per_s": flops / warm_s / 1e9,
        })
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, nargs="+",
                   help="`dvar demo` folder(s) or `dvar train` run(s), together holding an ar "
                        "and a diffusion run; default: train tiny ones first")
    p.add_argument("--checkpoint", default="best", help="best, latest or a step (default best)")
    p.add_argument("--tiny-dir", type=Path,
                   help="without --workdir: train (or reuse) the tiny models here and keep them "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                   help="objectives to time (default both)")
    p.add_argument("--num-mc", type=int, help="diffusion Monte-Carlo draws (default 32)")
    p.add_argument("--examples", type=int,
                   help="made-up 4-choice examples per task (default 32; --quick 8)")
    p.add_argument("--batch", type=int, help="rows per model call (default 16)")
    p.add_argument("--repeats", type=int, help="timed calls per task (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: K 8, 8 examples per task, 2 timed calls, a smaller peak "
                        "matmul")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("num_mc", "examples", "batch", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)}: allowed >= 1")
    return args


def print_tables(rows: list[dict[str, Any]]) -> None:
    fmt = _shared.format_table
    first = [r for r in rows if r["task"] == TASK_ORDER[0]]
    print(f"\nThroughput (task {TASK_ORDER[0]!r}, median of the timed calls after the first):")
    print(fmt(("objective", "params", "K", "examples", "requests", "examples/s", "requests/s",
               "fwd passes/s", "GFLOP/s", "MFU"),
              [(r["objective"], f"{r['params']:,}", str(r["num_mc"]), str(r["examples"]),
                str(r["requests"]), f"{r['examples_per_s']:,.1f}",
                f"{r['requests_per_s']:,.1f}", f"{r['forwards_per_s']:,.0f}",
                f"{r['gflops_per_s']:,.2f}", f"{r['mfu']:.1%}") for r in first]))
    print("\nCompile reuse: the first call on each task, with the same Scorer:")
    print(fmt(("objective", "task", "first call s", "warm call s", "first - warm s", "traces",
               "compiles", "compile s", "compiled"),
              [(r["objective"], r["task"], f"{r['first_call_s']:.3f}", f"{r['warm_s']:.3f}",
                f"{r['first_call_overhead_s']:+.3f}", str(r["traces"]), str(r["compiles"]),
                f"{r['compile_s']:.2f}", ", ".join(r["compiled"]) or "-") for r in rows],
              left=(0, 1, 8)))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the tables, returns their rows."""
    args = parse_args(argv)
    start = time.perf_counter()
    paths, cleanup = _shared.resolve_runs(args.workdir, args.tiny_dir, args.objectives)
    # 1024 in --quick: a second saved; the full 2048 is the fair denominator (perf.py).
    peak_n = 1024 if args.quick else None
    try:
        peak_before = measure_matmul_peak(n=peak_n)
        print(f"jax {jax.__version__}, backend {jax.default_backend()}, device "
              f"{jax.devices()[0].device_kind}, host cpus {os.cpu_count()}")
        print(f"{args.examples} made-up 4-choice examples per task, batch {args.batch}, "
              f"diffusion mc with K = {args.num_mc}, seed {args.seed}; "
              f"{args.repeats} timed calls per task")
        rows = []
        for objective in args.objectives:
            rows += bench_objective(objective, paths[objective], args)
            print(f"  done {objective}: {rows[-1]['model']} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
        # Measured again after the timings and the higher one kept: on a shared machine one
        # measurement can land in a busy moment and make the MFU look higher than it is.
        peak_after = measure_matmul_peak(n=peak_n)
    finally:
        cleanup()
    peak = max(peak_before, peak_after)
    for row in rows:
        row["mfu"] = row["gflops_per_s"] * 1e9 / peak
    print(f"float32 matmul peak (measure_matmul_peak, this process): {peak / 1e9:,.1f} GFLOP/s "
          f"(the higher of {peak_before / 1e9:,.1f} before and {peak_after / 1e9:,.1f} after "
          f"the timings)")
    print_tables(rows)
    print("\nfwd pass = one [seq_len] row through the model (AR: 1 per request, diffusion: K); "
          "FLOPs/token = matmul_flops_per_token / 3; MFU against the peak above. traces / "
          "compiles / compile s: what jax.monitoring reported during the first call.")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
