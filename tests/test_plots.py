"""Figures of a sweep and its laws (dvar_jax/scaling/plots.py), on synthetic runs from a law."""

import numpy as np

from dvar_jax.scaling.laws import n_opt, predicted_loss
from dvar_jax.scaling.planner import LAW_SETS
from dvar_jax.scaling.plots import iso_flop_groups, unique_budgets, write_plots

LAWS = LAW_SETS["prabhudesai2025"]["laws"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_records() -> list[dict]:
    """Both objectives from the study's law set: single-epoch isoFLOP runs, U = 25M and 100M
    over 1..800 epochs, and "data value" runs splitting one (N, D) into 1..100 epochs."""
    records = []

    def add(obj: str, n: float, u: float, epochs: float) -> None:
        d = u * epochs
        loss = float(predicted_loss(LAWS[obj], n, d, u))
        records.append({"name": f"{obj}-{n:.3g}-{u:.3g}-{epochs}", "objective": obj,
                        "params": n, "unique_tokens": u, "epochs": epochs, "tokens": d,
                        "flops": 6 * n * d, "best_val_loss": loss, "final_val_loss": loss,
                        "best_step": 1})

    for obj in LAWS:
        for c in (1e18, 1e19):
            for n in np.geomspace(2e7, 1e9, 6):
                if n <= n_opt(LAWS[obj], c / (6 * n)):
                    add(obj, float(n), c / (6 * n), 1)
        for u in (25e6, 100e6):
            for n in (1.4e7, 6.5e7, 2.2e8, 8.6e8):
                for e in (1, 4, 16, 64, 200, 800):
                    add(obj, n, u, e)
        n, d = 2.2e8, 7.6e9
        for e in (1, 2, 4, 10, 20, 50, 100):
            add(obj, n, d / e, e)
    return records


def test_write_plots_one_valid_png_per_figure(tmp_path):
    records = synthetic_records()
    assert unique_budgets(records) == [25e6, 100e6]  # not the data-value runs' D / E
    assert len(iso_flop_groups(records)) == 2  # the data-value runs of each objective
    paths = write_plots(records, LAWS, tmp_path / "plots")
    names = [p.name for p in paths]
    assert names == ["pareto_U25M.png", "pareto_U100M.png", "isoflop_epochs.png",
                     "data_value.png", "critical_compute.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC, p.name
        assert len(data) > 10_000, (p.name, len(data))
    assert sorted(tmp_path.joinpath("plots").iterdir()) == sorted(paths)


def test_write_plots_without_laws_or_groups(tmp_path):
    """No fits and no iso-FLOP groups: the same files, measured points only."""
    records = [r for r in synthetic_records() if r["unique_tokens"] in (25e6, 100e6)]
    paths = write_plots(records, {}, tmp_path)
    assert [p.name for p in paths] == ["pareto_U25M.png", "pareto_U100M.png",
                                       "isoflop_epochs.png", "data_value.png",
                                       "critical_compute.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000, p.name


def test_an_undetermined_half_life_does_not_flatten_the_data_value_plot(tmp_path, monkeypatch):
    """A fit that runs R_D* to its edge (1e50, as the CPU grid's diffusion) keeps the y axis on
    the plotted epochs: its ceiling line is left out, the finite one drawn."""
    from dvar_jax.scaling import plots

    seen = {}

    def keep_axes(fig, ax, path):
        seen["ylim"], seen["lines"] = ax.get_ylim(), len(ax.get_lines())
        return path

    monkeypatch.setattr(plots, "_finish", keep_axes)
    laws = {"ar": {**LAWS["ar"], "rd_star": 7.2}, "diffusion": {**LAWS["diffusion"],
                                                               "rd_star": 2.4e50}}
    plots.plot_data_value(laws, tmp_path / "v.png")
    assert seen["ylim"][1] < 1e5
    assert seen["lines"] == 1 + 2 + 1  # fresh data, two laws, AR's ceiling only
