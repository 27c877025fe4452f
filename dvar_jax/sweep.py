"""Sweeps: train every run of a grid, skipping what is done and resuming what was cut off, and
append one record per finished run to a results file (`dvar sweep list`, `dvar sweep run`).

A grid (configs/grids/) is a list of (name, config); run NAME lives in WORKDIR/NAME. A run is
done when its summary.json says completed and its record is in the results file (default
WORKDIR/results.jsonl). Records are appended under a lock (on gs://: a generation
precondition) and never twice for one name, so any number of sweep processes may share a
results file. WORKDIR may be gs://BUCKET/PATH. On a multi-host slice every process runs the
sweep together (each run is one multi-host training); process 0 decides what to skip and alone
appends the records.
"""

import copy
import fnmatch
import importlib
import importlib.util
import math
import os
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from dvar_jax import storage
from dvar_jax.configs.grids import run_name, unset_required
from dvar_jax.objectives import objective_from_config
from dvar_jax.results import append_once, recorded_names
from dvar_jax.run_dir import RunBusyError, RunDir, sweep_results_path

ABLATIONS_PREFIX = "ablations/"
CPU_SUFFIX = "-cpu"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

# CPU cost model for `sweep list`: train tokens/s on a 2-core CPU by (size, objective,
# tokenizer vocabulary), dropout 0. Vocabulary 4096 (the demo's): README, "Performance", batch
# 32 x 128, measured with benchmarks/train_throughput.py; cpu-xxs at batch 1-16 x 64, where the
# rates of all four sizes moved by less than run-to-run noise. Vocabulary 1024 (the small grid's):
# median tokens/s of the grid's diffusion runs at batch 8 x 64 on 2026-12-04, for both objectives
# (AR's own runs shared the cores with other jobs; in the pilots the two differed by < 5%;
# benchmarks/results/grid_demo_2026-12-04b).
CPU_TOKENS_PER_S = {
    ("cpu-xxs", "ar", 4096): 22_000, ("cpu-xxs", "diffusion", 4096): 22_000,
    ("cpu-xs", "ar", 4096): 17_004, ("cpu-xs", "diffusion", 4096): 17_686,
    ("cpu-s", "ar", 4096): 6_175, ("cpu-s", "diffusion", 4096): 6_380,
    ("cpu-m", "ar", 4096): 2_639, ("cpu-m", "diffusion", 4096): 2_767,
    ("cpu-xxs", "ar", 1024): 100_000, ("cpu-xxs", "diffusion", 1024): 100_000,
    ("cpu-xs", "ar", 1024): 40_000, ("cpu-xs", "diffusion", 1024): 40_000,
    ("cpu-sm", "ar", 1024): 28_000, ("cpu-sm", "diffusion", 1024): 28_000,
    ("cpu-s", "ar", 1024): 12_000, ("cpu-s", "diffusion", 1024): 12_000,
}
# A validation token is a forward pass only: about a third of a train token.
EVAL_SPEEDUP = 3.0
# Per run: compiling the train and eval steps, the matmul peak probe, checkpoint saves.
RUN_OVERHEAD_S = 10.0


@dataclass(frozen=True)
class Grid:
    spec: str  # as given: a name in configs/grids/ or a path to a .py file
    label: str  # the module's name, for records and messages
    runs: tuple[tuple[str, ConfigDict], ...]


# ------------------------------------------------------------------------------------------------
# loading grids


def examples_dir() -> Path | None:
    """The folder of example configs that grid names refer to: `$DVAR_CONFIGS`, else
    `./configs`, else the `configs/` of the source checkout this package runs from; None when
    there is none (a wheel installed elsewhere: give grids as file paths)."""
    candidates = [Path(os.environ["DVAR_CONFIGS"])] if os.environ.get("DVAR_CONFIGS") else []
    candidates += [Path.cwd() / "configs", Path(__file__).resolve().parent.parent / "configs"]
    return next((c for c in candidates if (c / "grids").is_dir()), None)


