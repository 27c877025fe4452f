"""Validation loss against epochs for every run of a sweep folder (`dvar curves`): the study's
ablation figures (Figures 7-8) from any grid's runs.

Reads each WORKDIR/NAME/metrics.jsonl (eval records: epoch, val_loss); writes one PNG with a
line per run and returns a table of the best and last validation loss per run.
"""

import fnmatch
import re
from pathlib import Path

from dvar_jax import storage
from dvar_jax.files import write_atomically
from dvar_jax.run_dir import read_metrics

# (epoch, validation loss) points of one run, in training order.
Curve = list[tuple[float, float]]


def _natural(name: str) -> list:
    """Sort key reading digit runs as numbers: ar-orders2 before ar-orders16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_curves(workdir: str | Path, only: str = "") -> dict[str, Curve]:
    """{run name: its validation curve} for the run folders under `workdir` with at least one
    evaluation, in name order (numbers in names compared as numbers). only: comma-separated
    names or shell patterns (empty = all).

    ValueError when workdir is not a folder, or when no run (or none matching `only`) has an
    evaluation yet.
    """
    root = storage.path(workdir)
    if not root.is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} is not a folder; allowed: a sweep folder "
                         "of run folders (dvar sweep run --workdir=...)")
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    curves = {}
    runs = [p for p in root.iterdir() if (p / "metrics.jsonl").is_file()]
    for run in sorted(runs, key=lambda p: _natural(p.name)):
        if patterns and not any(fnmatch.fnmatchcase(run.name, p) for p in patterns):
            continue
        points = [(r["epoch"], r["val_loss"]) for r in read_metrics(run) if "val_loss" in r]
        if points:
            curves[run.name] = points
    if not curves:
        what = f" matching --only={only!r}" if patterns else ""
        raise ValueError(f"--workdir={str(workdir)!r}: no run folder{what} with a validation "
                         "loss in its metrics.jsonl yet")
    return curves


def format_curves(curves: dict[str, Curve]) -> str:
    """A table: run, best validation loss and its epoch, last validation loss and its epoch."""
    width = max(len("run"), *(len(n) for n in curves))
    lines = [f"{'run':<{width}}  {'best':>8}  {'at epoch':>8}  {'last':>8}  {'at epoch':>8}"]
    for name, points in curves.items():
        best_epoch, best = min(points, key=lambda p: p[1])
        last_epoch, last = points[-1]
        lines.append(f"{name:<{width}}  {best:>8.4f}  {best_epoch:>8.3g}  {last:>8.4f}  "
                     f"{last_epoch:>8.3g}")
    return "\n".join(lines)


def plot_curves(curves: dict[str, Curve], out: str | Path, title: str = "") -> Path:
    """Validation loss against epochs, one line per run, to the PNG `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = storage.path(out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        epochs, losses = zip(*points, strict=True)
        ax.plot(epochs, losses, marker="o", markersize=3, label=name)
    ax.set_xlabel("epochs over the unique tokens")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(title or "validation loss vs epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out
