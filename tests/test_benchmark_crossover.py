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
            ("diffusion-c", _cfg("diffusion", 300))]
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
    assert rows["diffusion-c"]["state"] == "not done" and rows["diffusion-c"]["final_epoch"] == 150
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