def _modules(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def grid_names() -> list[str]:
    """The grids shipped as examples: configs/grids/NAME, and configs/ablations/NAME as
    `ablations/NAME` (the study's scale) and `ablations/NAME-cpu` (its CPU-sized variant)."""
    root = examples_dir()
    if root is None:
        return []
    ablations = [f"{ABLATIONS_PREFIX}{stem}{suffix}" for stem in _modules(root / "ablations")
                 for suffix in ("", CPU_SUFFIX)]
    return _modules(root / "grids") + ablations


def _unknown_grid(spec: str) -> ValueError:
    names = grid_names()
    shipped = (", ".join(names) if names else
               "a grid name from a configs/ folder (none found: run from the repository root or "
               "set DVAR_CONFIGS)")
    return ValueError(f"--grid={spec!r} is not a known grid; allowed: {shipped}, or a path to a "
                      ".py file defining get_grid()")


def _load_file(path: Path):
    """The module at `path`, loaded by path: the example configs are files, not a package."""
    module_spec = importlib.util.spec_from_file_location(f"_dvar_grid_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _grid_runs(spec: str) -> list:
    """get_grid() of the module a --grid value names (see `grid_names`, or a .py file path)."""
    if spec.startswith(ABLATIONS_PREFIX) and not spec.endswith(".py"):
        if spec not in grid_names():
            raise _unknown_grid(spec)
        stem = spec.removeprefix(ABLATIONS_PREFIX)
        cpu = stem.endswith(CPU_SUFFIX)
        module = _load_file(examples_dir() / "ablations" / f"{stem.removesuffix(CPU_SUFFIX)}.py")
        return module.get_grid(cpu=cpu)
    module = _grid_module(spec)
    if not callable(getattr(module, "get_grid", None)):
        raise ValueError(f"--grid={spec!r} defines no get_grid(); a grid module defines "
                         "get_grid() -> list of (name, ConfigDict)")
    return module.get_grid()


def _grid_module(spec: str):
    """The module a --grid value names: configs/grids/<spec>.py, or a .py file path."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            names = ", ".join(grid_names()) or "none found"
            raise ValueError(f"--grid={spec!r}: no such file; allowed: a grid name "
                             f"({names}) or a .py file defining get_grid()")
        return _load_file(path)
    if spec not in grid_names():
        raise _unknown_grid(spec)
    return _load_file(examples_dir() / "grids" / f"{spec}.py")


def _named(element: Any, spec: str) -> tuple[str, ConfigDict]:
    """(name, config) from a grid element: a pair, or a bare config named by its values."""
    if isinstance(element, ConfigDict):
        return run_name(element.objective, element.model.name, element.data.epochs,
                        unique_tokens=element.data.unique_tokens), element
    if (isinstance(element, tuple | list) and len(element) == 2 and isinstance(element[0], str)
            and isinstance(element[1], ConfigDict)):
        return element[0], element[1]
    raise ValueError(f"--grid={spec!r}: get_grid() returned a {type(element).__name__}; allowed: "
                     "a list of ConfigDict or of (name, ConfigDict) pairs")


def load_grid(spec: str) -> Grid:
    """The grid `spec` names, every run checked: unique folder-safe names, a valid config,
    at least one train step. ValueError naming the first bad run."""
    from dvar_jax.config import validate_config

    runs = [_named(e, spec) for e in _grid_runs(spec)]
    if not runs:
        raise ValueError(f"--grid={spec!r}: get_grid() returned no runs")
    seen: set[str] = set()
    for name, cfg in runs:
        if not _SAFE_NAME.fullmatch(name):
            raise ValueError(f"grid {spec!r}: run name {name!r} is not a folder name; allowed: "
                             "letters, digits, '.', '_', '+', '-'")
        if name in seen:
            raise ValueError(f"grid {spec!r}: run name {name!r} appears twice; names are unique")
        seen.add(name)
        try:
            validate_config(cfg)
        except ValueError as e:
            raise ValueError(f"grid {spec!r}, run {name}: {e}") from None
        if num_steps(cfg) < 1:
            raise ValueError(f"grid {spec!r}, run {name}: data.epochs={cfg.data.epochs} over "
                             f"data.unique_tokens={cfg.data.unique_tokens} is less than one batch "
                             f"of train.batch_size={cfg.train.batch_size}")
    label = Path(spec).stem if spec.endswith(".py") else spec.removeprefix(ABLATIONS_PREFIX)
    return Grid(spec, label, tuple(runs))


def select(grid: Grid, only: str | Iterable[str] | None) -> list[tuple[str, ConfigDict]]:
    """The runs named by `only`: comma-separated names or shell patterns (`ar-*-U100M-*`);
    None or "" = all. ValueError for a name or pattern that matches nothing."""
    if not only:
        return list(grid.runs)
    patterns = [p.strip() for p in only.split(",")] if isinstance(only, str) else list(only)
    names = [name for name, _ in grid.runs]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"--only={pattern!r} matches no run of grid {grid.label!r} "
                             f"({len(names)} runs; `dvar sweep list --grid={grid.spec}` lists "
                             "them)")
    return [(n, c) for n, c in grid.runs if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def with_overrides(runs: list[tuple[str, ConfigDict]], overrides: dict[str, Any] | None
                   ) -> list[tuple[str, ConfigDict]]:
    """Copies of the runs with `overrides` (dotted key -> value) applied to every config."""
    if not overrides:
        return runs
    out = []
    for name, cfg in runs:
        cfg = copy.deepcopy(cfg)
        cfg.update_from_flattened_dict(dict(overrides))
        out.append((name, cfg))
    return out


# ------------------------------------------------------------------------------------------------
# sizes, tokens, FLOPs


# Mean GPT-2 tokens per C4 document (the study's K = U / 478.6, from datablations): the plan's
# U for a run that takes its first K documents (data.unique_documents) before it has a store.
TOKENS_PER_C4_DOCUMENT = 478.625835


def planned_unique_tokens(cfg: ConfigDict) -> int:
    """U of a run before training: data.unique_tokens, or K documents at C4's mean length."""
    if cfg.data.unique_documents:
        return round(cfg.data.unique_documents * TOKENS_PER_C4_DOCUMENT)
    return cfg.data.unique_tokens


def num_steps(cfg: ConfigDict) -> int:
    """Train steps of a run, as dvar_jax.data.pipeline.TrainBatches counts them (estimated
    for data.unique_documents)."""
    windows = (planned_unique_tokens(cfg) - 1) // cfg.data.seq_len
    return math.floor(cfg.data.epochs * windows / cfg.train.batch_size)


def run_row(name: str, cfg: ConfigDict) -> dict[str, Any]:
    """One run's planned size, tokens and compute (before training: from the config)."""
    from dvar_jax.config import model_dims
    from dvar_jax.scaling.flops import paper_param_count, training_flops

    dims = model_dims(cfg.model)
    params = paper_param_count(dims["d_model"], dims["n_layers"], cfg.data.vocab_size)
    tokens = num_steps(cfg) * cfg.train.batch_size * cfg.data.seq_len
    width = dims["n_heads"] * dims["head_dim"]
    return {"name": name, "objective": cfg.objective, "size": cfg.model.name, "params": params,
            "unique_tokens": planned_unique_tokens(cfg), "epochs": cfg.data.epochs,
            "steps": num_steps(cfg), "tokens": tokens, "flops": training_flops(params, tokens),
            "flops_attention": training_flops(
                params, tokens, attention=(dims["n_layers"], cfg.data.seq_len, width))}


def list_runs(grid: Grid | list[tuple[str, ConfigDict]]) -> list[dict[str, Any]]:
    """A row per run: name, objective, size, N (the study's formula), U, epochs, steps, D (tokens
    trained), FLOPs (6ND) and FLOPs with attention."""
    runs = grid.runs if isinstance(grid, Grid) else grid
    return [run_row(name, cfg) for name, cfg in runs]


def cpu_seconds(cfg: ConfigDict) -> float | None:
    """Estimated wall time of a run on a 2-core CPU, or None for sizes never measured there."""
    objective = objective_from_config(cfg)
    # Measured for AR and masked diffusion; block diffusion runs diffusion's model over
    # [noisy; clean], twice the tokens (not measured).
    measured = "ar" if objective.causal else "diffusion"
    rate = CPU_TOKENS_PER_S.get((cfg.model.name, measured, cfg.data.vocab_size))
    if rate is None:
        return None
    if objective.diffusion_block:
        rate /= 2
    steps = num_steps(cfg)
    windows = (planned_unique_tokens(cfg) - 1) // cfg.data.seq_len
    eval_every = max(1, round(cfg.eval.every_epochs * windows / cfg.train.batch_size))
    evals = 1 + steps // eval_every + (steps % eval_every > 0)
    eval_tokens = cfg.data.validation_tokens * (1 if objective.exact else cfg.eval.num_mc)
    train_tokens = steps * cfg.train.batch_size * cfg.data.seq_len
    return RUN_OVERHEAD_S + train_tokens / rate + evals * eval_tokens / (rate * EVAL_SPEEDUP)


def estimate_cpu_seconds(runs: Iterable[tuple[str, ConfigDict]]) -> float | None:
    """Estimated wall time of running `runs` one after another on a 2-core CPU; None when a
    run's size has no measured CPU throughput (or validation_tokens is 0 = all)."""
    total = 0.0
    for _, cfg in runs:
        seconds = cpu_seconds(cfg)
        if seconds is None or cfg.data.validation_tokens == 0:
            return None
        total += seconds
    return total


def _tokens(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def format_runs(grid: Grid, runs: list[tuple[str, ConfigDict]] | None = None) -> str:
    """`dvar sweep list`: a table of the runs with the FLOPs conventions stated, and totals."""
    from dvar_jax.scaling.flops import FLOPS_CONVENTION, FLOPS_CONVENTION_ATTENTION

    runs = list(grid.runs) if runs is None else runs
    rows = list_runs(runs)
    width = max(len("name"), *(len(r["name"]) for r in rows))
    lines = [
        f"grid {grid.label}: {len(rows)} runs "
        f"({sum(r['objective'] == 'ar' for r in rows)} ar, "
        f"{sum(r['objective'] == 'diffusion' for r in rows)} diffusion)",
        "N: the study's parameter formula 4Ld^2 + 3Ld*h_f + 6Ld + Vd, embeddings included, with "
        "the run's data.vocab_size as V (PAPER.md §2)",
        "D: tokens trained = steps x batch x seq_len (about U x epochs)",
        f"6ND: {FLOPS_CONVENTION}, the study's convention (PAPER.md §4.1), attention not counted",
        f"+attn: {FLOPS_CONVENTION_ATTENTION}, adding the attention products QK^T and "
        "attention x V (forward + backward, the full S x S square; w = heads x head_dim)",
        "",
        f"{'name':<{width}}  {'objective':<9}  {'N':>8}  {'U':>7}  {'epochs':>6}  {'steps':>8}  "
        f"{'D':>8}  {'6ND':>9}  {'+attn':>9}",
    ]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['objective']:<9}  {_tokens(r['params']):>8}  "
                     f"{_tokens(r['unique_tokens']):>7}  {r['epochs']:>6g}  {r['steps']:>8,}  "
                     f"{_tokens(r['tokens']):>8}  {r['flops']:>9.3g}  {r['flops_attention']:>9.3g}")
    lines += ["", f"total: {_tokens(sum(r['tokens'] for r in rows))} tokens, "
                  f"{sum(r['flops'] for r in rows):.3g} FLOPs by 6ND "
                  f"({sum(r['flops_attention'] for r in rows):.3g} with attention)"]
    seconds = estimate_cpu_seconds(runs)
    if seconds is not None:
        lines.append(
            f"estimated time on a 2-core CPU, one run after another: {seconds / 60:.0f} min "
            f"(README Performance throughput, {RUN_OVERHEAD_S:g} s a run for compiling and "
            "checkpoints, validation at a third of the train cost per token)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# state of a run, records


def make_record(grid: Grid, name: str, cfg: ConfigDict, summary: dict, run_dir: Path) -> dict:
    """The results record of a finished run: N as train counted it (the tokenizer's real
    vocabulary), D the tokens it trained on, FLOPs by 6ND and with attention, and its family
    for the scaling-law fit from the grid's config (`cfg.family`: "isoflop" or
    "data_constrained"; None when the grid set none, and `dvar fit` classifies it by its rule)."""
    from dvar_jax.config import model_dims
    from dvar_jax.scaling.flops import training_flops

    dims = model_dims(cfg.model)
    attention = (dims["n_layers"], cfg.data.seq_len, dims["n_heads"] * dims["head_dim"])
    params, tokens = summary["params"], summary["tokens"]
    return {
        "name": name, "grid": grid.label, "objective": summary["objective"],
        "family": cfg.get("family") or None,
        "params": params,
        "unique_tokens": summary.get("unique_tokens") or cfg.data.unique_tokens,
        "epochs": cfg.data.epochs, "tokens": tokens, "flops": training_flops(params, tokens),
        "flops_attention": training_flops(params, tokens, attention=attention),
        "best_val_loss": summary["best_val_loss"], "final_val_loss": summary["final_val_loss"],
        "best_step": RunDir(run_dir).best_step(), "best_epoch": summary["best_epoch"],
    }


# ------------------------------------------------------------------------------------------------
# running


@dataclass
class SweepResult:
    trained: list[str]  # trained (or resumed) to the end by this call
    skipped: list[str]  # already done and recorded
    recorded: list[str]  # records appended by this call
    failed: list[str]  # stopped by a non-finite loss; the sweep went on
    busy: list[str] = field(default_factory=list)  # trained by another live process: left to it
    preempted: str | None = None  # the run SIGTERM stopped (saved); the sweep stopped there
    commands: list[str] | None = None  # --emit-commands: one line per run not done


def _agreed(decision: bool) -> bool:
    """Process 0's `decision`, on every process of a multi-host sweep: they train each run
    together, so they must skip the same runs even when a file changed between their reads."""
    import jax

    if jax.process_count() == 1:
        return decision
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(decision)))


