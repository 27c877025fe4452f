"""Checkpoints: bitwise resume after SIGKILL, SIGTERM preemption, damaged checkpoints, a changed
config, and non-finite losses."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "train_worker.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_documents):
    root = tmp_path_factory.mktemp("ckpt_corpus")
    for i, text in enumerate(synthetic_documents(40, 40, seed=5)):
        (root / f"doc{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "DVAR_CACHE": str(tmp_path_factory.mktemp("ckpt_cache")),
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start(workdir, corpus, env, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(workdir), str(corpus), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(workdir, corpus, env, *extra):
    proc = _start(workdir, corpus, env, *extra)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def _records(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
    """Every logged training loss and validation loss, keyed by (kind, step)."""
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in _records(workdir)}


def _final_params_hash(workdir) -> str:
    root = Path(workdir) / "checkpoints"
    step = max(int(p.name) for p in root.iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore(root / str(step) / "state")
    digest = hashlib.sha256()
    for leaf in sorted(_leaves(state), key=lambda kv: kv[0]):
        digest.update(leaf[0].encode() + np.asarray(leaf[1]).tobytes())
    return f"{step}:{digest.hexdigest()}"


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def _kill_after(proc, workdir, step, sig):
    """Sends `sig` once a train record at >= step has been written."""
    path = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"finished before step {step}: {proc.stderr.read()[-2000:]}")
        if path.exists() and any(r["kind"] == "train" and r["step"] >= step
                                 for r in _records_safe(path)):
            proc.send_signal(sig)
            return proc.communicate(timeout=300)
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


def _records_safe(path):
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, env):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    rc, _out, err = _run(workdir, corpus, env)
    assert rc == 0, err[-3000:]
    return workdir


@pytest.mark.slow
def test_sigkill_twice_then_resume_is_bitwise_identical(reference, corpus, env, tmp_path):
    for kill_step in (9, 26):  # between checkpoints (every 6 steps), so work is redone
        proc = _start(tmp_path, corpus, env)
        _kill_after(proc, tmp_path, kill_step, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL
    rc, out, err = _run(tmp_path, corpus, env)
    assert rc == 0, err[-3000:]
    assert "resuming" in out
    assert _losses(tmp_path) == _losses(reference)  # every logged loss, exactly
    assert _final_params_hash(tmp_path) == _final_params_hash(reference)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(reference, corpus, env, tmp_path):
    proc = _start(tmp_path, corpus, env)
    out, err = _kill_after(proc, tmp_path, 11, signal.SIGTERM)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM received; saved and committed the checkpoint at step" in out
    step = int(out.split("checkpoint at step ")[1].split()[0])
    assert step >= 11  # the step in flight when the signal came, finished and saved
    assert (tmp_path / "checkpoints" / str(step)).is_dir()
    rc, out, err = _run(tmp_path, corpus, env)
    assert rc == 0 and f"from the checkpoint at step {step}" in out, err[-3000:]
    assert _losses(tmp_path) == _losses(reference)
    assert _final_params_hash(tmp_path) == _final_params_hash(reference)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(reference, corpus, env,
                                                                tmp_path):
    proc = _start(tmp_path, corpus, env)
    _kill_after(proc, tmp_path, 20, signal.SIGKILL)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                   if p.name.isdigit())
    latest = tmp_path / "checkpoints" / str(steps[-1])
    biggest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])  # truncated file
    rc, out, err = _run(tmp_path, corpus, env)
    assert rc == 0, err[-3000:]
    assert f"skipping unreadable checkpoint {latest}" in out
    assert f"from the checkpoint at step {steps[-2]}" in out
    assert _losses(tmp_path) == _losses(reference)
    assert _final_params_hash(tmp_path) == _final_params_hash(reference)


@pytest.mark.slow
def test_a_changed_config_is_refused_listing_the_keys_unless_overridden(reference, corpus, env):
    before = (reference / "metrics.jsonl").read_text()
    rc, _, err = _run(reference, corpus, env, "--config.seed=7", "--config.model.name=cpu-s")
    assert rc == 2
    assert "model.name, seed differ" in err and "--override" in err
    assert (reference / "metrics.jsonl").read_text() == before  # nothing written or lost
    rc, _out, err = _run(reference, corpus, env, "--config.eval.num_mc=2")  # not run-defining
    assert rc == 0, err[-3000:]


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_step(corpus, env, tmp_path):
    rc, _out, err = _run(tmp_path, corpus, env, "--config.train.peak_lr=1e30",
                        "--config.train.warmup_fraction=0.0")
    assert rc == 1
    assert "non-finite" in err and "at step" in err and "Last good checkpoint" in err
    step = int(err.split(" at step ")[1].split(";")[0])
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] \
        if (tmp_path / "checkpoints").exists() else []
    assert all(s < step for s in saved)  # no checkpoint of a non-finite state


@pytest.mark.slow
def test_non_finite_steps_can_be_skipped_and_counted(corpus, env, tmp_path):
    rc, _out, err = _run(tmp_path, corpus, env, "--config.train.peak_lr=1e30",
                        "--config.train.warmup_fraction=0.0", "--config.train.skip_nonfinite=True")
    assert rc == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    skipped = sum(r.get("skipped", 0) for r in _records(tmp_path) if r["kind"] == "train")
    assert summary["skipped_steps"] == skipped > 0
