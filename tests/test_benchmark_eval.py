"""benchmarks/eval_variance.py and benchmarks/eval_speed.py on the tiny trained runs.

Both run `--quick` in-process on the `trained_runs` fixture (shared with the evaluation tests,
so no extra training). Timings are printed by the scripts, never asserted here.
"""

import math

import pytest
from support import load_benchmark


def test_eval_variance_quick_std_falls_with_k(trained_runs, capsys):
    rows = load_benchmark("eval_variance").main(["--quick", "--workdir",
                                                 str(trained_runs["diffusion"])])
    out = capsys.readouterr().out
    validation = [r for r in rows
                  if r["part"] == "validation" and r["estimator"].startswith("masked counts")]
    sampled = [r for r in rows if r["part"] == "validation" and r["estimator"].startswith("1/p")]
    downstream = [r for r in rows if r["part"] == "downstream"]
    assert [r["num_mc"] for r in validation] == [2, 8]
    assert [r["num_mc"] for r in downstream] == [2, 8]
    # 1/sqrt(K) would halve it; the draws are heavy-tailed, so only the direction is checked.
    assert validation[-1]["empirical_std"] < validation[0]["empirical_std"]
    for row in validation:
        assert math.isfinite(row["estimate"]) and row["empirical_std"] > 0
        # The reported Monte-Carlo standard error describes the spread between seeds.
        assert 0.5 < row["empirical_std"] / row["reported_stderr"] < 2
    # The training loss's form estimates the same ELBO: within 4 combined standard errors.
    assert [r["num_mc"] for r in sampled] == [2, 8]
    for a, b in zip(validation, sampled, strict=True):
        assert abs(a["estimate"] - b["estimate"]) < 4 * math.hypot(
            a["empirical_std"], b["empirical_std"]) / math.sqrt(a["seeds"])
    for row in downstream:
        assert row["requests"] == 4 * row["examples"]
        assert row["empirical_std"] > 0 and 0 <= row["flip_rate"] <= 1
    assert "1/sqrt(K) expect." in out and "argmax flips" in out
    assert "equals evaluate_validation" in out and "variance of the 1/p form" in out


def test_eval_speed_quick_reuses_the_compiled_scorer(trained_runs, capsys):
    rows = load_benchmark("eval_speed").main(["--quick", "--workdir", str(trained_runs["ar"]),
                                     str(trained_runs["diffusion"])])
    out = capsys.readouterr().out
    assert [(r["objective"], r["task"]) for r in rows] == [
        ("ar", "questions"), ("ar", "completions"),
        ("diffusion", "questions"), ("diffusion", "completions")]
    for row in rows:
        assert row["examples_per_s"] > 0 and row["requests_per_s"] > 0 and row["mfu"] > 0
        passes = 1 if row["objective"] == "ar" else 8  # --quick's K
        assert row["forward_passes"] == passes * 32  # 8 examples x 4 choices, 2 full batches
        if row["task"] == "completions":  # same Scorer, same row shape: nothing new to compile
            assert row["traces"] == 0 and row["compiles"] == 0
    assert "examples/s" in out and "MFU" in out and "GFLOP/s" in out


def test_without_workdir_tiny_runs_are_trained_then_removed(trained_runs, tmp_path,
                                                           monkeypatch):
    shared = load_benchmark("eval_variance")
    folders = []

    def fake_train(folder, objectives):  # the real one is the fixture's recipe; skip its cost
        folders.append(folder)
        return {o: trained_runs[o] for o in objectives}

    monkeypatch.setattr(shared, "train_tiny_runs", fake_train)
    runs, cleanup = shared.resolve_runs(None, None, ["ar", "diffusion"])
    assert runs == {"ar": trained_runs["ar"], "diffusion": trained_runs["diffusion"]}
    assert folders[0].is_dir()
    cleanup()
    assert not folders[0].exists()
    kept = tmp_path / "tiny"
    _, cleanup = shared.resolve_runs(None, kept, ["diffusion"])
    cleanup()
    assert folders[1] == kept  # --tiny-dir is the caller's: kept


def test_bad_workdirs_and_options(trained_runs, tmp_path, capsys):
    variance, speed = load_benchmark("eval_variance"), load_benchmark("eval_speed")
    with pytest.raises(SystemExit, match="holds an ar run only; this benchmark needs a diffusion"):
        variance.main(["--workdir", str(trained_runs["ar"])])
    with pytest.raises(ValueError, match="holds no trained run"):
        variance.find_runs([tmp_path])
    with pytest.raises(ValueError, match="has no ar run"):
        speed.main(["--quick", "--workdir", str(trained_runs["diffusion"])])
    with pytest.raises(SystemExit):
        variance.main(["--num-mc", "1", "8"])
    assert "--num-mc 1: allowed integers >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.main(["--examples", "0"])
    assert "--examples=0: allowed >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="task='trivia': allowed questions, completions"):
        variance.made_up_examples(2, "trivia")
