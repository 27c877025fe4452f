"""Grids (configs/grids/), the sweep runner (dvar_jax/sweep.py) and the `dvar sweep`, `dvar fit`
and `dvar plan` command lines."""

import json
import os
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from configs.grids import paper, small
from dvar_jax import sweep
from dvar_jax.cli import main
from dvar_jax.config import validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.scaling.flops import training_flops
from dvar_jax.sweep import Grid, list_runs, load_grid, run_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper_grid():
    return load_grid("paper")


@pytest.fixture(scope="module")
def paper_rows(paper_grid):
    return {r["name"]: r for r in list_runs(paper_grid)}


# ------------------------------------------------------------------------------------------------
# the paper grid


def test_paper_grid_has_200_distinct_complete_runs(paper_grid):
    names = [name for name, _ in paper_grid.runs]
    assert len(names) >= 200 and len(set(names)) == len(names)
    for name, cfg in paper_grid.runs:
        validate_config(cfg)  # complete configs (load_grid checked them too)
        assert set(cfg.keys()) == set(get_config().keys())
        assert name.startswith(f"{cfg.objective}-{cfg.model.name}-")
        assert cfg.data.source == "store"
        assert cfg.data.train_store.startswith("<required: --config.data.train_store=")
        assert (cfg.data.seq_len, cfg.train.batch_size, cfg.data.vocab_size) == (2048, 256, 50257)
    objectives = [cfg.objective for _, cfg in paper_grid.runs]
    assert objectives.count("ar") == objectives.count("diffusion")
    assert {cfg.data.epochs for _, cfg in paper_grid.runs} >= {1, 50, 500, 800}
    assert {"ar-7M-U25M-E1", "diffusion-2639M-U100M-E800", "ar-140M-U100M-E50",
            "diffusion-425M-U100M-E500"} <= set(names)


def test_paper_grid_names_are_stable():
    assert [n for n, _ in paper.get_grid()] == [n for n, _ in paper.get_grid()]


def test_flops_of_a_named_run_are_6nd(paper_rows):
    ar = paper_rows["ar-140M-U100M-E50"]  # the study's best AR (PAPER.md §4.1)
    assert ar["flops"] == training_flops(ar["params"], ar["tokens"])
    assert ar["flops"] == pytest.approx(6 * ar["params"] * ar["tokens"], rel=1e-12)
    assert f"{ar['flops']:.3g}" == "4.34e+18"
    assert ar["flops_attention"] > ar["flops"]
    mdm = paper_rows["diffusion-425M-U100M-E500"]
    assert f"{mdm['flops']:.3g}" == "1.25e+20"


@pytest.mark.parametrize("flops", paper.ISO_FLOPS)
def test_isoflop_runs_are_single_epoch_on_fresh_data_at_their_budget(paper_rows, flops):
    label = f"C{flops:.0e}".replace("e+", "e")
    rows = [r for n, r in paper_rows.items() if n.endswith(f"-{label}-E1")]
    assert len(rows) >= 2 * 5  # at least 5 sizes per objective
    for r in rows:
        assert r["epochs"] == 1
        assert r["flops"] == pytest.approx(flops, rel=1e-3)  # D = C / 6N, less a partial batch


def test_data_value_runs_split_the_optimal_tokens_into_epochs(paper_rows):
    for flops, sizes in paper.OPTIMAL_SIZE.items():
        label = f"C{flops:.0e}".replace("e+", "e")
        for objective, size in sizes.items():
            rows = [paper_rows[f"{objective}-{size}-{label}-E{e}"]
                    for e in paper.DATA_VALUE_EPOCHS]
            for r, epochs in zip(rows, paper.DATA_VALUE_EPOCHS, strict=True):
                assert r["epochs"] == epochs
                assert r["unique_tokens"] == pytest.approx(rows[0]["unique_tokens"] / epochs,
                                                           abs=1)
                assert r["flops"] == pytest.approx(flops, rel=1e-3)
    # The study's compute-optimal diffusion model at 1e19 (117M, D = 13.48B; PAPER.md §4.2).
    assert paper_rows["diffusion-117M-C1e19-E1"]["tokens"] == pytest.approx(13.48e9, rel=1e-3)