def _check_startable(grid: Grid, runs: list[tuple[str, ConfigDict]], workdir: Path) -> None:
    """Every check that can fail before any training starts: required values still unset, run
    folders holding another config, and token stores that are missing, unfinished, too small
    or of another tokenizer, a missing bucket or an unwritable folder. ValueError; nothing is
    written."""
    RunDir(workdir).check_writable()
    needed: dict[tuple[str, str], tuple[int, ConfigDict]] = {}
    for name, cfg in runs:
        for key in unset_required(cfg):
            value = cfg
            for part in key.split("."):
                value = value[part]
            raise ValueError(f"grid {grid.label!r} needs a value for {key} (run {name}: "
                             f"{value.strip('<>')}); e.g. dvar sweep run --grid={grid.spec} "
                             f"--config.{key}=VALUE ...")
        if cfg.data.source == "store":
            stores = (cfg.data.train_store, cfg.data.validation_store)
            if planned_unique_tokens(cfg) > needed.get(stores, (0, cfg))[0]:
                needed[stores] = planned_unique_tokens(cfg), cfg
        differences = RunDir(workdir / name).config_differences(cfg)
        if differences:
            raise ValueError(f"{workdir / name} holds run {name} with another config "
                             f"({', '.join(differences)} differ); use another --workdir or "
                             "remove that folder")
    from dvar_jax.data.pipeline import check_stores

    for _, cfg in needed.values():  # the run needing the most of each store
        check_stores(cfg.data)


