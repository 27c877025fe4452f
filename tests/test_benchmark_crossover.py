"""benchmarks/gpu_crossover.py's reading of finished runs (--collect): AR's and diffusion's best
per U, the gap and the first FLOPs at which a diffusion curve falls below AR's best, checked on
curves written by hand. Nothing is trained here."""

import json

import pytest
from support import load_benchmark

GRID = '''
from dvar_jax.configs.base import get_config


def _cfg(objective, epochs):
    c = get_config()
    c.objective = objective
    c.model.name = "cpu-xs"
    c.data.unique_tokens, c.data.epochs, c.data.seq_len = 20_000, float(epochs), 64
    c.train.batch_size = 8
    return c


def get_grid():
    return [("ar-a", _cfg("ar", 30)), ("diffusion-b", _cfg("diffusion", 300)),
            ("diffusion-c", _cfg("diffusion", 300)), ("ar-d", _cfg("ar", 10))]
'''


def _write_curve(folder, curve, done=True):
    folder.mkdir(parents=True)
    lines = [json.dumps({"kind": "eval", "epoch": e, "val_loss": v, "flops": f})
             for e, v, f in curve]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if done:
        (folder / "summary.json").write_text("{}")


def test_collect_reads_best_losses_gap_and_first_crossing(tmp_path, capsys):
    grid = tmp_path / "grid.py"
    grid.write_text(GRID)
    work = tmp_path / "work"
    _write_curve(work / "ar-a", [(1, 5.0, 1e10), (5, 4.70, 5e10), (30, 6.0, 3e11)])
    # diffusion-b crosses AR's best (4.70) first at 4e12, then overfits; c never crosses
    _write_curve(work / "diffusion-b", [(10, 5.5, 1e11), (100, 4.72, 1e12), (200, 4.65, 4e12),
                                        (300, 4.80, 6e12)])
    _write_curve(work / "diffusion-c", [(10, 5.6, 1e11), (150, 4.90, 2e12)], done=False)
    out = tmp_path / "out"
    rc = load_benchmark("gpu_crossover").main(["--collect", "--grid", str(grid), "--workroot",
                                               str(work), "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    (verdict,) = results["verdicts"]
    assert verdict["unique_tokens"] == 20_000
    assert (verdict["ar_best"], verdict["ar_run"]) == (4.70, "ar-a")
    assert (verdict["diffusion_best"], verdict["diffusion_run"]) == (4.65, "diffusion-b")
    assert verdict["gap"] == pytest.approx(-0.05)
    assert verdict["crossover"] is True and verdict["crossover_flops"] == 4e12
    rows = {r["name"]: r for r in results["runs"]}
    assert rows["diffusion-c"]["state"] == "stopped" and rows["diffusion-c"]["final_epoch"] == 150
    assert rows["ar-d"]["state"] == "not started"  # in the grid, never trained
    assert (rows["ar-a"]["d_model"], rows["ar-a"]["n_layers"]) == (64, 2)  # cpu-xs, by name
    assert rows["ar-a"]["best_epoch"] == 5 and rows["diffusion-b"]["final_val"] == 4.80
    assert (out / "crossover.png").stat().st_size > 0
    assert "| 20,000 | 4.7000 (ar-a) | 4.6500 (diffusion-b)" in capsys.readouterr().out


def test_collect_refuses_a_missing_workroot_or_grid(tmp_path):
    bench = load_benchmark("gpu_crossover")
    grid = tmp_path / "grid.py"
    grid.write_text(GRID)
    with pytest.raises(SystemExit, match=r"--workroot=.*is not a folder"):
        bench.main(["--collect", "--grid", str(grid), "--workroot", str(tmp_path / "none"),
                    "--out", str(tmp_path / "out")])
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit, match=r"--grid=.*is not a file"):
        bench.main(["--collect", "--grid", str(tmp_path / "nogrid.py"), "--workroot",
                    str(tmp_path / "work"), "--out", str(tmp_path / "out")])


def test_a_rescored_best_replaces_the_curve_minimum(tmp_path):
    """A diffusion run whose best checkpoint was re-scored (eval.jsonl, another seed than the
    training evaluation's) is judged by that score: here 4.75, so the curve's 4.65 no longer
    crosses AR's 4.70, and no crossover FLOPs are reported. A record drawn with the training
    evaluation's own seed (0) is not a re-score and is ignored."""
    grid = tmp_path / "grid.py"
    grid.write_text(GRID)
    work = tmp_path / "work"
    _write_curve(work / "ar-a", [(1, 5.0, 1e10), (5, 4.70, 5e10)])
    _write_curve(work / "diffusion-b", [(100, 4.72, 1e12), (200, 4.65, 4e12)])
    _write_curve(work / "diffusion-c", [(150, 4.90, 2e12)])
    records = [{"kind": "eval", "checkpoint": "best", "step": 9, "seed": 0, "num_mc": 64,
                "val_loss": 4.60, "val_loss_stderr": 0.01},
               {"kind": "eval", "checkpoint": "best", "step": 9, "seed": 1, "num_mc": 64,
                "val_loss": 4.75, "val_loss_stderr": 0.01}]
    (work / "diffusion-b" / "eval.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    load_benchmark("gpu_crossover").main(["--collect", "--grid", str(grid), "--workroot",
                                          str(work), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    (verdict,) = results["verdicts"]
    assert (verdict["diffusion_best"], verdict["diffusion_run"]) == (4.75, "diffusion-b")
    assert verdict["diffusion_rescored"] is True
    assert verdict["gap"] == pytest.approx(0.05)
    assert verdict["crossover"] is False and verdict["crossover_flops"] is None
    rows = {r["name"]: r for r in results["runs"]}
    assert rows["diffusion-b"]["best_val"] == 4.65  # the curve's own minimum is still shown
    assert "4.7500 ± 0.0100 (64)" in (out / "results.md").read_text()


def test_rescore_evaluates_the_best_checkpoint_once_with_other_masks(trained_runs, tmp_path):
    """rescore() runs `dvar eval` on a finished diffusion run's best checkpoint at K draws and
    seed 1, appends the record, and skips the run the next time; AR runs are never re-scored."""
    import shutil

    from dvar_jax.eval.loading import saved_config
    bench = load_benchmark("gpu_crossover")
    work = tmp_path / "work"
    runs = []
    for objective in ("ar", "diffusion"):
        shutil.copytree(trained_runs[objective], work / objective)
        (work / objective / "eval.jsonl").unlink(missing_ok=True)
        runs.append((objective, saved_config(work / objective)))
    bench.rescore(runs, work, 2)
    bench.rescore(runs, work, 2)
    (record,) = [json.loads(line) for line in
                 (work / "diffusion" / "eval.jsonl").read_text().splitlines()]
    assert (record["checkpoint"], record["seed"], record["num_mc"]) == ("best", 1, 2)
    assert record["val_loss_stderr"] > 0
    assert not (work / "ar" / "eval.jsonl").exists()
    assert bench.rescore_record(work / "diffusion", runs[1][1]) == record


def test_rescore_is_refused_with_plot_only_or_with_one_draw(tmp_path, capsys):
    bench = load_benchmark("gpu_crossover")
    with pytest.raises(SystemExit):
        bench.main(["--plot-only", "--rescore", "64", "--out", str(tmp_path)])
    assert "--rescore=64: not with --plot-only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--collect", "--rescore", "1", "--out", str(tmp_path)])
    assert "--rescore=1: allowed 0 (off) or K >= 2" in capsys.readouterr().err


