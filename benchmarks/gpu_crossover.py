"""The crossover grid (configs/crossover.py) on one GPU, several runs at a time, then the figure
and, optionally, the throughput benchmark: issue 17's measurement in one bounded command.

    python benchmarks/gpu_crossover.py --out /tmp/xo                       # whole grid
    python benchmarks/gpu_crossover.py --out /tmp/xo --deadline-s 380 --throughput-s 100
    python benchmarks/gpu_crossover.py --plot-only --out /tmp/xo --figure docs/crossover_gpu.png
    python benchmarks/gpu_crossover.py --collect --grid configs/grids/crossover_cpu.py \\
        --workroot runs/crossover-cpu --out /tmp/xo-cpu    # runs a `dvar sweep run` trained
    python benchmarks/gpu_crossover.py --collect --rescore 64 ...  # diffusion's best re-scored
    python benchmarks/gpu_crossover.py --plot-only --out /tmp/xo-all \\
        --results /tmp/xo/results.json,/tmp/xo-drop/results.json   # merge two sessions
    # smoke test on a CPU: tiny models, 2% of the epochs (about 4 minutes on 2 cores)
    python benchmarks/gpu_crossover.py --out /tmp/xo-cpu --tiny --epochs-scale 0.02 \\
        --parallel 2 --only='*U20k*' --deadline-s 300

Off a checkout with `pip install -e .` the embedded corpus downloads on first use; on a
machine without network, fill $DVAR_CACHE elsewhere first (one tiny `dvar train` with
--config.data.vocab_size=1024 --config.data.tokenizer_type=bpe) and copy it over.

What it does, in order, writing everything into --out as it goes (so a timeout still leaves data):

1. WORKROOT/env.txt and the log: nvidia-smi, python / jax versions, jax.devices(), a jitted
   matmul and the measured matmul peaks (float32 at JAX's default precision, and bfloat16).
   Fails fast.
2. The grid's runs as separate processes (`--parallel` at a time, each with a share of the GPU's
   memory), in the grid's order, each in WORKDIR/NAME through `dvar_jax.train.train`. Every 20 s
   and at the end: results.json / results.md (per run: config, best and final validation loss,
   FLOPs, wall time, throughput; per U: AR's best against diffusion's best) and runs.tar.gz
   (each run's config.json, metrics.jsonl, summary.json and log; no checkpoints). At
   --deadline-s after the start, runs still going get SIGTERM (they save and stop) and are
   reported as cut off, with the epochs they reached.
3. crossover.png: validation loss against training FLOPs (C = 6 N D), one panel per U,
   both objectives, AR's best as a line, C_crit(U) of the study's laws marked.
4. With --rescore K (after training, or with --collect): each finished diffusion run's kept
   best checkpoint (configs/crossover.py keeps one at every evaluation) is re-scored with
   `dvar eval --num_mc K --seed 1` (masks the training-time evaluation never drew), and that
   score, not the curve's minimum, is diffusion's best: the minimum of a noisy curve is biased
   low by the noise it was picked from (docs/diffusion_validation.md). AR's loss is exact.
5. With --throughput-s > 0: benchmarks/train_throughput.py (the XLA path) under that timeout,
   to throughput.txt / throughputI.json (one per ';'-separated --throughput-args set).
"""

import argparse
import importlib.util
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_GRID = ROOT / "configs" / "crossover.py"
H200_BF16_MEASURED = 790e12  # the device notes' 8192^3 bf16 matmul, FLOP/s
LABELLED_RUNS = 8  # per U in the figure; past it, all but the best are drawn faint, unlabelled
RESCORE_SEED = 1  # the training-time evaluation draws its masks from eval.seed = 0
START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The grid and one run.
# --------------------------------------------------------------------------------------------

