"""Checkpoints: bitwise resume after SIGKILL, SIGTERM preemption, damaged checkpoints, a
checkpoint of another model, restoring onto another device count, a changed config, and
non-finite losses."""

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import run_together

from dvar_jax import storage
from dvar_jax.checkpoint import (
    CheckpointError,
    Checkpoints,
    abstract_like,
    named_leaves,
    read_saved_arrays,
)

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "train_worker.py"


def _tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root: "nothing changed" made checkable."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _small_state(rows: int) -> dict:
    return {"step": jnp.int32(3), "params": {"w": jnp.arange(rows * 3.0).reshape(rows, 3),
                                             "b": jnp.ones((3,))}}


def _save(workdir, state, *steps):
    checkpoints = Checkpoints(workdir, keep=3)
    for step in steps:
        checkpoints.save(step, state, {"step": step, "pending": []})
    checkpoints.close()


def test_a_checkpoint_of_another_model_is_an_error_and_stays_untouched(tmp_path):
    _save(tmp_path, _small_state(4), 5)
    before = _tree_digest(tmp_path)
    bigger = abstract_like(_small_state(6))
    with pytest.raises(CheckpointError) as err:
        Checkpoints(tmp_path, keep=3).restore_latest(bigger)
    message = str(err.value)
    assert "params/w is float32[4, 3] in the checkpoint but float32[6, 3] here" in message
    assert f"{tmp_path / 'checkpoints' / '5'}" in message and "another workdir" in message
    assert "\n" not in message
    extra = abstract_like({**_small_state(4), "params": {**_small_state(4)["params"],
                                                         "g": jnp.ones((2,))}})
    with pytest.raises(CheckpointError, match=r"params/g is not in the checkpoint"):
        Checkpoints(tmp_path, keep=3).restore_latest(extra)
    assert _tree_digest(tmp_path) == before  # not set aside, not rewritten
    step, state, meta = Checkpoints(tmp_path, keep=3).restore_latest(
        abstract_like(_small_state(4)))
    assert step == 5 and meta["step"] == 5
    np.testing.assert_array_equal(state["params"]["w"], _small_state(4)["params"]["w"])


def test_a_damaged_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys):
    _save(tmp_path, _small_state(4), 1, 2)
    latest = tmp_path / "checkpoints" / "2"
    biggest = max((p for p in (latest / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 3])
    step, _state, _meta = Checkpoints(tmp_path, keep=3).restore_latest(
        abstract_like(_small_state(4)))
    assert step == 1
    assert f"skipping unreadable checkpoint {latest}" in capsys.readouterr().out
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").iterdir()
            if "unreadable" in p.name] == ["2.unreadable"]


def test_read_saved_arrays_gives_the_saved_values_by_path(tmp_path):
    _save(tmp_path, _small_state(4), 7)
    arrays = read_saved_arrays(tmp_path / "checkpoints" / "7" / "state")
    assert set(arrays) == {"step", "params/w", "params/b"}
    np.testing.assert_array_equal(arrays["params/w"], np.arange(12.0).reshape(4, 3))


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
    return [json.loads(x) for x in (storage.path(workdir) / "metrics.jsonl").read_text()
            .splitlines()]


def _losses(workdir):
    """Every logged training loss and validation loss, keyed by (kind, step)."""
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in _records(workdir)}


def _final_params_hash(workdir) -> str:
    root = storage.path(workdir) / "checkpoints"
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
    path = storage.path(workdir) / "metrics.jsonl"
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


def test_a_second_train_on_a_busy_run_is_refused_naming_the_holder(reference, corpus, env,
                                                                  tmp_path):
    """Two `dvar train` on one workdir: the second exits 2 naming the first's host and pid,
    writes nothing, and the first's run is exactly an uninterrupted one (no duplicate logs)."""
    import socket

    first = _start(tmp_path, corpus, env)
    path = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (path.exists() and _records_safe(path)):
        assert first.poll() is None, first.stderr.read()[-2000:]
        assert time.time() < deadline, "timed out waiting for the first run"
        time.sleep(0.05)
    # Paused (still alive, still holding the lock) while the second starts: on a fast machine
    # the tiny first run could otherwise finish, and free the folder, before the second's
    # start-up reached the lock.
    first.send_signal(signal.SIGSTOP)
    try:
        before = path.read_text()
        rc, _, err = _run(tmp_path, corpus, env)
    finally:
        first.send_signal(signal.SIGCONT)
    assert rc == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert (f"is being trained by process {first.pid} on host {socket.gethostname()}"
            in line), line
    assert path.read_text() == before  # the second wrote nothing of its own
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    keys = [(r["kind"], r["step"]) for r in _records(tmp_path)]
    assert len(keys) == len(set(keys))
    assert _losses(tmp_path) == _losses(reference)
    # The lock died with its process: the folder is free again.
    from dvar_jax.run_dir import RunDir

    assert RunDir(tmp_path).holder() is None