def test_paper_grid_families_follow_the_study_protocol(paper_grid):
    """isoFLOP runs (and a data-value series' one-epoch run, the same run) are "isoflop": one
    epoch on fresh data; every multi-epoch series run, E = 1 included, and the data-value runs
    over more epochs are "data_constrained"."""
    families = {name: cfg.family for name, cfg in paper_grid.runs}
    for name, cfg in paper_grid.runs:
        budget = name.split("-")[2]
        if budget.startswith("U"):
            assert cfg.family == "data_constrained", name
        else:
            assert budget.startswith("C")
            assert cfg.family == ("isoflop" if cfg.data.epochs == 1 else "data_constrained"), name
    assert families["ar-7M-U25M-E1"] == families["ar-140M-U100M-E1"] == "data_constrained"
    assert families["ar-217M-C1e19-E1"] == "isoflop"  # isoFLOP and data-value run at once
    iso = [cfg for _, cfg in paper_grid.runs if cfg.family == "isoflop"]
    assert len(iso) >= 2 * 5 * len(paper.ISO_FLOPS)


def test_make_record_writes_the_grid_family(tmp_path):
    """The record's family is the config's (set by the grid's add_run); None when unset."""
    small_grid = load_grid("small")
    name, cfg = next((n, c) for n, c in small_grid.runs if n == "ar-cpu-s-U600k-E1")
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps(
        {"kind": "eval", "step": 7, "epoch": 1.0, "val_loss": 5.0}) + "\n")
    summary = {"objective": "ar", "params": 1_300_000, "tokens": 60_000, "unique_tokens": 60_000,
               "best_val_loss": 5.0, "final_val_loss": 5.1, "best_epoch": 1.0}
    record = sweep.make_record(small_grid, name, cfg, summary, run_dir)
    assert record["family"] == "isoflop" and record["best_step"] == 7
    series = dict(small_grid.runs)["ar-cpu-s-U20k-E10"]
    assert sweep.make_record(small_grid, name, series, summary, run_dir)["family"] == \
        "data_constrained"
    unset = cfg.copy_and_resolve_references()
    unset.family = ""  # a grid that names no family
    assert sweep.make_record(small_grid, name, unset, summary, run_dir)["family"] is None


def test_add_run_family_is_checked_and_one_run_has_one_family():
    from dvar_jax.configs.grids import add_run

    grid = {}
    add_run(grid, "r", get_config(), family="isoflop")
    assert grid["r"].family == "isoflop"
    with pytest.raises(ValueError, match=r"grid run 's': family='fresh'; allowed 'isoflop', "
                                         r"'data_constrained'"):
        add_run(grid, "s", get_config(), family="fresh")
    with pytest.raises(ValueError, match="defined twice with different configs"):
        add_run(grid, "r", get_config(), family="data_constrained")


def test_config_family_is_validated():
    cfg = get_config()
    cfg.family = "fresh"
    with pytest.raises(ValueError, match=r"family='fresh': allowed 'isoflop', "
                                         r"'data_constrained' or '' \(none\)"):
        validate_config(cfg)
    cfg.family, cfg.data.epochs = "isoflop", 4.0
    with pytest.raises(ValueError, match=r"family='isoflop' with data.epochs=4.0: an isoFLOP run "
                                         r"is one epoch on fresh data"):
        validate_config(cfg)


# ------------------------------------------------------------------------------------------------
# the small grid


def test_small_grid_covers_the_design_within_90_minutes_of_cpu():
    """Issue 17: at least 4 sizes, fresh budgets spanning a decade, 100 epochs of the smallest U,
    a step floor on every cell, and an estimate inside `make grid-demo`'s 90 minutes."""
    grid = load_grid("small")
    configs = [cfg for _, cfg in grid.runs]
    assert {c.objective for c in configs} == {"ar", "diffusion"}
    assert {c.model.name for c in configs} == set(small.SIZES) and len(small.SIZES) >= 4
    assert all(c.data.source == "shakespeare" for c in configs)
    multi = [c for c in configs if c.family == "data_constrained"]
    assert {c.data.unique_tokens for c in multi} == set(small.DATA_CONSTRAINED)
    assert len(multi) == 2 * len(small.SIZES) * sum(map(len, small.DATA_CONSTRAINED.values()))
    smallest = min(small.DATA_CONSTRAINED)
    assert max(c.data.epochs for c in multi if c.data.unique_tokens == smallest) >= 100
    for unique in small.DATA_CONSTRAINED:  # the batch scales with U, not with the epochs
        assert len({c.train.batch_size for c in multi if c.data.unique_tokens == unique}) == 1
    # Step 1 of the fit: one epoch on fresh data at every size, at D no multi-epoch U has.
    iso = [c for c in configs if c.family == "isoflop"]
    assert {c.model.name for c in iso} == set(small.SIZES)
    assert {c.data.epochs for c in iso} == {1}
    assert {c.data.unique_tokens for c in iso} == set(small.FRESH_TOKENS)
    assert max(small.FRESH_TOKENS) >= 10 * min(small.FRESH_TOKENS)
    assert not set(small.FRESH_TOKENS) & set(small.DATA_CONSTRAINED)
    assert len(iso) + len(multi) == len(configs)
    assert min(sweep.num_steps(c) for c in configs) >= small.MIN_STEPS
    seconds = sweep.estimate_cpu_seconds(grid.runs)
    assert seconds is not None and seconds < 90 * 60


