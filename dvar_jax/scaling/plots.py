"""Figures of a sweep and its fitted laws (PNG, one figure a file): the loss-vs-compute Pareto
frontiers per unique-token budget, iso-FLOP loss-vs-epochs curves, the value of repeated data
(D' against D), and the critical-compute line with the measured crossovers.

`records` are results records (`dvar_jax.results.read_records`); `fits` is `fit_laws`'s result
(or any {objective: law} mapping, possibly empty: then only measured points are drawn).
"""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dvar_jax.scaling.flops import FLOPS_CONVENTION
from dvar_jax.scaling.laws import LAW_KEYS, effective_tokens, predicted_loss
from dvar_jax.scaling.planner import (
    OBJECTIVES,
    PUBLISHED_FRONTIER,
    critical_compute,
    format_tokens,
    frontier_compute,
    measured_crossover,
    optimal_allocation,
    pareto_frontier,
)

_COLORS = {"ar": "tab:blue", "diffusion": "tab:red"}
_DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _color(objective: str) -> str:
    return _COLORS.get(objective, "tab:gray")


def _usable(records: Sequence[Mapping], loss_key: str) -> list[Mapping]:
    return [r for r in records if isinstance(r.get(loss_key), int | float)
            and math.isfinite(r[loss_key]) and r[loss_key] > 0]


def unique_budgets(records: Sequence[Mapping], *, min_runs: int = 3) -> list[float]:
    """The unique-token budgets U (tokens, matched to 0.1%) holding at least min_runs
    multi-epoch runs, ascending: the data-constrained settings. Single-epoch isoFLOP runs each
    have their own U = D, and a "data value" split puts one run per objective at each D / E."""
    counts: dict[float, int] = {}
    for r in records:
        u = float(r["unique_tokens"])
        if float(r["epochs"]) > 1 + 1e-9:
            key = next((b for b in counts if abs(u / b - 1) < 1e-3), u)
            counts[key] = counts.get(key, 0) + 1
    return sorted(u for u, n in counts.items() if n >= min_runs)


def _finish(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3, which="both")
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return path


