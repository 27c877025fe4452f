"""`dvar curves`: validation loss against epochs per run of a sweep folder."""

import json

import pytest

from dvar_jax.cli import main
from dvar_jax.curves import format_curves, read_curves


def _run(folder, name, points, train_records=2):
    run = folder / name
    run.mkdir(parents=True)
    lines = [{"kind": "train", "step": i, "loss": 5.0} for i in range(train_records)]
    lines += [{"kind": "eval", "step": 10 * (i + 1), "epoch": e, "val_loss": v}
              for i, (e, v) in enumerate(points)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def sweep_dir(tmp_path):
    _run(tmp_path, "ar-orders1", [(1.0, 6.0), (2.0, 5.5), (3.0, 5.8)])
    _run(tmp_path, "ar-orders4", [(1.0, 6.2), (2.0, 5.6), (3.0, 5.4)])
    _run(tmp_path, "not-started", [])
    (tmp_path / "results.jsonl").write_text("")
    return tmp_path


def test_curves_reads_every_evaluated_run_in_name_order(sweep_dir):
    curves = read_curves(sweep_dir)
    assert list(curves) == ["ar-orders1", "ar-orders4"]  # the run without evaluations is left out
    assert curves["ar-orders1"] == [(1.0, 6.0), (2.0, 5.5), (3.0, 5.8)]
    assert list(read_curves(sweep_dir, "*orders4")) == ["ar-orders4"]
    table = format_curves(curves).splitlines()
    # best 5.5 at epoch 2 then climbing to 5.8; the other best at its last epoch
    assert table[1].split() == ["ar-orders1", "5.5000", "2", "5.8000", "3"]
    assert table[2].split() == ["ar-orders4", "5.4000", "3", "5.4000", "3"]


def test_curves_command_writes_the_png(sweep_dir, capsys):
    out = sweep_dir / "plots" / "c.png"
    assert main(["dvar", "curves", f"--workdir={sweep_dir}", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ar-orders4" in capsys.readouterr().out
    assert main(["dvar", "curves", f"--workdir={sweep_dir}"]) == 0
    assert (sweep_dir / "curves.png").is_file()


def test_curves_with_a_pattern_matching_nothing_is_an_error(sweep_dir, capsys):
    assert main(["dvar", "curves", f"--workdir={sweep_dir}", "--only=diffusion*"]) == 2
    assert "no run folder matching --only='diffusion*' with a validation loss" in (
        capsys.readouterr().err)


def test_runs_are_listed_with_numbers_in_order(tmp_path):
    for n in (16, 2, 1):
        _run(tmp_path, f"ar-orders{n}", [(1.0, 6.0)])
    assert list(read_curves(tmp_path)) == ["ar-orders1", "ar-orders2", "ar-orders16"]