def test_small_grid_smallest_cell_hand_computed():
    # 190,000 fresh tokens are 2,968 windows of 64 (the first token of each next window is the
    # last target): 371 steps of 8; U = 20k at 10 epochs is 312 windows x 10 / 8 = 390 steps.
    steps = {name: sweep.num_steps(cfg) for name, cfg in small.get_grid()}
    assert min(steps.values()) == 371 == steps["diffusion-cpu-xxs-U190k-E1"]
    assert steps["ar-cpu-s-U20k-E10"] == 390
    assert small.MIN_STEPS <= 371
    cfg = dict(small.get_grid())["diffusion-cpu-s-U20k-E100"]
    assert (cfg.data.vocab_size, cfg.data.tokenizer_type, cfg.train.batch_size) == (1024, "bpe", 8)
    assert cfg.eval.every_epochs == 1.0 and cfg.data.validation_tokens == 8192


def test_small_grid_estimate_is_printed(capsys):
    assert main(["dvar", "sweep", "list", "--grid=small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"grid small: {len(small.get_grid())} runs")
    assert "6ND: C = 6 N D" in out and "+attn: C = 6 N D + 12 L S w D" in out
    assert "estimated time on a 2-core CPU" in out
    minutes = int(out.split("one run after another: ")[1].split(" min")[0])
    assert minutes < 90


# ------------------------------------------------------------------------------------------------
# loading and selecting


def test_load_grid_from_a_file_with_bare_configs(tmp_path):
    f = tmp_path / "mygrid.py"
    f.write_text("from dvar_jax.configs.base import get_config\n"
                 "def get_grid():\n"
                 "    c = get_config()\n"
                 "    c.model.name = 'cpu-xs'\n"
                 "    return [c]\n")
    grid = load_grid(str(f))
    assert grid.label == "mygrid" and [n for n, _ in grid.runs] == ["ar-cpu-xs-U1M-E4"]


@pytest.mark.parametrize("body, message", [
    ("x = 1\n", "defines no get_grid()"),
    ("def get_grid():\n    return []\n", "returned no runs"),
    ("def get_grid():\n    return [1]\n", "returned a int"),
    ("from dvar_jax.configs.base import get_config\n"
     "def get_grid():\n    return [('a', get_config()), ('a', get_config())]\n", "appears twice"),
    ("from dvar_jax.configs.base import get_config\n"
     "def get_grid():\n    return [('a b', get_config())]\n", "is not a folder name"),
    ("from dvar_jax.configs.base import get_config\n"
     "def get_grid():\n    c = get_config()\n    c.data.epochs = 0.0\n    return [('a', c)]\n",
     "run a: invalid config: data.epochs=0.0"),
    ("from dvar_jax.configs.base import get_config\n"
     "def get_grid():\n    c = get_config()\n    c.data.unique_tokens = 1000\n"
     "    return [('a', c)]\n", "less than one batch"),
])
def test_bad_grid_files_are_named(tmp_path, body, message):
    f = tmp_path / "bad.py"
    f.write_text(body)
    with pytest.raises(ValueError) as e:
        load_grid(str(f))
    assert message in str(e.value)


def test_only_selects_names_and_patterns(paper_grid):
    assert [n for n, _ in sweep.select(paper_grid, "ar-140M-U100M-E50")] == ["ar-140M-U100M-E50"]
    picked = sweep.select(paper_grid, "ar-*-U100M-E800,diffusion-7M-U25M-E1")
    assert len(picked) == len(paper.SIZES) + 1
    with pytest.raises(ValueError, match="--only='nope' matches no run of grid 'paper'"):
        sweep.select(paper_grid, "ar-7M-U25M-E1,nope")


# ------------------------------------------------------------------------------------------------
# running a micro grid


def micro_config(data_cfg, objective: str, epochs: float):
    cfg = get_config()
    cfg.objective = objective
    cfg.data = data_cfg.copy_and_resolve_references()
    cfg.model.name = "cpu-xs"
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.unique_tokens, cfg.data.epochs, cfg.data.seq_len = 2_000, float(epochs), 32
    cfg.data.validation_tokens = 500
    cfg.train.batch_size, cfg.train.peak_lr, cfg.train.log_every = 8, 3e-3, 5
    cfg.eval.every_epochs, cfg.eval.num_mc = 1.0, 2
    return cfg


@pytest.fixture
def micro_grid(text_data_cfg):
    runs = (("ar-E1", micro_config(text_data_cfg, "ar", 1)),
            ("ar-E2", micro_config(text_data_cfg, "ar", 2)),
            ("diffusion-E1", micro_config(text_data_cfg, "diffusion", 1)))
    return Grid("micro", "micro", runs)


def test_a_run_another_worker_holds_is_skipped_and_left_to_it(micro_grid, tmp_path):
    """A sweep worker leaves alone a run that another live process trains (its lock), and
    records nothing for it; the held run is also refused to `train` directly."""
    from dvar_jax.run_dir import RunBusyError, RunDir
    from dvar_jax.train import train

    workdir = tmp_path / "sweep"
    only = ["ar-E1"]
    lines = []
    with RunDir(workdir / "ar-E1").hold():
        r = run_sweep(micro_grid, workdir, only=only, log=lines.append)
        assert r.busy == ["ar-E1"] and not r.trained and not r.recorded
        assert f"held by process {os.getpid()} on host" in lines[-1]
        with pytest.raises(RunBusyError, match=rf"is being trained by process {os.getpid()}"):
            train(micro_grid.runs[0][1], workdir / "ar-E1")
    assert not (workdir / "results.jsonl").exists()
    assert sorted(p.name for p in (workdir / "ar-E1").iterdir()) == ["run.lock"]


@contextmanager
def _preempted_at_once():
    """Stands in for train's SIGTERM flag: set from the start, so a run saves after its first
    step and stops, as a preempted TPU VM's would."""
    yield [True]


@pytest.mark.slow
def test_run_sweep_trains_records_once_skips_and_resumes(micro_grid, tmp_path, monkeypatch):
    import dvar_jax.train

    workdir = tmp_path / "sweep"
    results = workdir / "results.jsonl"
    names = [n for n, _ in micro_grid.runs]

    # Interrupted: the first run is cut off after one step; the sweep stops there.
    monkeypatch.setattr(dvar_jax.train, "_sigterm_flag", _preempted_at_once)
    lines = []
    r = run_sweep(micro_grid, workdir, log=lines.append)
    assert r.preempted == "ar-E1" and r.trained == [] and not results.exists()
    assert (workdir / "ar-E1" / "checkpoints").is_dir()
    assert not (workdir / "ar-E1" / "summary.json").exists()
    monkeypatch.undo()

    # --emit-commands: one command per unfinished run, nothing trained.
    r = run_sweep(micro_grid, workdir, emit_commands=True, override_config={"seed": 1234})
    assert len(r.commands) == 3
    for name, line in zip(names, r.commands, strict=True):
        words = shlex.split(line)
        assert words[:3] == ["dvar", "sweep", "run"] and f"--only={name}" in words
        assert f"--workdir={workdir}" in words and "--config.seed=1234" in words

    # The rest: the cut-off run resumes, the others train; one record each.
    lines = []
    r = run_sweep(micro_grid, workdir, log=lines.append)
    assert r.trained == names and r.recorded == names and r.preempted is None
    assert "[1/3] ar-E1: resuming" in lines and "[2/3] ar-E2: training" in lines
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [rec["name"] for rec in records] == names
    for rec, (name, cfg) in zip(records, micro_grid.runs, strict=True):
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert rec["objective"] == cfg.objective and rec["epochs"] == cfg.data.epochs
        assert rec["unique_tokens"] == 2_000 and rec["grid"] == "micro"
        assert rec["family"] is None  # the micro grid names no family: dvar fit's rule decides
        assert rec["tokens"] == summary["tokens"] == sweep.num_steps(cfg) * 8 * 32
        assert rec["flops"] == pytest.approx(6 * rec["params"] * rec["tokens"], rel=1e-12)
        assert rec["flops_attention"] > rec["flops"]
        assert rec["best_val_loss"] == summary["best_val_loss"] <= rec["final_val_loss"]
        evals = [json.loads(x) for x in (workdir / name / "metrics.jsonl").read_text().splitlines()]
        best = min((e for e in evals if e["kind"] == "eval"), key=lambda e: e["val_loss"])
        assert rec["best_step"] == best["step"]

    # Again: everything is done; nothing trains, nothing is appended.
    before = results.read_bytes()
    r = run_sweep(micro_grid, workdir, log=lines.append)
    assert r.skipped == names and r.trained == r.recorded == []
    assert results.read_bytes() == before
    assert run_sweep(micro_grid, workdir, emit_commands=True).commands == []

    # Finished but unrecorded (another results file): recorded without training.
    other = tmp_path / "other.jsonl"
    r = run_sweep(micro_grid, workdir, results=other, log=lines.append)
    assert r.trained == [] and r.recorded == names
    assert [json.loads(x) for x in other.read_text().splitlines()] == records

    # A changed run-defining key is refused before anything runs.
    with pytest.raises(ValueError, match=r"holds run ar-E1 with another config .*seed"):
        run_sweep(micro_grid, workdir, override_config={"seed": 7})
    assert results.read_bytes() == before


def test_a_required_value_left_unset_is_refused(paper_grid, tmp_path):
    with pytest.raises(ValueError, match=r"grid 'paper' needs a value for data.train_store .*"
                                         r"--config.data.train_store=VALUE"):
        run_sweep(paper_grid, tmp_path / "w", only="ar-7M-U25M-E1")
    assert not (tmp_path / "w").exists()


def test_paper_grid_refuses_until_the_stores_exist_and_hold_u(paper_grid, tmp_path,
                                                              text_corpus_dir):
    """Stores missing, then too small for U = 25M: one clear error each, nothing trained."""
    from dvar_jax.data.corpus import SourceSpec, iter_documents
    from dvar_jax.data.prepare import prepare_store
    from dvar_jax.data.tokenizer import open_tokenizer, train_sentencepiece

    stores = {"data.train_store": str(tmp_path / "train"),
              "data.validation_store": str(tmp_path / "validation")}
    with pytest.raises(ValueError, match=r"train is not a token store .*dvar prepare"):
        run_sweep(paper_grid, tmp_path / "w", only="ar-7M-U25M-E1", override_config=stores)
    source = SourceSpec("text", "all", path=str(text_corpus_dir))
    (tmp_path / "t.model").write_bytes(train_sentencepiece(iter_documents(source), 400, "bpe"))
    tokenizer = open_tokenizer(tmp_path / "t.model")
    for split in ("train", "validation"):
        prepare_store(source, tokenizer, tmp_path / split, workers=1, log=lambda line: None)
    with pytest.raises(ValueError, match=r"data.vocab_size=50257; set data.vocab_size=400"):
        run_sweep(paper_grid, tmp_path / "w", only="ar-7M-U25M-E1", override_config=stores)
    with pytest.raises(ValueError, match=r"data.unique_tokens=25,000,000 exceeds the [\d,]+ "
                                         r"tokens of .*train"):
        run_sweep(paper_grid, tmp_path / "w", only="ar-7M-U25M-E1",
                  override_config={**stores, "data.vocab_size": 400})
    assert not (tmp_path / "w").exists()


_APPENDER = """
import sys
from dvar_jax.results import append_once
path, tag = sys.argv[1], sys.argv[2]
for i in range(40):
    append_once(path, {"name": f"run-{i}", "writer": tag, "pad": "x" * 5000})
"""


def test_concurrent_sweeps_append_each_record_once(tmp_path):
    path = tmp_path / "results.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), str(k)], cwd=ROOT)
             for k in range(4)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["name"] for r in records) == sorted(f"run-{i}" for i in range(40))


def test_concurrent_sweeps_on_gcs_append_each_record_once(gcs_bucket, gcs_emulator):
    """The same four processes on a gs:// results file (the GCS emulator): no flock there, a
    generation precondition on each rewrite instead."""
    from dvar_jax.results import read_records

    path = f"{gcs_bucket}/sweep/results.jsonl"
    env = {**os.environ, **gcs_emulator.env}
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, path, str(k)], cwd=ROOT, env=env)
             for k in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert sorted(r["name"] for r in read_records(path)) == sorted(f"run-{i}" for i in range(40))


