"""Quiet start-up: on a machine without a TPU (this one, with libtpu installed by the `tpu`
extra), `dvar` commands print neither libtpu's initialisation errors nor TensorFlow's CUDA and
oneDNN notices. Each command runs as a fresh process, as a user starts it."""

import json
import os
import subprocess
import sys

import pytest
from support import needs_libtpu

# What libtpu and TensorFlow print at start when nothing keeps them quiet.
NOISE = ("libtpu", "TPU", "InitGoogle", "Source Location Trace", "host bounds", "oneDNN",
         "cuda", "absl::InitializeLog")


def _quiet_env(tmp_path) -> dict[str, str]:
    """The user's environment, without what the test suite itself sets for JAX and TF."""
    drop = ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "ALLOW_MULTIPLE_LIBTPU_LOAD", "XLA_FLAGS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("TPU_")}
    env["DVAR_CACHE"] = str(tmp_path / "cache")
    return env


def _stderr_of(argv: list[str], tmp_path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvar_jax.cli", *argv], cwd=tmp_path,
                            env=_quiet_env(tmp_path), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _assert_quiet(stderr: str) -> None:
    noisy = [line for line in stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy)


def test_help_is_quiet(tmp_path):
    _assert_quiet(_stderr_of(["--help"], tmp_path))


@pytest.mark.slow
def test_a_tiny_train_and_sampling_are_quiet(tmp_path, text_corpus_dir):
    stderr = _stderr_of(["train", f"--workdir={tmp_path / 'run'}", "--config.data.source=text",
                         f"--config.data.path={text_corpus_dir}", "--config.data.vocab_size=400",
                         "--config.model.name=cpu-xs", "--config.data.unique_tokens=2000",
                         "--config.data.seq_len=32", "--config.data.epochs=1",
                         "--config.data.validation_tokens=500", "--config.train.batch_size=8",
                         "--config.eval.batch_size=8", "--progress=false"], tmp_path)
    _assert_quiet(stderr)
    # What the program itself says stays: its note that it prepares the corpus.
    assert "preparing the text train split" in stderr
    # Sampling decodes through seqio, which loads TensorFlow.
    _assert_quiet(_stderr_of(["sample", f"--workdir={tmp_path / 'run'}", "--num_samples=1",
                              "--n_new=4"], tmp_path))


def test_fit_is_quiet(tmp_path):
    """`dvar fit` on records generated from a known law (the fit itself: tests/test_laws.py)."""
    from test_laws import make_records

    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in make_records()))
    _assert_quiet(_stderr_of(["fit", f"--results={results}", "--tie_alpha_beta"], tmp_path))


@needs_libtpu
def test_plan_memory_is_quiet(tmp_path):
    """plan-memory loads libtpu on purpose (to describe the topology); its initialisation
    errors on a machine without a TPU are not shown."""
    _assert_quiet(_stderr_of(["plan-memory", "--topology=v5p:2x2x1", "--mesh=1,4,1",
                              "--config.model.name=cpu-xs", "--config.data.seq_len=64",
                              "--config.train.batch_size=8", "--config.data.vocab_size=400"],
                             tmp_path))