def command_line(grid: Grid, name: str, workdir: str, results: str | None,
                 overrides: dict[str, Any] | None) -> str:
    """The `dvar sweep run` line that trains and records one run, for a launcher."""
    words = ["dvar", "sweep", "run", f"--grid={grid.spec}", f"--workdir={workdir}",
             f"--only={name}"]
    if results:
        words.append(f"--results={results}")
    words += [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
    return " ".join(shlex.quote(w) for w in words)


def run_sweep(grid: Grid, workdir: str | Path, *, results: str | Path | None = None,
              emit_commands: bool = False, only: str | Iterable[str] | None = None,
              override_config: dict[str, Any] | None = None, progress: bool | None = None,
              log: Callable[[str], None] = print) -> SweepResult:
    """Trains the grid's runs (or those `only` names) one after another in WORKDIR/NAME.

    Done runs (completed, recorded) are skipped; completed but unrecorded ones are recorded
    without training; interrupted ones resume from their checkpoint (train() does); the rest
    train from scratch. After each, one record goes to `results` (default WORKDIR/results.jsonl).
    `override_config` (dotted key -> value) applies to every run. With `emit_commands`, nothing
    is trained: the result's `commands` holds a `dvar sweep run --only=NAME` line per run not
    done. A non-finite loss fails that run and the sweep goes on; SIGTERM stops the sweep after
    the current run saved.
    """
    workdir_text = str(workdir)
    workdir = storage.path(workdir)
    results_path = storage.path(results) if results else sweep_results_path(workdir)
    runs = with_overrides(select(grid, only), override_config)
    _check_startable(grid, runs, workdir)
    recorded = recorded_names(results_path)
    out = SweepResult([], [], [], [])
    if emit_commands:
        out.commands = [command_line(grid, name, workdir_text, str(results) if results else None,
                                     override_config)
                        for name, _ in runs
                        if not (name in recorded and RunDir(workdir / name).finished_summary())]
        return out

    import jax

    from dvar_jax.train import NonFiniteError, train  # heavy: only when training

    writes = jax.process_index() == 0  # one writer of the results, as of each run's files
    for i, (name, cfg) in enumerate(runs, start=1):
        run_dir = workdir / name
        step = f"[{i}/{len(runs)}] {name}"
        summary = RunDir(run_dir).finished_summary()
        if _agreed(summary is not None and name in recorded):
            out.skipped.append(name)
            log(f"{step}: done, skipped")
            continue
        if _agreed(summary is None):
            holder = RunDir(run_dir).holder()
            if _agreed(holder is not None):  # another worker trains it and records it
                holder = holder or {}
                out.busy.append(name)
                log(f"{step}: held by process {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}, skipped")
                continue
            log(f"{step}: {'resuming' if RunDir(run_dir).checkpoints_dir.is_dir() else 'training'}")
            try:
                s = train(cfg, run_dir, progress=progress)
            except NonFiniteError as e:
                out.failed.append(name)
                log(f"{step}: failed: {e}")
                continue
            except RunBusyError as e:  # taken by another worker since the check above
                out.busy.append(name)
                log(f"{step}: skipped: {e}")
                continue
            except ValueError as e:
                raise ValueError(f"run {name}: {e}") from e
            if not s.completed:
                out.preempted = name
                log(f"{step}: stopped by SIGTERM (saved); run the sweep again to go on")
                return out
            out.trained.append(name)
            summary = s._asdict()
        if writes and append_once(results_path,
                                  make_record(grid, name, cfg, summary, run_dir)):
            out.recorded.append(name)
        log(f"{step}: best validation loss {summary['best_val_loss']:.4f}, final "
            f"{summary['final_val_loss']:.4f} -> {results_path}")
    return out