# ------------------------------------------------------------------------------------------------
# command lines


def test_sweep_run_emit_commands_from_the_command_line(tmp_path, capsys):
    argv = ["dvar", "sweep", "run", "--grid=small", f"--workdir={tmp_path / 'w'}",
            "--only=ar-cpu-xs-*", "--emit-commands", "--config.train.log_every=7"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [n for n, _ in small.get_grid() if n.startswith("ar-cpu-xs-")]
    assert [shlex.split(line)[5] for line in lines] == [f"--only={n}" for n in expected]
    assert all(line.endswith("--config.train.log_every=7") for line in lines)
    assert not (tmp_path / "w").exists()


def test_sweep_list_applies_overrides(capsys):
    argv = ["dvar", "sweep", "list", "--grid=small", "--only=ar-cpu-s-U20k-E30",
            "--config.train.batch_size=16"]
    assert main(argv) == 0
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()
              if line.startswith("ar-cpu-s-U20k-E30 ")]
    assert row[5] == "585"  # steps: 30 epochs x 312 windows of 64 tokens / batch 16


@pytest.mark.parametrize("sub, words", [
    (["sweep", "list"], ["--grid", "--only", "--config.KEY=VALUE", "default: required",
                         "--config.data.path=''"]),
    (["sweep", "run"], ["--grid", "--workdir", "--only", "--results", "--emit_commands",
                        "--progress", "WORKDIR/results.jsonl"]),
    (["fit"], ["--results", "--plots", "--bootstrap", "--tie_alpha_beta", "--loss_key",
               "default: best_val_loss", "default: 0", "default: False"]),
    (["plan"], ["--unique_tokens", "--flops", "--laws", "default: prabhudesai2025",
                "--results"]),
])
def test_help_lists_options_and_defaults(sub, words, capsys):
    assert main(["dvar", *sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dvar {' '.join(sub)} [--flags]")
    for word in words:
        assert word in out, word


def test_sweep_help_lists_the_actions(capsys):
    assert main(["dvar", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dvar sweep ACTION") and "  list " in out and "  run " in out


def test_top_level_usage_lists_the_new_subcommands(capsys):
    assert main(["dvar", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("sweep list", "sweep run", "fit", "plan"):
        assert f"  {name} " in out


BAD = [
    (["sweep"], "dvar sweep: choose an action: list or run"),
    (["sweep", "frob"], "unknown action 'frob'; choose one of: list, run"),
    (["sweep", "--grid=small"], "dvar sweep: choose an action: list or run"),
    (["sweep", "list"], "--grid is required"),
    (["sweep", "list", "--grid=nope"],
     "--grid='nope' is not a known grid; allowed: crossover_cpu, paper, small"),
    (["sweep", "list", "--grid=no/such.py"], "--grid='no/such.py': no such file"),
    (["sweep", "list", "--grid=small", "--bogus"], "`dvar sweep list --help` lists the flags"),
    (["sweep", "list", "--grid=small", "--config=configs/demo.py"],
     "--config=FILE does not apply here"),
    (["sweep", "list", "--grid=small", "--only=zzz"], "--only='zzz' matches no run"),
    (["sweep", "run", "--grid=small"], "--workdir is required"),
    (["sweep", "run", "--grid=small", "--workdir=W", "--bogus=1"],
     "Unknown command line flag 'bogus'"),
    (["sweep", "run", "--grid=small", "--workdir=W", "--config.nosuch=1"],
     "unknown config key '--config.nosuch'"),
    (["sweep", "run", "--grid=small", "--workdir=W", "--config.data.epochs=many"],
     "--config.data.epochs='many' is not a float"),
    (["sweep", "run", "--grid=small", "--workdir=W", "--emit_commands=maybe"],
     "--emit_commands"),
    (["sweep", "run", "--grid=paper", "--workdir=W", "--only=ar-7M-U25M-E1"],
     "needs a value for data.train_store"),
    (["fit"], "--results is required"),
    (["fit", "--results=/no/such.jsonl"], "--results='/no/such.jsonl': no such file"),
    (["fit", "--results=R", "--bootstrap=lots"], "flag --bootstrap=lots"),
    (["fit", "--results=R", "--bootstrap=-1"], "--bootstrap=-1: must be >= 0"),
    (["fit", "--results=R", "--loss_key=val"], "--loss_key='val': allowed best_val_loss"),
    (["plan", "--flops=1e20"], "--unique_tokens is required"),
    (["plan", "--unique_tokens=100M", "--flops=lots"], "--flops='lots' is not a positive number"),
    (["plan", "--unique-tokens=-5", "--flops=1e20"],
     "--unique_tokens='-5' is not a positive number"),
    (["plan", "--unique_tokens=100M", "--flops=0"], "--flops='0' is not a positive number"),
    (["plan", "--unique_tokens=100M", "--flops=1e20", "--laws=x", "--results=R"],
     "exclude each other"),
    (["plan", "--unique_tokens=100M", "--flops=1e20", "--nope"], "dvar plan --help"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_naming_them(argv, message, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text('{"name": "x"}\n')
    argv = [a.replace("=W", f"={tmp_path / 'w'}").replace("=R", f"={results}") for a in argv]
    assert main(["dvar", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""
    assert not (tmp_path / "w").exists()


def _fit_records() -> list[dict]:
    from test_laws import make_records

    return [dict(r, family="isoflop" if r["epochs"] == 1 else "data_constrained")
            for r in make_records()]


@pytest.mark.parametrize("change, message", [
    (lambda rs: [dict(rs[0], name="bad", family="fresh"), *rs[1:]],
     "dvar fit: record 'bad': family = 'fresh'; allowed 'isoflop', 'data_constrained'"),
    (lambda rs: [dict(r, family="isoflop") if r["epochs"] > 1 else r for r in rs],
     "family = 'isoflop' with epochs = 2; an isoFLOP run is one epoch on fresh data"),
    (lambda rs: [r for r in rs if r["family"] == "data_constrained"] + rs[:4],
     "step 1 (Chinchilla constants a, b, e, alpha) needs at least 5 isoFLOP runs (family "
     "'isoflop': one epoch on fresh data"),
    (lambda rs: [r for r in rs if r["family"] == "isoflop"] + rs[-2:],
     "step 2 (R_D*, R_N*) needs at least 3 data-constrained runs (family 'data_constrained'"),
], ids=["unknown-family", "isoflop-over-epochs", "too-few-isoflop", "too-few-data-constrained"])
def test_fit_with_bad_families_exits_2_naming_them(change, message, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in change(_fit_records())))
    assert main(["dvar", "fit", f"--results={results}", "--tie_alpha_beta"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_plan_with_an_unknown_law_set_lists_the_known_ones(capsys):
    planner = pytest.importorskip("dvar_jax.scaling.planner")
    assert main(["dvar", "plan", "--unique_tokens=100M", "--flops=1e20", "--laws=nope"]) == 2
    err = capsys.readouterr().err
    assert "--laws='nope' is not a known law set" in err
    assert all(name in err for name in planner.LAW_SETS)


def test_amounts_take_suffixes():
    from dvar_jax.cli import _amount

    assert _amount("u", "100M") == 1e8 and _amount("u", "1e20") == 1e20
    assert _amount("u", "25_000_000") == 25e6 and _amount("u", "2.5k") == 2500


# ------------------------------------------------------------------------------------------------
# the ablation grids (configs/ablations/)


@pytest.mark.parametrize("cpu", [False, True], ids=["study", "cpu"])
def test_ablation_grids_set_the_studys_options(cpu):
    """Each ablation grid loads by name (`ablations/NAME`, `-cpu`), trains its setting on one
    shared run (same size, U and epochs) plus the plain references, and sets exactly the
    option its name says. The study's: AR 140M x 50 epochs of 100M (orderings: 278M x 100)."""
    suffix = "-cpu" if cpu else ""
    assert f"ablations/orderings{suffix}" in sweep.grid_names()
    grids = {name: dict(load_grid(f"ablations/{name}{suffix}").runs)
             for name in ("attention_dropout", "token_masking", "orderings", "block_diffusion")}
    for runs in grids.values():
        shapes = {(c.model.name, c.data.unique_tokens, c.data.epochs) for c in runs.values()}
        assert len(shapes) == 1, shapes
    shape = next(iter({(c.model.name, c.data.unique_tokens, c.data.epochs)
                       for c in grids["token_masking"].values()}))
    assert shape == (("cpu-s", 10_000, 100.0) if cpu else ("140M", 100_000_000, 50.0))
    if cpu:  # the AR ablations share one run, many epochs and enough steps; block diffusion
        # keeps the run of its README table
        for name in ("attention_dropout", "token_masking", "orderings"):
            assert {(c.train.batch_size, sweep.num_steps(c)) for c in grids[name].values()} \
                == {(8, 1950)}, name  # 100 epochs x 156 windows of 64 tokens / batch 8
        assert {(c.model.name, c.data.unique_tokens, c.data.epochs, c.train.batch_size)
                for c in grids["block_diffusion"].values()} == {("cpu-s", 20_000, 24.0, 16)}
    orderings = grids["orderings"]
    assert {n: c.ar.num_orders for n, c in orderings.items() if c.objective == "ar"} == {
        f"ar-orders{n}": n for n in (1, 2, 4, 8, 16)}
    assert {c.ar.order_kind for c in orderings.values()} == {"local"}
    assert not any(c.ar.target_positions for c in orderings.values())
    if not cpu:
        assert orderings["ar-orders16"].model.name == "278M"
        assert orderings["ar-orders16"].data.epochs == 100.0
    rates = {c.model.attention_dropout for n, c in grids["attention_dropout"].items()
             if n.startswith("ar-attention_dropout")}
    assert rates == {0.25, 0.5, 0.75}
    assert {c.ar.randmask_ratio for c in grids["token_masking"].values()} == {
        0.0, 0.1, 0.25, 0.5, 0.75}
    blocks = grids["block_diffusion"]
    seq = blocks["ar"].data.seq_len
    assert sorted(c.block_diffusion.block_size for c in blocks.values()
                  if c.objective == "block_diffusion") == sorted({1, seq // 16, seq // 4, seq})
    for runs in grids.values():
        assert {c.objective for n, c in runs.items() if n == "diffusion"} == {"diffusion"}


def test_cpu_ablation_grids_fit_in_minutes(capsys):
    """`dvar sweep list` prints each CPU ablation grid with its time estimate (under 25 min)."""
    for name in ("attention_dropout", "token_masking", "orderings", "block_diffusion"):
        assert main(["dvar", "sweep", "list", f"--grid=ablations/{name}-cpu"]) == 0
        out = capsys.readouterr().out
        minutes = int(out.split("one run after another: ")[1].split(" min")[0])
        assert minutes <= 25, (name, minutes)


def test_study_ablation_keeps_the_study_batch():
    from dvar_jax.configs.recipes import ablation_config

    with pytest.raises(ValueError, match=r"batch_size=8 is for the CPU run; the study's run "
                                         r"keeps its batch of 256"):
        ablation_config("ar", False, batch_size=8)


# ------------------------------------------------------------------------------------------------
# the crossover grid (configs/crossover.py)


def test_crossover_grid_allocates_each_objective_its_own_size_and_epochs():
    """Issue 17's search: both objectives at every U, on one batch per U and the 1k BPE
    vocabulary, diffusion at many more epochs than AR (within the same compute each may use its
    own size and epochs), and every run validated on the same held-out tokens."""
    from configs import crossover

    grid = load_grid(str(ROOT / "configs" / "crossover.py"))
    configs = [cfg for _, cfg in grid.runs]
    assert len(configs) == len(crossover.RUNS)
    for unique in crossover.BATCH_SIZES:
        at_u = [c for c in configs if c.data.unique_tokens == unique]
        assert {c.objective for c in at_u} == {"ar", "diffusion"}, unique
        assert {c.train.batch_size for c in at_u} == {crossover.BATCH_SIZES[unique]}
        ar_epochs = max(c.data.epochs for c in at_u if c.objective == "ar")
        assert min(c.data.epochs for c in at_u if c.objective == "diffusion") > 3 * ar_epochs
    assert {(c.data.vocab_size, c.data.tokenizer_type, c.data.validation_tokens)
            for c in configs} == {(1024, "bpe", crossover.VALIDATION_TOKENS)}
    widths = {(c.model.d_model, c.model.n_layers) for c in configs}
    assert widths == set(crossover.SIZES.values())
    assert all(validate_config(c) is None for c in configs)
    # The third call's variants reach its configs and names, and only its.
    runs = dict(grid.runs)
    for run in crossover.RUNS:
        variant = run[5] if len(run) > 5 else {}
        cfg = runs[crossover.name_of(*run)]
        assert cfg.train.ema_decay == variant.get("ema", 0.0)
        assert cfg.diffusion.noise_sampling == variant.get("noise", "independent")
    assert sum(c.train.ema_decay > 0 for c in configs) == 6


def test_cpu_crossover_grid_extends_the_small_grid_at_its_settings():
    """configs/grids/crossover_cpu.py: the small grid's U = 20k cells under their own names and
    configs (so make grid-demo's folder serves), and search runs that differ from the small
    grid's settings only in dropout, epochs, validation count and the variant they name."""
    from configs.grids import crossover_cpu

    runs = dict(load_grid("crossover_cpu").runs)
    taken = {n: c for n, c in small.get_grid() if c.data.unique_tokens == 20_000}
    assert all(runs[n].to_json() == c.to_json() for n, c in taken.items())
    assert len(runs) == len(taken) + len(crossover_cpu.RUNS)
    for objective, size, unique, epochs, dropout, variant in crossover_cpu.RUNS:
        name = crossover_cpu.search_name(objective, size, unique, epochs, dropout, variant)
        cfg = runs[name].to_dict()
        ref = small.grid_config(objective, size, unique, epochs).to_dict()
        assert cfg["model"]["hidden_dropout"] == cfg["model"]["attention_dropout"] == dropout
        assert cfg["train"]["peak_lr"] == variant.get("lr", small.PEAK_LR), name
        assert cfg["train"]["batch_size"] == variant.get("batch", small.BATCH_SIZE), name
        assert cfg["seed"] == variant.get("seed", ref["seed"]), name
        assert cfg["train"]["weight_decay"] == variant.get("wd", ref["train"]["weight_decay"])
        assert (cfg["train"]["warmup_fraction"]
                == variant.get("warmup", ref["train"]["warmup_fraction"])), name
        assert cfg["train"]["ema_decay"] == variant.get("ema", 0.0), name
        assert (cfg["diffusion"]["noise_sampling"]
                == variant.get("noise", ref["diffusion"]["noise_sampling"])), name
        for section in ("data", "objective"):
            assert cfg[section] == ref[section], (name, section)
        assert validate_config(runs[name]) is None
    assert {c.objective for c in runs.values()} == {"ar", "diffusion"}
    with pytest.raises(ValueError, match=r"variant keys \['beta2'\] unknown; allowed"):
        crossover_cpu.search_config("ar", "cpu-xs", 20_000, 30, 0.1, {"beta2": 0.99})