def test_figure_labels_name_the_settings_that_differ_from_the_defaults():
    """A run with weight decay 1, the parameter average and stratified levels says so in its
    label; a default run, and a row recorded before these settings were, say nothing."""
    changed = load_benchmark("gpu_crossover").changed_settings
    assert changed({"weight_decay": 1.0, "ema_decay": 0.999,
                    "noise_sampling": "stratified"}) == ", wd 1, avg 0.999, stratified"
    assert changed({"weight_decay": 0.1, "ema_decay": 0.0, "noise_sampling": "independent"}) == ""
    assert changed({}) == ""


def test_seed_groups_and_the_gap_of_their_means_by_hand():
    """Runs that differ only by a "-seedN" suffix form a group (re-scores replace curve minima);
    the gap of the lowest-mean groups and its standard error, against hand arithmetic."""
    bench = load_benchmark("gpu_crossover")
    rows = [
        {"name": "ar-x", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.60},
        {"name": "ar-x-seed2", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.70},
        {"name": "ar-x-seed3", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.65},
        {"name": "ar-y-seed2", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.70},
        {"name": "ar-y-seed3", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.72},
        {"name": "ar-z", "objective": "ar", "unique_tokens": 20_000, "best_val": 4.50},
        {"name": "diffusion-w", "objective": "diffusion", "unique_tokens": 20_000,
         "best_val": 4.00, "rescored_val": 4.65},
        {"name": "diffusion-w-seed2", "objective": "diffusion", "unique_tokens": 20_000,
         "best_val": 4.00, "rescored_val": 4.67},
        {"name": "diffusion-v-seed9", "objective": "diffusion", "unique_tokens": 60_000,
         "best_val": 4.40},
        {"name": "diffusion-u", "objective": "diffusion", "unique_tokens": 20_000},  # no score
        {"name": "diffusion-u-seed2", "objective": "diffusion", "unique_tokens": 20_000,
         "best_val": 4.80},
    ]
    groups = {g["config"]: g for g in bench.seed_groups(rows)}
    assert set(groups) == {"ar-x", "ar-y", "diffusion-w"}  # one seed is no group
    x = groups["ar-x"]
    assert x["n"] == 3 and x["mean"] == pytest.approx(4.65)
    assert x["sd"] == pytest.approx(0.05)  # deviations -0.05, 0.05, 0: sqrt(0.005 / 2)
    assert groups["diffusion-w"]["scores"] == [4.65, 4.67]
    (gap,) = bench.seed_gaps(list(groups.values()))
    assert (gap["ar_config"], gap["diffusion_config"]) == ("ar-x", "diffusion-w")
    assert gap["gap"] == pytest.approx(4.66 - 4.65)
    # diffusion: deviations +-0.01, variance 0.0002 / (2 - 1)
    assert gap["gap_se"] == pytest.approx((0.05 ** 2 / 3 + 0.0002 / 2) ** 0.5)
    assert bench.seeds_markdown([]) == ""
    table = bench.seeds_markdown(bench.seed_groups(rows))
    assert "| ar-x | ar | 20,000 | 3 | 4.6500 | 0.0500 | 4.6000, 4.7000, 4.6500 |" in table
    assert "| 20,000 | +0.0100 |" in table