def load_grid_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_xo_grid_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid_runs(args) -> list:
    if not Path(args.grid).is_file():
        raise SystemExit(f"--grid={args.grid!r} is not a file; give a .py file with get_grid()")
    runs = load_grid_module(Path(args.grid)).get_grid()
    if args.only:
        import fnmatch
        pats = [p for p in args.only.split(",") if p]
        runs = [(n, c) for n, c in runs if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    out = []
    for name, cfg in runs:
        cfg = cfg.copy_and_resolve_references()
        if args.tiny:  # CPU smoke test: a 2-layer d=32 model, a sliver of the epochs
            cfg.model.name = "custom"
            cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads = 32, 2, 1
            cfg.model.head_dim = 32
            cfg.data.validation_tokens = 2048
            cfg.eval.num_mc = 2
        if args.epochs_scale != 1.0:
            cfg.data.epochs = max(1.0, cfg.data.epochs * args.epochs_scale)
            cfg.eval.every_epochs = cfg.data.epochs / 10
        if args.dtype:
            cfg.model.dtype = args.dtype
        cfg.lock()
        out.append((name, cfg))
    return out


def run_one(args) -> int:
    """Child process: train one grid run into --workdir."""
    from dvar_jax.train import train

    cfg = dict(grid_runs(args))[args.one]
    summary = train(cfg, args.workdir, progress=False)
    print(json.dumps(summary._asdict()), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Reading results.
# --------------------------------------------------------------------------------------------

def run_facts(name: str, cfg, workdir: Path, proc_info: dict) -> dict:
    from dvar_jax.configs.models import model_shape
    from dvar_jax.scaling.flops import paper_param_count

    if cfg.model.name == "custom":
        d, layers = cfg.model.d_model, cfg.model.n_layers
    else:  # a named size (cpu-sm, 140M, ...)
        d, layers, _, _ = model_shape(cfg.model.name)
    windows = cfg.data.unique_tokens // cfg.data.seq_len
    steps = math.floor(cfg.data.epochs * windows / cfg.train.batch_size)
    n = paper_param_count(d, layers, cfg.data.vocab_size)
    row = {"name": name, "objective": cfg.objective, "d_model": d, "n_layers": layers,
           "params": n, "unique_tokens": cfg.data.unique_tokens, "epochs": cfg.data.epochs,
           "batch": cfg.train.batch_size, "peak_lr": cfg.train.peak_lr,
           "dropout": cfg.model.hidden_dropout, "weight_decay": cfg.train.weight_decay,
           "ema_decay": cfg.train.ema_decay, "noise_sampling": cfg.diffusion.noise_sampling,
           "dtype": cfg.model.dtype, "steps": steps,
           "planned_flops": 6.0 * n * steps * cfg.train.batch_size * cfg.data.seq_len,
           "state": proc_info.get("state", "pending"), "wall_s": proc_info.get("wall_s"),
           "returncode": proc_info.get("returncode")}
    metrics = workdir / "metrics.jsonl"
    evals, trains = [], []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            (evals if r.get("kind") == "eval" else trains).append(r)
    row["curve"] = [(r["epoch"], r["val_loss"], r["flops"]) for r in evals]
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        row |= {"best_val": best["val_loss"], "best_epoch": best["epoch"],
                "best_flops": best["flops"], "final_val": evals[-1]["val_loss"],
                "final_epoch": evals[-1]["epoch"], "flops": evals[-1]["flops"]}
    rescored = rescore_record(workdir, cfg)
    if rescored and "best_val" in row:
        row |= {"rescored_val": rescored["val_loss"], "rescored_se": rescored["val_loss_stderr"],
                "rescored_num_mc": rescored["num_mc"], "rescored_step": rescored["step"]}
    rates = [r["tokens_per_s"] for r in trains if r.get("tokens_per_s", float("nan")) > 0]
    mfus = [r["mfu"] for r in trains if r.get("mfu", float("nan")) > 0]
    if rates:
        row["tokens_per_s"] = statistics.median(rates)
        row["steps_per_s"] = row["tokens_per_s"] / (cfg.train.batch_size * cfg.data.seq_len)
    if mfus:
        row["mfu_vs_f32_peak"] = statistics.median(mfus)
    return row


def collected_state(workdir: Path) -> str:
    """A run folder's state for --collect: "done" (its summary is written), "stopped" (it
    trained and was stopped, e.g. by SIGTERM, before its schedule ended) or "not started"."""
    from dvar_jax.run_dir import RunDir

    run = RunDir(workdir)
    if run.summary_path.exists():
        return "done"
    return "stopped" if run.metrics_path.exists() else "not started"


def rescore_record(workdir: Path, cfg) -> dict | None:
    """The newest `dvar eval` record of the run's best checkpoint drawn with masks other than
    the training-time evaluation's (its seed differs from eval.seed), or None."""
    from dvar_jax.results import read_records
    from dvar_jax.run_dir import RunDir

    path = RunDir(workdir).evals_path
    if cfg.objective == "ar" or not path.exists():
        return None
    mine = [r for r in read_records(path)
            if r.get("checkpoint") == "best" and r.get("seed") != cfg.eval.seed]
    return mine[-1] if mine else None


def rescore(runs, workroot: Path, num_mc: int) -> None:
    """Re-scores every finished diffusion run's best checkpoint at num_mc draws and RESCORE_SEED
    (`dvar eval`, appended to its eval.jsonl) unless that was done already."""
    from dvar_jax.eval.evaluate import run_evaluation
    from dvar_jax.run_dir import RunDir

    for name, cfg in runs:
        workdir = workroot / name
        if cfg.objective == "ar" or not RunDir(workdir).summary_path.exists():
            continue
        done = rescore_record(workdir, cfg)
        if done and done["num_mc"] >= num_mc:
            continue
        r = run_evaluation(workdir, checkpoint="best", num_mc=num_mc, batch_size=64,
                           seed=RESCORE_SEED)
        log(f"{name}: best checkpoint (step {r['step']}) re-scored at K = {num_mc}: "
            f"{r['val_loss']:.4f} ± {r['val_loss_stderr']:.4f}")


def c_crit(unique_tokens: float) -> float:
    from dvar_jax.scaling.planner import DEFAULT_LAW_SET, LAW_SETS, critical_compute
    return critical_compute(LAW_SETS[DEFAULT_LAW_SET], unique_tokens)


def verdicts(rows: list[dict]) -> list[dict]:
    """Per U: AR's best over every AR run, diffusion's best over every diffusion run, and the
    FLOPs where a diffusion curve first falls below AR's best (the measured crossover)."""
    out = []
    for u in sorted({r["unique_tokens"] for r in rows}):
        at = [r for r in rows if r["unique_tokens"] == u and "best_val" in r]
        ar = [r for r in at if r["objective"] == "ar"]
        df = [r for r in at if r["objective"] == "diffusion"]
        v = {"unique_tokens": u, "c_crit": c_crit(u)}
        if ar:
            a = min(ar, key=lambda r: r["best_val"])
            v |= {"ar_best": a["best_val"], "ar_run": a["name"], "ar_best_flops": a["best_flops"]}
        if df:
            # Re-scored runs are judged by the re-score (unbiased), the rest by the curve.
            d = min(df, key=lambda r: r.get("rescored_val", r["best_val"]))
            v |= {"diffusion_best": d.get("rescored_val", d["best_val"]),
                  "diffusion_rescored": "rescored_val" in d, "diffusion_run": d["name"],
                  "diffusion_best_flops": d["best_flops"],
                  "diffusion_final": d["final_val"]}
        if ar and df:
            v["gap"] = v["diffusion_best"] - v["ar_best"]  # < 0: diffusion ahead
            v["crossover"] = v["gap"] < 0
            first = [f for r in df for (_, loss, f) in r["curve"] if loss < v["ar_best"]]
            v["crossover_flops"] = min(first) if first and v["crossover"] else None
        out.append(v)
    return out


SEED_SUFFIX = re.compile(r"-seed\d+$")


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs that differ only by seed (names equal but for a trailing "-seedN"; a name without
    one is the config's default seed), two or more with a score: each group's scores (diffusion
    by its re-score where present, as verdicts judges it), mean and sample standard deviation."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "best_val" in r:
            groups.setdefault(SEED_SUFFIX.sub("", r["name"]), []).append(r)
    out = []
    for config, members in groups.items():
        if len(members) < 2:
            continue
        scores = [r.get("rescored_val", r["best_val"]) for r in members]
        out.append({"config": config, "objective": members[0]["objective"],
                    "unique_tokens": members[0]["unique_tokens"],
                    "runs": [r["name"] for r in members], "scores": scores, "n": len(scores),
                    "mean": statistics.fmean(scores), "sd": statistics.stdev(scores)})
    return out


def seed_gaps(groups: list[dict]) -> list[dict]:
    """Per U with seed groups of both objectives: the AR and the diffusion group of lowest mean,
    the gap of their means (< 0: diffusion ahead) and its standard error,
    sqrt(sd_ar^2 / n_ar + sd_diffusion^2 / n_diffusion)."""
    out = []
    for u in sorted({g["unique_tokens"] for g in groups}):
        best = {}
        for objective in ("ar", "diffusion"):
            mine = [g for g in groups if g["unique_tokens"] == u and g["objective"] == objective]
            if mine:
                best[objective] = min(mine, key=lambda g: g["mean"])
        if len(best) < 2:
            continue
        a, d = best["ar"], best["diffusion"]
        out.append({"unique_tokens": u, "ar_config": a["config"], "diffusion_config": d["config"],
                    "gap": d["mean"] - a["mean"],
                    "gap_se": math.sqrt(a["sd"] ** 2 / a["n"] + d["sd"] ** 2 / d["n"])})
    return out


def fmt(x, spec=".4f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def results_markdown(rows: list[dict], vs: list[dict], groups: list[dict]) -> str:
    lines = ["| run | obj | d x L | N (M) | U | batch | lr | drop | epochs | steps | state | "
             "best val (epoch) | best re-scored (K) | final val (epoch) | FLOPs (6ND) | wall s | "
             "tok/s | MFU f32 |",
             "|" + "---|" * 18]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['objective']} | {r['d_model']}x{r['n_layers']} | "
            f"{r['params'] / 1e6:.2f} | {r['unique_tokens']:,} | {r['batch']} | {r['peak_lr']:g} "
            f"| {r['dropout']:g} | {r['epochs']:g} | {r['steps']:,} | {r['state']} | "
            f"{fmt(r.get('best_val'))} ({fmt(r.get('best_epoch'), '.1f')}) | "
            + (f"{r['rescored_val']:.4f} ± {r['rescored_se']:.4f} ({r['rescored_num_mc']}) | "
               if "rescored_val" in r else "- | ")
            + f"{fmt(r.get('final_val'))} ({fmt(r.get('final_epoch'), '.1f')}) | "
            f"{fmt(r.get('flops'), '.2e')} | {fmt(r.get('wall_s'), '.0f')} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu_vs_f32_peak'), '.1%')} |")
    lines += ["", "| U | AR best (run) | diffusion best (run) | diffusion final | gap (diff - AR) "
              "| crossover? | FLOPs where diffusion first < AR best | C_crit(U), study laws |",
              "|---|---|---|---|---|---|---|---|"]
    for v in vs:
        lines.append(
            f"| {v['unique_tokens']:,} | {fmt(v.get('ar_best'))} ({v.get('ar_run', '-')}) | "
            f"{fmt(v.get('diffusion_best'))}{' re-scored' if v.get('diffusion_rescored') else ''}"
            f" ({v.get('diffusion_run', '-')}) | "
            f"{fmt(v.get('diffusion_final'))} | {fmt(v.get('gap'), '+.4f')} | "
            f"{'YES' if v.get('crossover') else 'no' if 'crossover' in v else '-'} | "
            f"{fmt(v.get('crossover_flops'), '.2e')} | {fmt(v['c_crit'], '.2e')} |")
    return "\n".join(lines) + "\n" + seeds_markdown(groups)


def seeds_markdown(groups: list[dict]) -> str:
    """The seed groups and the gap of means per U as markdown tables ("" without groups)."""
    if not groups:
        return ""
    lines = ["", "| config, over seeds | obj | U | n | mean | s.d. | scores |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['config']} | {g['objective']} | {g['unique_tokens']:,} | {g['n']} | "
              f"{g['mean']:.4f} | {g['sd']:.4f} | "
              + ", ".join(f"{x:.4f}" for x in g["scores"]) + " |" for g in groups]
    lines += ["", "| U | gap of the means (diff - AR) | s.e. | AR config | diffusion config |",
              "|---|---|---|---|---|"]
    lines += [f"| {v['unique_tokens']:,} | {v['gap']:+.4f} | {v['gap_se']:.4f} | "
              f"{v['ar_config']} | {v['diffusion_config']} |" for v in seed_gaps(groups)]
    return "\n".join(lines) + "\n"


def changed_settings(row: dict) -> str:
    """", wd 1, avg 0.999, stratified": the row's settings that differ from configs/base.py's
    defaults, for a figure label (rows written before a setting was recorded show none)."""
    from dvar_jax.configs.base import get_config

    train, diffusion = get_config().train, get_config().diffusion
    parts = []
    if row.get("weight_decay", train.weight_decay) != train.weight_decay:
        parts.append(f"wd {row['weight_decay']:g}")
    if row.get("ema_decay", train.ema_decay) != train.ema_decay:
        parts.append(f"avg {row['ema_decay']:g}")
    if row.get("noise_sampling", diffusion.noise_sampling) != diffusion.noise_sampling:
        parts.append(row["noise_sampling"])
    return "".join(f", {p}" for p in parts)


def plot(rows: list[dict], vs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    us = [v["unique_tokens"] for v in vs if any(r["curve"] and r["unique_tokens"] ==
                                                 v["unique_tokens"] for r in rows)]
    if not us:
        return path
    fig, axes = plt.subplots(1, len(us), figsize=(max(5.2 * len(us), 7.5), 4.8), squeeze=False)
    colors = {"ar": ["#1f77b4", "#17becf", "#0b3c6b", "#6baed6", "#393b79", "#9467bd"],
              "diffusion": ["#d62728", "#ff7f0e", "#8c2d04", "#e377c2", "#bcbd22", "#7f7f7f"]}
    for ax, u in zip(axes[0], us, strict=True):
        v = next(v for v in vs if v["unique_tokens"] == u)
        at_u = [r for r in rows if r["unique_tokens"] == u and r["curve"]]
        best = {v.get("ar_run"), v.get("diffusion_run")}
        seen = {"ar": 0, "diffusion": 0}
        # Past LABELLED_RUNS in a panel, each objective's runs but its best are drawn faint and
        # unlabelled: a legend of a dozen runs hides the curves.
        crowded = len(at_u) > LABELLED_RUNS
        for obj in ("ar", "diffusion"):
            mine = [r for r in at_u if r["objective"] == obj]
            others = 0
            for r in sorted(mine, key=lambda r: r["name"] in best):
                _, loss, flops = zip(*r["curve"], strict=True)
                pts = [(f, x) for f, x in zip(flops, loss, strict=True) if f > 0]
                if not pts:
                    continue
                label = (f"{obj} {r['d_model']}x{r['n_layers']} ({r['params'] / 1e6:.1f}M), "
                         f"{r['epochs']:g} ep" + (f", drop {r['dropout']:g}" if r["dropout"]
                                                  else "")
                         + changed_settings(r)
                         + ("" if r["state"] == "done" else f" [{r['state']}]"))
                ls = "-" if obj == "diffusion" else "--"
                if crowded and r["name"] not in best:
                    others += 1
                    ax.plot(*zip(*pts, strict=True), color=colors[obj][0], lw=0.7, alpha=0.3,
                            ls=ls, label=f"{len(mine) - 1} other {obj} runs" if others == 1
                            else None)
                    continue
                color = colors[obj][seen[obj] % 6]
                seen[obj] += 1
                ax.plot(*zip(*pts, strict=True), color=color, ls=ls,
                        lw=2.0 if crowded else 1.4, label=label + (" (best)" if crowded else ""))
                if "rescored_val" in r:  # the unbiased score of the kept best checkpoint
                    ax.plot([r["best_flops"]], [r["rescored_val"]], marker="x", color=color,
                            ms=7, mew=1.8, ls="none")
        if "ar_best" in v:
            ax.axhline(v["ar_best"], color="#1f77b4", lw=0.8, ls=":",
                       label=f"AR best {v['ar_best']:.3f}")
        if math.isfinite(v["c_crit"]):
            ax.axvline(v["c_crit"], color="k", lw=1.0, ls="-.",
                       label=f"C_crit(U) = {v['c_crit']:.1e} (study laws)")
        if v.get("crossover_flops"):
            ax.axvline(v["crossover_flops"], color="#2ca02c", lw=1.0, ls=":",
                       label=f"measured crossover {v['crossover_flops']:.1e}")
        ax.set_xscale("log")
        lo = min(x for r in at_u for (_, x, _) in r["curve"])
        ax.set_ylim(lo - 0.15, lo + (1.5 if len(at_u) > LABELLED_RUNS else 2.5))
        ax.set_xlabel("training FLOPs, C = 6 N D")
        ax.set_ylabel("validation loss (nats / token)")
        verdict = ""
        if "gap" in v:
            verdict = (f": diffusion {v['diffusion_best']:.3f}"
                       + (" (re-scored, x)" if v.get("diffusion_rescored") else "")
                       + f" vs AR {v['ar_best']:.3f}")
        ax.set_title(f"U = {u:,} tokens{verdict}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="upper right")
    fig.suptitle("AR vs masked diffusion on Shakespeare (1k BPE), same unique tokens,\n"
                 "each with its own size and epochs", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_tables(out: Path, rows: list[dict]) -> list[dict]:
    """OUT/results.json (runs, verdicts, seed groups and their gaps) and OUT/results.md from
    the runs' facts; returns the verdicts."""
    vs = verdicts(rows)
    groups = seed_groups(rows)
    (out / "results.json").write_text(json.dumps({"runs": rows, "verdicts": vs,
                                                  "seed_groups": groups,
                                                  "seed_gaps": seed_gaps(groups),
                                                  "elapsed_s": time.time() - START}, indent=1))
    (out / "results.md").write_text(results_markdown(rows, vs, groups))
    return vs


def write_outputs(args, runs, workroot: Path, info: dict, final: bool = False) -> list[dict]:
    rows = [run_facts(n, c, workroot / n, info.get(n, {})) for n, c in runs]
    out = Path(args.out)
    vs = write_tables(out, rows)
    with tarfile.open(out / "runs.tar.gz.tmp", "w:gz") as tar:
        for n, _ in runs:
            for f in ("config.json", "metrics.jsonl", "summary.json", "log.txt"):
                p = workroot / n / f
                if p.exists():
                    data = p.read_bytes()
                    ti = tarfile.TarInfo(f"runs/{n}/{f}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
    os.replace(out / "runs.tar.gz.tmp", out / "runs.tar.gz")
    if final:
        try:
            plot(rows, vs, Path(args.figure or out / "crossover.png"))
        except Exception as e:  # the data matters more than the figure
            log(f"plot failed: {e!r}")
    return rows


# --------------------------------------------------------------------------------------------
# The phases.
# --------------------------------------------------------------------------------------------

ENV_PROBE = r"""
import sys, time, jax, jax.numpy as jnp
print("python", sys.version.split()[0], "jax", jax.__version__, "backend", jax.default_backend())
print("devices", jax.devices())
t = time.perf_counter(); x = jnp.ones((1024, 1024)); (x @ x).block_until_ready()
print(f"first jitted matmul {time.perf_counter() - t:.2f}s")
from dvar_jax.perf import measure_matmul_peak
for dt in (jnp.float32, jnp.bfloat16):
    print(f"matmul peak {jnp.dtype(dt).name} (default precision): "
          f"{measure_matmul_peak(dt) / 1e12:.1f} TFLOP/s", flush=True)
import dvar_jax.train  # every import a run needs
print("dvar_jax.train imports")
"""


def env_phase(args) -> None:
    text = []
    try:
        text.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                   timeout=30).stdout)
    except (OSError, subprocess.TimeoutExpired) as e:
        text.append(f"nvidia-smi: {e!r}\n")
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True,
                           timeout=120, env=child_env(args, 0.3))
    text.append(probe.stdout + probe.stderr[-3000:])
    (Path(args.workroot) / "env.txt").parent.mkdir(parents=True, exist_ok=True)
    (Path(args.workroot) / "env.txt").write_text("".join(text))  # also in the printed log
    print("".join(text), flush=True)
    if probe.returncode != 0:
        raise SystemExit(f"environment probe failed (rc {probe.returncode})")


def child_env(args, mem_fraction: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.3f}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def child_cmd(args, name: str, workdir: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--workdir",
           str(workdir), "--grid", str(args.grid), "--epochs-scale", str(args.epochs_scale)]
    if args.tiny:
        cmd.append("--tiny")
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    return cmd


def any_progress(workroot: Path, runs) -> bool:
    """Whether some run has logged a train record: the pipeline works (a later failure is that
    run's own, e.g. a diverging size, and the others go on)."""
    for name, _ in runs:
        metrics = workroot / name / "metrics.jsonl"
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            return True
    return False


def runs_phase(args, runs) -> None:
    workroot = Path(args.workroot)
    workroot.mkdir(parents=True, exist_ok=True)
    queue = [n for n, _ in runs]
    info: dict[str, dict] = {}
    procs: dict[str, tuple[subprocess.Popen, float, object]] = {}
    deadline = START + args.deadline_s
    mem = min(0.9 / args.parallel, 0.3)
    last_write = 0.0
    terminated = False
    while queue or procs:
        now = time.time()
        while queue and len(procs) < args.parallel and now < deadline - 30:
            name = queue.pop(0)
            wd = workroot / name
            wd.mkdir(parents=True, exist_ok=True)
            logf = open(wd / "log.txt", "w")  # noqa: SIM115 (open while the run lives)
            p = subprocess.Popen(child_cmd(args, name, wd), stdout=logf, stderr=subprocess.STDOUT,
                                 env=child_env(args, mem), cwd=ROOT)
            procs[name] = (p, now, logf)
            info[name] = {"state": "running"}
            log(f"start {name} (pid {p.pid})")
        for name, (p, t0, logf) in list(procs.items()):
            rc = p.poll()
            if rc is None:
                continue
            logf.close()
            del procs[name]
            state = "done" if rc == 0 and not info[name].get("cut") else \
                "cut off" if info[name].get("cut") else f"failed rc={rc}"
            info[name] |= {"state": state, "wall_s": time.time() - t0, "returncode": rc}
            log(f"end {name}: {state} after {time.time() - t0:.0f}s")
            if rc != 0 and not info[name].get("cut"):
                tail = (workroot / name / "log.txt").read_text()[-2500:]
                print(tail, flush=True)
                if time.time() - START < args.fail_fast_s and not any_progress(workroot, runs):
                    log("a run failed before any run trained: stopping everything (fail fast)")
                    for q, _, _ in procs.values():
                        q.kill()
                    write_outputs(args, runs, workroot, info, final=True)
                    raise SystemExit(3)
        if time.time() > deadline and procs and not terminated:
            log(f"deadline: SIGTERM to {list(procs)}")
            for name, (p, _, _) in procs.items():
                info[name]["cut"] = True
                p.send_signal(signal.SIGTERM)
            terminated = True
            queue.clear()
        if terminated and time.time() > deadline + args.grace_s:
            for name, (p, _, _) in procs.items():
                if p.poll() is None:
                    log(f"SIGKILL {name}")
                    p.kill()
        if time.time() - last_write > 20:
            write_outputs(args, runs, workroot, info)
            last_write = time.time()
        time.sleep(1.0)
    for name in queue:
        info.setdefault(name, {"state": "not started"})
    if args.rescore:
        rescore(runs, workroot, args.rescore)
    rows = write_outputs(args, runs, workroot, info, final=True)
    for r in rows:
        if "best_val" in r:
            log(f"{r['name']}: best {r['best_val']:.4f} @ ep {r['best_epoch']:.1f}, final "
                f"{r['final_val']:.4f} @ ep {r['final_epoch']:.1f}, {r['state']}")
    print((Path(args.out) / "results.md").read_text(), flush=True)


def throughput_phase(args) -> None:
    """benchmarks/train_throughput.py once per ';'-separated argument set, all within
    --throughput-s; each set's table lands in throughput.txt as soon as it is done."""
    out = Path(args.out)
    end = time.time() + args.throughput_s
    texts = []
    for i, part in enumerate(p for p in args.throughput_args.split(";") if p.strip()):
        left = end - time.time()
        if left < 20:
            texts.append(f"[skipped {part!r}: {left:.0f}s left]\n")
            break
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"),
               "--json", str(out / f"throughput{i}.json"), *shlex.split(part)]
        log(f"throughput: {' '.join(cmd)} (timeout {left:.0f}s)")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left,
                               env=child_env(args, 0.8), cwd=ROOT)
            text = p.stdout + p.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\n[timed out after {left:.0f}s]\n"
        texts.append(f"$ {' '.join(cmd[1:])}\n{text}\n")
        (out / "throughput.txt").write_text("".join(texts))
        print(text, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/gpu_crossover", help="results folder")
    p.add_argument("--workroot", default="", help="run folders (default OUT/work)")
    p.add_argument("--grid", default=str(DEFAULT_GRID), help="a .py file with get_grid()")
    p.add_argument("--only", default="", help="comma-separated run-name patterns")
    p.add_argument("--parallel", type=int, default=6, help="runs at a time on the one device")
    p.add_argument("--deadline-s", type=float, default=3600.0,
                   help="after this many seconds from the start, SIGTERM the runs still going")
    p.add_argument("--grace-s", type=float, default=25.0, help="SIGTERM to SIGKILL")
    p.add_argument("--fail-fast-s", type=float, default=150.0,
                   help="a run failing within this many seconds of the start, before any run "
                        "has trained, stops everything")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every run's epochs")
    p.add_argument("--dtype", default="", help="override model.dtype (float32 | bfloat16)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: d=32, 2 layers")
    p.add_argument("--throughput-s", type=float, default=0.0,
                   help="run benchmarks/train_throughput.py with this timeout (0 = skip)")
    p.add_argument("--throughput-args", default="--sizes 140M --objectives ar --batch 16 "
                   "--seq 1024 --repeats 3;--sizes 140M --objectives diffusion --batch 16 "
                   "--seq 1024 --repeats 3",
                   help="arguments for train_throughput.py; ';' separates invocations")
    p.add_argument("--skip-env", action="store_true")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figure and tables from OUT/results.json")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: read the grid's runs from --workroot (trained before, "
                        "e.g. by `dvar sweep run`) and write the tables and the figure")
    p.add_argument("--rescore", type=int, default=0, metavar="K",
                   help="after training (or with --collect): re-score each finished diffusion "
                        "run's best checkpoint at K draws (seed 1) and judge diffusion by it "
                        "(0 = off)")
    p.add_argument("--results", default="",
                   help="with --plot-only: comma-separated results.json files to merge "
                        "(default OUT/results.json)")
    p.add_argument("--figure", default="", help="figure path (default OUT/crossover.png)")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rescore and args.plot_only:
        p.error(f"--rescore={args.rescore}: not with --plot-only, which reads results files, "
                "not the run folders whose checkpoints it re-scores")
    if args.rescore < 0 or args.rescore == 1:
        p.error(f"--rescore={args.rescore}: allowed 0 (off) or K >= 2 draws (one draw has no "
                "standard error)")
    args.workroot = args.workroot or str(Path(args.out) / "work")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        files = [Path(f) for f in args.results.split(",") if f] or [out / "results.json"]
        rows = [r for f in files for r in json.loads(f.read_text())["runs"]]
        vs = write_tables(out, rows)
        print(plot(rows, vs, Path(args.figure or out / "crossover.png")))
        return 0
    if args.collect:
        if not Path(args.workroot).is_dir():
            raise SystemExit(f"--collect: --workroot={args.workroot!r} is not a folder; give "
                             "the folder the grid's runs were trained in")
        runs = grid_runs(args)
        if args.rescore:
            rescore(runs, Path(args.workroot), args.rescore)
        info = {n: {"state": collected_state(Path(args.workroot) / n)} for n, _ in runs}
        write_outputs(args, runs, Path(args.workroot), info, final=True)
        print((out / "results.md").read_text(), flush=True)
        return 0
    if not args.skip_env:
        env_phase(args)
    runs = grid_runs(args)
    log(f"{len(runs)} runs, {args.parallel} at a time, deadline {args.deadline_s:.0f}s")
    runs_phase(args, runs)
    if args.throughput_s > 0:
        throughput_phase(args)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