def test_sigkill_then_resume_on_gcs_is_bitwise_identical(reference, corpus, env, gcs_bucket,
                                                          gcs_emulator):
    """The same run folder on gs:// (the GCS emulator): killed after a checkpoint committed and
    a few steps more, then resumed; every logged loss and the final parameters equal the
    uninterrupted local run's. The killed process's lease is freed at once (its process is
    gone from this host)."""
    workdir = f"{gcs_bucket}/runs/killed"
    env = {**env, **gcs_emulator.env}
    proc = _start(workdir, corpus, env)
    fs = storage.filesystem()
    checkpoints = workdir.removeprefix("gs://") + "/checkpoints"
    deadline = time.time() + 300
    while True:  # a save to GCS is slower than local: wait for one to commit, then 2 steps
        assert proc.poll() is None, f"finished before a kill: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for a committed checkpoint"
        fs.invalidate_cache()
        committed = [int(p.split("/")[-2]) for p in fs.glob(f"{checkpoints}/*/commit_success.txt")]
        metrics = storage.read_object(f"{workdir}/metrics.jsonl")
        steps = [r["step"] for r in _records_from(metrics[0] if metrics else b"")
                 if r["kind"] == "train"]
        if committed and steps and steps[-1] >= max(committed) + 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert storage.path(workdir).joinpath("run.lock").exists()  # left behind by the kill
    rc, out, err = _run(workdir, corpus, env)
    assert rc == 0, err[-3000:]
    assert "resuming" in out, out
    assert _losses(workdir) == _losses(reference)
    assert _final_params_hash(workdir) == _final_params_hash(reference)


def _records_from(data: bytes) -> list[dict]:
    out = []
    for line in data.decode().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_sweep_on_gcs_has_one_writer(reference, corpus, env, gcs_bucket,
                                                  gcs_emulator, tmp_path):
    """A sweep of one run by two processes joined over loopback (the shape of a multi-host
    slice), its folder on the GCS emulator: process 0 alone writes config, metrics,
    TensorBoard, summary and the results record (one of each, no duplicate records); both
    write their shards of the checkpoints, which orbax commits once."""
    grid = tmp_path / "grid.py"  # train_worker's TINY run, one epoch
    grid.write_text(f"""from dvar_jax.configs.base import get_config


def get_grid():
    cfg = get_config()
    cfg.objective = "diffusion"
    cfg.data.source, cfg.data.path, cfg.data.vocab_size = "text", {str(corpus)!r}, 400
    cfg.model.name = "cpu-xs"
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.unique_tokens, cfg.data.epochs, cfg.data.seq_len = 4000, 1.0, 32
    cfg.data.validation_tokens, cfg.train.batch_size, cfg.train.log_every = 1000, 8, 1
    cfg.checkpoint.every_steps = 6
    return [("tiny", cfg)]
""")
    workdir = f"{gcs_bucket}/sweep"
    port = str(_free_port())
    run_env = {**env, **gcs_emulator.env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_PLATFORMS": "cpu"}
    argv = ["dvar", "sweep", "run", f"--grid={grid}", f"--workdir={workdir}",
            "--config.distributed=off", "--progress=false"]
    outputs = run_together([[sys.executable, str(TESTS / "multihost_train_worker.py"), str(i),
                             "2", port, *argv] for i in range(2)], timeout=600, env=run_env)
    assert [rc for rc, _, _ in outputs] == [0, 0], "\n".join(
        f"process {i} (rc {rc}): {out[-1500:]}\n{err[-2500:]}"
        for i, (rc, out, err) in enumerate(outputs))
    from dvar_jax.results import read_records
    from dvar_jax.run_dir import RunDir

    assert [r["name"] for r in read_records(f"{workdir}/results.jsonl")] == ["tiny"]
    run = RunDir(f"{workdir}/tiny")
    keys = [(r["kind"], r["step"]) for r in run.read_metrics()]
    assert keys and len(keys) == len(set(keys))
    assert run.finished_summary()["steps"] == run.checkpoint_steps()[-1]
    assert len([p for p in run.tensorboard_dir.iterdir()]) == 1  # one event file: process 0's
    state = run.checkpoint_state_dir(run.checkpoint_steps()[-1])
    assert {p.name for p in state.iterdir() if p.name.startswith("ocdbt.process_")} == \
        {"ocdbt.process_0", "ocdbt.process_1"}
    assert run.holder() is None


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
def test_a_scanned_run_stopped_then_resumed_unrolled_follows_the_reference(reference, corpus,
                                                                         env, tmp_path):
    """model.scan_layers may change on resume: the scanned half saves the unrolled layout, the
    unrolled half continues from it. Scan and loop sum in another order, so float tolerance."""
    proc = _start(tmp_path, corpus, env, "--config.model.scan_layers=true")
    out, err = _kill_after(proc, tmp_path, 8, signal.SIGTERM)
    assert proc.returncode == 0 and "SIGTERM received" in out, err[-3000:]
    step = int(out.split("checkpoint at step ")[1].split()[0])
    saved = read_saved_arrays(tmp_path / "checkpoints" / str(step) / "state")
    assert "params/blocks/1/qkv/kernel" in saved and "params/blocks/qkv/kernel" not in saved
    rc, out, err = _run(tmp_path, corpus, env)
    assert rc == 0 and f"from the checkpoint at step {step}" in out, err[-3000:]
    got, want = _losses(tmp_path), _losses(reference)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4)


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
    # A run saved before a config key existed: the key counts as its default, not a change.
    saved = json.loads((reference / "config.json").read_text())
    del saved["model"]["loss_block_v"]
    (reference / "config.json").write_text(json.dumps(saved))
    rc, _out, err = _run(reference, corpus, env)
    assert rc == 0, err[-3000:]
    rc, _out, err = _run(reference, corpus, env, "--config.model.loss_block_v=64")
    assert rc == 2 and "model.loss_block_v differ" in err


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