def plot_pareto(records: Sequence[Mapping], fits: Mapping, unique_tokens: float, path: Path, *,
                loss_key: str = "best_val_loss") -> Path:
    """Loss vs FLOPs at one U: every run (dots), each objective's measured Pareto frontier
    (steps), the laws' loss-optimal frontier (dashed) and the crossovers (vertical lines)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    at_u = [r for r in records if abs(float(r["unique_tokens"]) / unique_tokens - 1) < 1e-3]
    all_flops = [float(r["flops"]) for r in at_u]
    for obj in OBJECTIVES:
        runs = [r for r in at_u if r.get("objective") == obj]
        if runs:
            ax.scatter([r["flops"] for r in runs], [r[loss_key] for r in runs], s=10,
                       alpha=0.35, color=_color(obj), label=f"{obj} runs")
        flops, losses = pareto_frontier(records, obj, unique_tokens, loss_key=loss_key)
        if len(flops):
            ax.step(flops, losses, where="post", color=_color(obj), lw=2,
                    label=f"{obj} measured frontier")
        if obj in fits and all_flops:
            grid = np.geomspace(min(all_flops), max(all_flops), 40)
            model = [optimal_allocation(fits[obj], c, unique_tokens)["loss"] for c in grid]
            ax.plot(grid, model, "--", color=_color(obj), label=f"{obj} law (loss-optimal N)")
    crossing = measured_crossover(records, unique_tokens, loss_key=loss_key)
    if math.isfinite(crossing):
        ax.axvline(crossing, color="k", ls=":", label=f"measured crossover {crossing:.2g}")
    if all(obj in fits for obj in OBJECTIVES) and all_flops:
        c_crit = critical_compute(fits, unique_tokens, flops_range=_flops_range(all_flops))
        if math.isfinite(c_crit):
            ax.axvline(c_crit, color="tab:purple", ls="-.", label=f"C_crit from laws {c_crit:.2g}")
    ax.set(xscale="log", xlabel=f"training FLOPs ({FLOPS_CONVENTION})",
           ylabel=f"validation loss ({loss_key}, nats/token)",
           title=f"loss vs compute, U = {format_tokens(unique_tokens)} unique tokens")
    return _finish(fig, ax, path)


def _flops_range(flops: Sequence[float]) -> tuple[float, float]:
    """The FLOPs span of the runs, widened 1000x each way, for C_crit searches."""
    return max(min(flops) / 1e3, 1e3), max(flops) * 1e3


def iso_flop_groups(records: Sequence[Mapping], *, min_epochs: int = 3) -> dict:
    """{(objective, params, tokens): runs by epochs} for runs sharing N and D (within 1%, hence
    FLOPs) across >= min_epochs distinct epoch counts: the study's "data value" runs, one
    compute-optimal (N, D) split into E epochs over D / E unique tokens."""
    groups: dict[tuple[str, float, float], list[Mapping]] = {}
    for r in records:
        n, d = float(r["params"]), float(r["tokens"])
        key = next((k for k in groups if k[0] == r.get("objective")
                    and abs(n / k[1] - 1) < 0.01 and abs(d / k[2] - 1) < 0.01),
                   (str(r.get("objective")), n, d))
        groups.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: float(r["epochs"])) for k, v in groups.items()
            if len({float(r["epochs"]) for r in v}) >= min_epochs}


def plot_iso_flops(records: Sequence[Mapping], fits: Mapping, path: Path, *,
                   loss_key: str = "best_val_loss") -> Path:
    """Loss vs epochs at fixed compute: measured iso-FLOP groups (markers) and the laws at the
    same N and D with U = D / epochs (dashed); with no such runs, the laws alone at three
    compute levels spanning the runs' FLOPs, at each objective's compute-optimal N on fresh
    data."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    groups = iso_flop_groups(records)
    epochs_axis = np.geomspace(1, 1000, 60)
    for (obj, n, d), runs in sorted(groups.items()):
        e = [float(r["epochs"]) for r in runs]
        ax.plot(e, [r[loss_key] for r in runs], "o-", color=_color(obj), alpha=0.8, ms=4,
                label=f"{obj} {6 * n * d:.2g} FLOPs (N = {format_tokens(n)})")
        if obj in fits:
            ax.plot(epochs_axis, predicted_loss(fits[obj], n, d, d / epochs_axis), "--",
                    color=_color(obj), alpha=0.6)
    if not groups:
        flops = [float(r["flops"]) for r in records]
        levels = np.geomspace(min(flops), max(flops), 3) if flops else (1e18, 1e19, 1e20)
        for obj in [o for o in OBJECTIVES if o in fits]:
            for c, style in zip(levels, (":", "--", "-"), strict=True):
                a = optimal_allocation(fits[obj], c, 1e30)  # fresh data: U never binds
                n, d = a["params"], a["tokens"]
                ax.plot(epochs_axis, predicted_loss(fits[obj], n, d, d / epochs_axis), style,
                        color=_color(obj), label=f"{obj} law, {c:.0e} FLOPs")
    if not groups and not fits:
        ax.text(0.5, 0.5, "no iso-FLOP runs and no fitted laws", ha="center",
                transform=ax.transAxes)
    ax.set(xscale="log", xlabel="epochs (D / U, same N and D along a curve)",
           ylabel=f"validation loss ({loss_key}, nats/token)",
           title="iso-FLOP curves: the cost of repeating data (dashed: laws)")
    return _finish(fig, ax, path)


