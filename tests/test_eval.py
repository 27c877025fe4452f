"""`dvar eval`'s parts: loading a run, the validation ELBO with its Monte-Carlo error, bits per
byte, and the results file."""

import json
import math

import numpy as np
import pytest
from flax import nnx

from dvar_jax.eval.evaluate import format_evaluation, parse_tasks, run_evaluation
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.validation import evaluate_validation, summarize_draws
from dvar_jax.run_dir import RunDir, read_metrics


def test_summarize_draws_by_hand():
    # Sequences of L = 2 tokens, K = 2 draws: estimate (2 + 2) / (2 * 2) = 1; within-sequence
    # variances 2 and 0, so the error is sqrt((2 + 0) / 2) / (2 * 2) = 0.25.
    estimate, stderr = summarize_draws(np.array([[1.0, 3.0], [2.0, 2.0]]), 2)
    assert estimate == pytest.approx(1.0) and stderr == pytest.approx(0.25)
    estimate, stderr = summarize_draws(np.array([[4.0], [2.0]]), 2)
    assert estimate == pytest.approx(1.5) and math.isnan(stderr)


def test_checkpoint_choice_best_latest_step_and_errors(trained_runs, tmp_path):
    workdir = trained_runs["diffusion"]
    evals = read_metrics(workdir, "eval")
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    choose_step = RunDir(workdir).choose_checkpoint
    assert choose_step("latest") == steps[-1]
    assert choose_step("best") == min(evals, key=lambda r: r["val_loss"])["step"]
    assert choose_step(str(steps[0])) == steps[0]
    with pytest.raises(ValueError, match=r"--checkpoint='7777': allowed best, latest or one of "
                                         rf"the saved steps {steps[0]}"):
        choose_step("7777")
    with pytest.raises(ValueError, match="holds no trained run"):
        load_run(tmp_path)


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_validation_reproduces_the_training_time_evaluation(trained_runs, objective):
    """With the run's own eval settings (num_mc, batch size, seed, validation tokens) the loss
    of the latest checkpoint is the one logged at that step during training."""
    workdir = trained_runs[objective]
    run = load_run(workdir, "latest")
    logged = {r["step"]: r["val_loss"] for r in read_metrics(workdir, "eval")}
    result = evaluate_validation(run, num_mc=run.cfg.eval.num_mc,
                                 batch_size=run.cfg.eval.batch_size, seed=run.cfg.eval.seed,
                                 validation_tokens=run.cfg.data.validation_tokens)
    assert result["val_loss"] == pytest.approx(logged[run.step], rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(result["val_loss"] / math.log(2))
    assert result["bits_per_byte"] == pytest.approx(
        result["val_loss"] * result["tokens"] / math.log(2) / result["bytes"])
    assert result["val_loss_stderr"] == 0.0 if objective == "ar" else result["val_loss_stderr"] > 0


def test_a_run_loads_scanned_with_the_same_parameters_and_loss(trained_runs):
    """Checkpoints hold the blocks unrolled; loaded with scan_layers on, they are stacked,
    layer i being block i, and validation gives the same loss."""
    workdir = trained_runs["ar"]
    plain = load_run(workdir, "latest")
    scanned = load_run(workdir, "latest", scan_layers=True)
    unrolled_blocks = nnx.state(plain.model, nnx.Param)["blocks"]
    stacked = nnx.state(scanned.model, nnx.Param)["blocks"]["qkv"]["kernel"][...]
    for layer in range(plain.model.cfg.n_layers):
        np.testing.assert_array_equal(stacked[layer], unrolled_blocks[layer]["qkv"]["kernel"][...])
    settings = {"num_mc": 1, "batch_size": 16, "seed": 0, "validation_tokens": 0}
    assert evaluate_validation(scanned, **settings)["val_loss"] == pytest.approx(
        evaluate_validation(plain, **settings)["val_loss"], rel=1e-6)


def test_monte_carlo_error_matches_the_spread_over_seeds(trained_runs):
    """The reported standard error (K = 4) predicts the spread of the estimate over 8 seeds:
    their ratio within [0.4, 2.5] (the spread of 8 samples is itself uncertain by ~25%)."""
    run = load_run(trained_runs["diffusion"], "latest")
    results = [evaluate_validation(run, num_mc=4, batch_size=16, seed=s, validation_tokens=0)
               for s in range(8)]
    spread = np.std([r["val_loss"] for r in results], ddof=1)
    reported = np.mean([r["val_loss_stderr"] for r in results])
    assert 0.4 < spread / reported < 2.5


def test_token_byte_lengths_count_the_text(trained_runs):
    """Each encoded text's ids stand for its UTF-8 bytes plus the one prefix space
    SentencePiece adds, including characters the vocabulary only has as bytes."""
    tokenizer = load_run(trained_runs["ar"], "latest").tokenizer
    lengths = np.asarray(tokenizer.token_byte_lengths())
    assert lengths[tokenizer.eod_id] == 0
    for text in ("Ba ro mi ten.", "  Wil st, or an the.\nQu el!", "naïve 日本 ✓"):
        assert lengths[tokenizer.encode(text)].sum() == len(text.encode()) + 1


def test_run_evaluation_appends_one_record_per_call(trained_runs, capsys):
    workdir = trained_runs["ar"]
    results = workdir / "eval.jsonl"
    before = results.read_text().count("\n") if results.exists() else 0
    record = run_evaluation(workdir, num_mc=2, batch_size=8, validation_tokens=0)
    run_evaluation(workdir, checkpoint="latest", num_mc=2, batch_size=8)
    lines = results.read_text().splitlines()
    assert len(lines) == before + 2
    assert json.loads(lines[before]) == json.loads(json.dumps(record))
    assert record["val_loss_stderr"] == 0.0 and record["num_mc"] == 1  # AR is exact
    table = format_evaluation(record)
    assert f"{record['val_loss']:.4f} nats/token" in table and "bits per byte" in table


def test_bad_evaluation_arguments_write_nothing(trained_runs):
    workdir = trained_runs["diffusion"]
    results = workdir / "eval.jsonl"
    before = results.read_bytes() if results.exists() else b""
    with pytest.raises(ValueError, match=r"--num_mc=0: must be an integer >= 1"):
        run_evaluation(workdir, num_mc=0)
    with pytest.raises(ValueError, match=r"--checkpoint='final': allowed best, latest"):
        run_evaluation(workdir, checkpoint="final")
    with pytest.raises(ValueError, match=r"'mmlu' is not a task; allowed all, none or"):
        parse_tasks("arc_easy,mmlu")
    assert (results.read_bytes() if results.exists() else b"") == before
    assert parse_tasks("all")[0] == "arc_easy" and parse_tasks("none") == ()


# ---------------------------------------------------------------- the commands


def test_dvar_eval_prints_a_table_and_appends_tasks(trained_runs, tmp_path, capsys):
    from test_downstream import write_tasks

    from dvar_jax.cli import main

    write_tasks(tmp_path)
    workdir = trained_runs["diffusion"]
    argv = ["dvar", "eval", f"--workdir={workdir}", "--num_mc=2", "--batch_size=4",
            "--tasks=copa,lambada_standard", f"--tasks_dir={tmp_path}", "--limit=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "± " in out and "copa" in out and "lambada_standard" in out
    record = json.loads((workdir / "eval.jsonl").read_text().splitlines()[-1])
    assert set(record["tasks"]) == {"copa", "lambada_standard"}
    assert record["tasks"]["copa"]["n"] == 2 and record["num_mc"] == 2


def test_dvar_sample_is_seeded_for_both_objectives(trained_runs, capsys):
    from dvar_jax.cli import main

    outputs = {}
    for objective, extra in (("ar", ["--top_k=20"]), ("diffusion", ["--method=confidence"])):
        argv = ["dvar", "sample", f"--workdir={trained_runs[objective]}", "--prompt=Ba ro",
                "--num_samples=2", "--n_new=8", "--seed=3", *extra]
        assert main(argv) == 0
        first = capsys.readouterr().out
        assert main(argv) == 0
        assert capsys.readouterr().out == first  # the same seed, the same text
        assert first.count("--- sample") == 2 and first.count("\nBa ro") == 2
        outputs[objective] = first
    assert outputs["ar"] != outputs["diffusion"]


BAD_COMMANDS = [
    (["eval", "--bogus=1"], "`dvar eval --help` lists the flags eval accepts"),
    (["eval"], "--workdir is required"),
    (["eval", "--workdir=AR", "--tasks=mmlu"], "'mmlu' is not a task; allowed all, none"),
    (["eval", "--workdir=AR", "--checkpoint=final"], "--checkpoint='final': allowed best"),
    (["eval", "--workdir=AR", "--num_mc=0"], "--num_mc=0: must be an integer >= 1"),
    (["eval", "--workdir=AR", "--num_mc=many"], "--num_mc"),
    (["eval", "--workdir=NOWHERE"], "holds no trained run"),
    (["sample", "--bogus"], "`dvar sample --help` lists the flags sample accepts"),
    (["sample", "--workdir=AR", "--n_new=0"], "--n_new=0: must be >= 1"),
    (["sample", "--workdir=AR", "--top_p=2"], "top_p"),
    (["sample", "--workdir=DIFF", "--method=beam"], "beam"),
    (["sample", "--workdir=AR", "--n_new=100"], "100"),
]


@pytest.mark.parametrize("argv, message", BAD_COMMANDS, ids=[" ".join(a) for a, _ in BAD_COMMANDS])
def test_bad_eval_and_sample_arguments_are_named(trained_runs, argv, message, tmp_path,
                                                 capsys):
    from dvar_jax.cli import main

    places = {"=AR": f"={trained_runs['ar']}", "=DIFF": f"={trained_runs['diffusion']}",
              "=NOWHERE": f"={tmp_path}"}
    for short, full in places.items():
        argv = [a.replace(short, full) if a.endswith(short) else a for a in argv]
    results = trained_runs["ar"] / "eval.jsonl"
    before = results.read_bytes() if results.exists() else b""
    assert main(["dvar", *argv]) == 2
    assert message in capsys.readouterr().err
    assert (results.read_bytes() if results.exists() else b"") == before


@pytest.mark.parametrize("sub", ["eval", "sample"])
def test_help_lists_every_flag_with_its_default(sub, capsys):
    from dvar_jax.cli import SUBCOMMANDS, main

    assert main(["dvar", sub, "--help"]) == 0
    out = capsys.readouterr().out
    for name, default, _ in SUBCOMMANDS[sub].options:
        assert f"--{name}: " in out
        assert f"(default: {'required' if default is None else default})" in out