def _restore_here(workdir, argv) -> tuple[int, dict, list]:
    """Restores the newest checkpoint of `workdir` exactly as `dvar train` would in this
    process (its devices, the config's mesh): (step, path -> restored array, their devices)."""
    from dvar_jax.cli import SUBCOMMANDS, _parse
    from dvar_jax.config import transformer_config
    from dvar_jax.sharding import make_mesh, rules_from_config
    from dvar_jax.step import make_optimizer, plan_train_state

    cfg = _parse(["dvar train", *argv], SUBCOMMANDS["train"]).config
    model_cfg = transformer_config(cfg, cfg.data.vocab_size)
    _, init, placement = plan_train_state(model_cfg, make_optimizer(cfg.train, 100), cfg.seed,
                                          make_mesh(cfg.mesh), rules_from_config(cfg.mesh.rules))
    abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                     sharding=sharding),
                            jax.eval_shape(init), placement.state)
    checkpoints = Checkpoints(workdir, keep=cfg.checkpoint.keep)
    try:
        step, state, _meta = checkpoints.restore_latest(abstract)
    finally:
        checkpoints.close()
    leaves = dict(named_leaves(state))
    devices = sorted({d.id for leaf in leaves.values() for d in leaf.sharding.device_set})
    return step, {k: np.asarray(v) for k, v in leaves.items()}, devices


@pytest.mark.slow
def test_a_run_saved_on_4_devices_resumes_on_1(corpus, env, tmp_path):
    """Trained on a (data=2, fsdp=2) mesh of 4 simulated devices, stopped by SIGTERM, then
    restored in a 1-device process: every array equals the saved one exactly, and the run
    finishes there."""
    from train_worker import TINY

    if jax.device_count() == 4:
        pytest.skip("this process has 4 devices itself; the test needs another count")
    four = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = _start(tmp_path, corpus, four, "--config.mesh.data=2", "--config.mesh.fsdp=2")
    out, err = _kill_after(proc, tmp_path, 8, signal.SIGTERM)
    assert proc.returncode == 0 and "SIGTERM received" in out, err[-3000:]
    saved_step = int(out.split("checkpoint at step ")[1].split()[0])
    saved = read_saved_arrays(tmp_path / "checkpoints" / str(saved_step) / "state")
    shardings = json.loads((tmp_path / "checkpoints" / str(saved_step) / "state" /
                            "_sharding").read_text()).values()
    specs = [json.dumps(json.loads(s)["partition_spec"]) for s in shardings]
    assert any("fsdp" in spec for spec in specs)  # really saved sharded over the 4 devices

    argv = [f"--workdir={tmp_path}", f"--config.data.path={corpus}", *TINY]
    step, restored, devices = _restore_here(tmp_path, argv)
    assert step == saved_step and len(devices) == jax.device_count() != 4
    assert set(restored) == set(saved)
    for path, array in saved.items():
        np.testing.assert_array_equal(restored[path], array, err_msg=path, strict=True)

    rc, out, err = _run(tmp_path, corpus, env)  # 1 device, the default mesh
    assert rc == 0, err[-3000:]
    assert f"from the checkpoint at step {saved_step}" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    train_steps = [r["step"] for r in _records(tmp_path) if r["kind"] == "train"]
    assert train_steps == list(range(1, summary["steps"] + 1))  # each step logged once