def plot_data_value(fits: Mapping, path: Path) -> Path:
    """Effective vs actual data in epochs: D'/U against D/U per objective, with the fresh-data
    line (D' = D) and each law's ceiling 1 + R_D* (drawn only where it is inside the plotted
    epochs: an undetermined R_D* of 1e50 would flatten every curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    epochs = np.geomspace(1, 2000, 200)
    ax.plot(epochs, epochs, color="k", lw=1, label="fresh data (D' = D)")
    for obj, law in fits.items():
        eff = effective_tokens(law, epochs, 1.0)
        ax.plot(epochs, eff, color=_color(obj), lw=2,
                label=f"{obj}: R_D* = {law['rd_star']:.3g}")
        if 1 + law["rd_star"] <= epochs[-1]:
            ax.axhline(1 + law["rd_star"], color=_color(obj), ls=":", lw=1)
    if not fits:
        ax.text(0.5, 0.5, "no fitted laws", ha="center", transform=ax.transAxes)
    ax.set(xscale="log", yscale="log", xlabel="epochs trained (D / U)",
           ylabel="effective epochs (D' / U)",
           title="value of repeated data (dotted: ceiling 1 + R_D*)")
    return _finish(fig, ax, path)


def plot_critical_compute(records: Sequence[Mapping], fits: Mapping, path: Path, *,
                          loss_key: str = "best_val_loss") -> Path:
    """C_crit against U: from the laws (line, with its fitted log-log frontier), the study's
    published frontier (grey), and the measured crossovers of the Pareto frontiers (stars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    budgets = unique_budgets(records)
    lo_u, hi_u = (min(budgets) / 2, max(budgets) * 2) if budgets else (1e7, 1e9)
    u_axis = np.geomspace(lo_u, hi_u, 12)
    flops = [float(r["flops"]) for r in records]
    c_range = _flops_range(flops) if flops else (1e12, 1e28)
    if all(obj in fits for obj in OBJECTIVES):
        c_crit = np.array([critical_compute(fits, u, flops_range=c_range) for u in u_axis])
        ok = np.isfinite(c_crit)
        if ok.sum() >= 2:
            slope, intercept = np.polyfit(np.log10(c_crit[ok]), np.log10(u_axis[ok] / 1e6), 1)
            ax.plot(u_axis[ok], c_crit[ok], "-", color="tab:purple", lw=2,
                    label=f"laws: log10 U[M] = {slope:.3f} log10 C {'-' if intercept < 0 else '+'} "
                          f"{abs(intercept):.3f}")
        elif ok.sum() == 1:
            ax.plot(u_axis[ok], c_crit[ok], "o", color="tab:purple", label="laws")
    ax.plot(u_axis, [frontier_compute(PUBLISHED_FRONTIER, u) for u in u_axis], color="0.5",
            ls="--", label="study: log10 U[M] = 0.460 log10 C - 7.052")
    measured = [(u, measured_crossover(records, u, loss_key=loss_key)) for u in budgets]
    measured = [(u, c) for u, c in measured if math.isfinite(c)]
    if measured:
        ax.plot(*zip(*measured, strict=True), "*", ms=14, color="tab:orange",
                label="measured crossovers")
    ax.set(xscale="log", yscale="log", xlabel="unique tokens U",
           ylabel=f"critical compute C_crit (FLOPs, {FLOPS_CONVENTION})",
           title="where diffusion overtakes AR")
    return _finish(fig, ax, path)


def write_plots(records: Sequence[Mapping], fits: Mapping | None, out_dir: str | Path, *,
                loss_key: str = "best_val_loss") -> list[Path]:
    """Writes every figure as a PNG under out_dir (created) and returns the paths:
    pareto_U<budget>.png per unique-token budget, isoflop_epochs.png, data_value.png,
    critical_compute.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Laws with a constant that is not a number (R_N* nan: not identifiable) draw no curves.
    fits = {k: v for k, v in (fits or {}).items() if isinstance(v, Mapping)
            and all(isinstance(v.get(c), int | float) and math.isfinite(v[c]) for c in LAW_KEYS)}
    records = _usable(records, loss_key)
    paths = [plot_pareto(records, fits, u, out / f"pareto_U{format_tokens(u)}.png",
                         loss_key=loss_key) for u in unique_budgets(records)]
    paths.append(plot_iso_flops(records, fits, out / "isoflop_epochs.png", loss_key=loss_key))
    paths.append(plot_data_value(fits, out / "data_value.png"))
    paths.append(plot_critical_compute(records, fits, out / "critical_compute.png",
                                       loss_key=loss_key))
    return paths
