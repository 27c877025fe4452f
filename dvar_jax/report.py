"""Reports on finished runs: validation curves as a PNG, a markdown summary. Reads only metrics."""

from pathlib import Path

import numpy as np

from dvar_jax.files import write_atomically
from dvar_jax.run_dir import read_metrics


def validation_curve(workdir: Path) -> dict[str, np.ndarray]:
    """epoch, flops, tokens, val_loss arrays (one entry per evaluation) of one run."""
    records = read_metrics(workdir, "eval")
    return {k: np.array([r[k] for r in records], dtype=np.float64)
            for k in ("epoch", "flops", "tokens", "val_loss")}


def plot_curves(runs: dict[str, Path], out_path: Path, title: str = "") -> None:
    """Validation loss against epochs and against training FLOPs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_flops) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = 0.0
    for name, workdir in runs.items():
        c = validation_curve(workdir)
        best = int(np.argmin(c["val_loss"]))
        line, = by_epoch.plot(c["epoch"], c["val_loss"], marker=".", label=name)
        by_epoch.plot(c["epoch"][best], c["val_loss"][best], "*", ms=12, color=line.get_color())
        trained = c["flops"] > 0  # the step-0 point has no place on a log axis
        by_flops.plot(c["flops"][trained], c["val_loss"][trained], marker=".", label=name)
        # The untrained model's ~ln V point would squash the part of the curves that matters.
        top = max(top, float(c["val_loss"][1:].max()) if len(c["val_loss"]) > 1 else 0.0)
    by_epoch.set(xlabel="epochs over the unique tokens", ylabel="validation loss (nats/token)",
                 title="validation loss vs epochs (* = best)")
    if top > 0:
        by_epoch.set_ylim(top=top + 0.1 * (top - by_epoch.get_ylim()[0]))
    by_flops.set(xlabel="training FLOPs (6 N D)", xscale="log", ylabel="validation loss",
                 title="validation loss vs compute")
    for ax in (by_epoch, by_flops):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Through write_atomically: out_path may be on gs://, and a kill leaves no half PNG.
    write_atomically(out_path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def run_table(runs: dict[str, Path]) -> list[dict]:
    """Per run: best and final validation loss, epoch of the best, rise after it, throughput."""
    rows = []
    for name, workdir in runs.items():
        c = validation_curve(workdir)
        best = int(np.argmin(c["val_loss"]))
        train = read_metrics(workdir, "train")
        tok_s = [r["tokens_per_s"] for r in train if isinstance(r["tokens_per_s"], float)]
        mfu = [r["mfu"] for r in train if isinstance(r["mfu"], float)]
        rows.append({
            "run": name, "best_val_loss": c["val_loss"][best], "best_epoch": c["epoch"][best],
            "final_val_loss": c["val_loss"][-1], "final_epoch": c["epoch"][-1],
            "rise_after_best": c["val_loss"][-1] - c["val_loss"][best],
            "tokens_per_s": float(np.median(tok_s)) if tok_s else float("nan"),
            "mfu": float(np.median(mfu)) if mfu else float("nan"),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | best val loss | at epoch | final val loss | at epoch | rise after best "
            "| tokens/s | MFU |\n|---|---|---|---|---|---|---|---|")
    body = [f"| {r['run']} | {r['best_val_loss']:.4f} | {r['best_epoch']:.1f} | "
            f"{r['final_val_loss']:.4f} | {r['final_epoch']:.1f} | {r['rise_after_best']:+.4f} | "
            f"{r['tokens_per_s']:.0f} | {r['mfu']:.2f} |" for r in rows]
    return "\n".join([head, *body])
