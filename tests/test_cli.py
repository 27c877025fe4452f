"""`dvar` command line: help, and a clear error (exit 2) for every kind of wrong argument."""

import subprocess
import sys

import pytest

from dvar_jax.cli import main


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "dvar_jax.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "train" in out and "demo" in out


@pytest.mark.parametrize("sub", ["train", "demo"])
def test_subcommand_help_lists_every_config_key_with_its_default(sub, capsys):
    assert main(["dvar", sub, "--help"]) == 0
    out = capsys.readouterr().out
    for line in ("--workdir", "--config.objective='ar'", "--config.data.unique_tokens=",
                 "--config.model.name=", "--config.eval.num_mc=", "--config.train.peak_lr="):
        assert line in out


BAD = [
    (["frobnicate"], "unknown subcommand 'frobnicate'"),
    (["train", "--config.objective=diffusion"], "--workdir is required"),
    (["train", "--workdir=W", "--bogus=1"], "Unknown command line flag 'bogus'"),
    (["demo", "--bogus"], "`dvar demo --help` lists the flags demo accepts"),
    (["train", "--workdir=W", "--config.nosuchkey=1"], "unknown config key '--config.nosuchkey'"),
    (["train", "--workdir=W", "--config.model.nosuch=1"],
     "unknown config key '--config.model.nosuch'"),
    (["train", "--workdir=W", "--config.data.epochs=many"],
     "--config.data.epochs='many' is not a float"),
    (["train", "--workdir=W", "--config.objective=gan"], "objective='gan': allowed ar, diffusion"),
    (["train", "--workdir=W", "--config.model.name=999M"], "model.name='999M' is not a known"),
    (["train", "--workdir=W", "--config.model.d_model=64"], "set model.name=custom"),
    (["train", "--workdir=W", "--config.data.seq_len=0"], "data.seq_len=0: must be >= 2"),
    (["train", "--workdir=W", "--config.family=fresh"],
     "family='fresh': allowed 'isoflop', 'data_constrained' or '' (none)"),
    (["train", "--workdir=W", "--config.family=isoflop", "--config.data.epochs=4"],
     "family='isoflop' with data.epochs=4.0: an isoFLOP run is one epoch on fresh data"),
    (["train", "--workdir=W", "--config=no/such/config.py"], "no/such/config.py"),
    (["train", "--workdir=W", "--config.data.source=text", "--config.data.path=/no/such/dir"],
     "/no/such/dir"),
    (["demo", "--config.model.dtype=float16"], "model.dtype='float16'"),
    (["demo", "--config.data.unique_tokens=0"], "data.unique_tokens=0"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_wrong_arguments_fail_fast_with_a_message_naming_them(argv, message, capsys, tmp_path):
    argv = [a.replace("=W", f"={tmp_path / 'run'}") for a in argv]
    assert main(["dvar", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was created


def test_unique_tokens_beyond_the_corpus_names_both_numbers(text_data_cfg, tmp_path, capsys):
    argv = ["dvar", "train", f"--workdir={tmp_path}", "--config.data.source=text",
            f"--config.data.path={text_data_cfg.path}", "--config.data.vocab_size=400",
            "--config.data.unique_tokens=10000000", "--config.model.name=cpu-xs"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.unique_tokens=10,000,000 exceeds the" in err and " tokens of " in err


def test_train_runs_and_reports(text_data_cfg, tmp_path, capsys):
    argv = ["dvar", "train", f"--workdir={tmp_path}", "--config.objective=ar",
            "--config.data.source=text", f"--config.data.path={text_data_cfg.path}",
            "--config.data.vocab_size=400", "--config.data.unique_tokens=2000",
            "--config.data.seq_len=32", "--config.data.epochs=1",
            "--config.data.validation_tokens=500", "--config.train.batch_size=8",
            "--config.model.name=cpu-xs", "--config.model.attention_dropout=0.0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ar: best validation loss ") and str(tmp_path) in out
    assert (tmp_path / "metrics.jsonl").exists()
