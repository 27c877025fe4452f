"""Run folders on gs://, against the GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): every
artifact of a run, checkpoints set aside, exactly-once results, the lease that keeps one writer
per run, and the errors a bad gs:// workdir gives before any training."""

import json
import os
import socket
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from dvar_jax import run_dir as run_dir_module
from dvar_jax import storage
from dvar_jax.checkpoint import Checkpoints, abstract_like
from dvar_jax.cli import main
from dvar_jax.configs.recipes import tiny_config
from dvar_jax.results import append_once, append_record, read_records
from dvar_jax.run_dir import GcsLease, RunBusyError, RunDir


def test_train_writes_every_artifact_to_gcs(gcs_bucket, text_data_cfg):
    from dvar_jax.train import train

    cfg = tiny_config("ar", text_data_cfg.path, text_data_cfg.cache_dir)
    workdir = f"{gcs_bucket}/runs/ar"
    summary = train(cfg, workdir, progress=False)
    assert summary.completed
    run = RunDir(workdir)
    assert run.finished_summary()["steps"] == summary.steps
    assert run.saved_config().objective == "ar"
    assert [r["step"] for r in run.read_metrics("eval")][-1] == summary.steps
    assert run.checkpoint_steps()[-1] == summary.steps
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard_dir.iterdir())
    assert run.holder() is None and not run.lock_path.exists()  # the lease was released
    # `dvar eval`'s results file on gs:// too
    append_record(run.evals_path, {"step": summary.steps, "val_loss": 1.5})
    assert read_records(run.evals_path) == [{"step": summary.steps, "val_loss": 1.5}]


def _small_state(rows: int) -> dict:
    return {"step": jnp.int32(3), "params": {"w": jnp.arange(rows * 3.0).reshape(rows, 3),
                                             "b": jnp.ones((3,))}}


def test_a_damaged_checkpoint_on_gcs_is_set_aside(gcs_bucket, capsys):
    workdir = f"{gcs_bucket}/run"
    checkpoints = Checkpoints(workdir, keep=3)
    for step in (1, 2):
        checkpoints.save(step, _small_state(4), {"step": step, "pending": []})
    checkpoints.close()
    fs = storage.filesystem()
    latest = RunDir(workdir).checkpoints_dir / "2"
    objects = fs.find(f"{latest}/state", detail=True)
    biggest = max(objects, key=lambda k: objects[k]["size"])
    data = fs.cat(biggest)
    fs.pipe(biggest, data[: len(data) // 3])  # truncated
    step, _state, _meta = Checkpoints(workdir, keep=3).restore_latest(
        abstract_like(_small_state(4)))
    assert step == 1
    assert f"skipping unreadable checkpoint {latest}" in capsys.readouterr().out
    names = [p.name for p in RunDir(workdir).checkpoints_dir.iterdir()]
    assert "2" not in names and [n.split("-")[0] for n in names if "unreadable" in n] == \
        ["2.unreadable"]


def test_results_on_gcs_record_each_name_once_under_concurrent_writers(gcs_bucket):
    """GCS has no flock: eight writers race to record the same five runs (and append plain
    records) through generation preconditions; each name is recorded exactly once, and no
    record is lost or cut."""
    path = f"{gcs_bucket}/sweep/results.jsonl"
    wins: list[str] = []

    def writer(k: int) -> None:
        for name in (f"run{i}" for i in range(5)):
            if append_once(path, {"name": name, "writer": k}):
                wins.append(name)
        append_record(path, {"name": f"plain{k}"})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = [r["name"] for r in read_records(path)]
    assert sorted(wins) == [f"run{i}" for i in range(5)]
    assert sorted(names) == sorted([f"run{i}" for i in range(5)] + [f"plain{k}" for k in range(8)])


def test_the_gcs_lease_keeps_one_writer_and_frees_a_dead_one(gcs_bucket, monkeypatch):
    run = RunDir(f"{gcs_bucket}/run")
    with run.hold():
        holder = run.holder()
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunBusyError, match=f"process {os.getpid()} on host"), run.hold():
            pass
    assert run.holder() is None and not run.lock_path.exists()

    # A lease of a process of this host that is gone (killed): free at once, and taken over.
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "since": "then",
            "expires": time.time() + 3600}
    storage.create_object(run.lock_path, json.dumps(dead).encode())
    assert run.holder() is None
    with run.hold():
        assert run.holder()["pid"] == os.getpid()
    # Another host's lease: live until it expires, then taken over.
    other = {"host": "another-host", "pid": 1, "since": "then", "expires": time.time() + 3600}
    storage.create_object(run.lock_path, json.dumps(other).encode())
    with pytest.raises(RunBusyError, match="process 1 on host another-host"), run.hold():
        pass
    _current, generation = storage.read_object(run.lock_path)
    storage.replace_object(run.lock_path, json.dumps(other | {"expires": 0}).encode(),
                           generation)
    with run.hold():
        assert run.holder()["pid"] == os.getpid()


def test_the_gcs_lease_is_renewed_while_held(gcs_bucket, monkeypatch):
    monkeypatch.setattr(run_dir_module, "LEASE_SECONDS", 0.5)
    lease = GcsLease(f"{gcs_bucket}/run/run.lock")
    assert lease.acquire() is None
    try:
        time.sleep(1.2)  # past the first expiry: only renewals keep it live
        assert lease.live_holder()["pid"] == os.getpid()
        assert GcsLease(lease.where).acquire()["pid"] == os.getpid()  # refused
    finally:
        lease.release()
    assert storage.read_object(lease.where) is None


def _train_args(workdir: str, data_cfg) -> list[str]:
    return ["dvar", "train", f"--workdir={workdir}", "--config.data.source=text",
            f"--config.data.path={data_cfg.path}", f"--config.data.cache_dir={data_cfg.cache_dir}",
            "--config.data.vocab_size=400", "--config.model.name=cpu-xs",
            "--config.data.unique_tokens=4000", "--config.data.seq_len=32",
            "--config.train.batch_size=8", "--progress=false"]


def test_a_missing_bucket_is_a_clear_error_before_training(gcs_emulator, text_data_cfg,
                                                           capsys):
    rc = main(_train_args("gs://no-such-bucket-dvar/runs/x", text_data_cfg))
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bucket gs://no-such-bucket-dvar does not exist" in line, line
    assert not storage.filesystem().exists("no-such-bucket-dvar")


def test_a_sweep_into_a_missing_bucket_is_refused_before_any_run(gcs_emulator, capsys):
    rc = main(["dvar", "sweep", "run", "--grid=small", "--workdir=gs://no-such-bucket-dvar/s"])
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bucket gs://no-such-bucket-dvar does not exist" in line, line


def test_an_unwritable_gcs_prefix_is_a_clear_error_before_training(gcs_bucket, text_data_cfg,
                                                                   capsys, monkeypatch):
    """The emulator has no IAM: the 403 a read-only account gets is made by hand."""
    def forbidden(where, data):
        raise OSError(f"Forbidden: {where}\nno storage.objects.create permission")

    monkeypatch.setattr(storage, "create_object", forbidden)
    rc = main(_train_args(f"{gcs_bucket}/read-only/run", text_data_cfg))
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--workdir='{gcs_bucket}/read-only/run' is not writable (Forbidden:" in line, line
    assert "nothing was changed" in line
    assert not storage.filesystem().find(gcs_bucket.removeprefix("gs://"))


def test_gcs_objects_honour_generation_preconditions(gcs_bucket):
    """What the lease and the results rely on, checked against the emulator itself."""
    where = f"{gcs_bucket}/o"
    generation = storage.create_object(where, b"a")
    with pytest.raises(storage.PreconditionFailedError):
        storage.create_object(where, b"b")
    with pytest.raises(storage.PreconditionFailedError):
        storage.replace_object(where, b"c", generation + 1)
    new = storage.replace_object(where, b"d", generation)
    assert storage.read_object(where) == (b"d", new)
    assert storage.delete_object(where, new) and storage.read_object(where) is None
    np.testing.assert_equal(storage.is_gcs(where), True)


def test_a_gcs_workdir_that_is_an_object_is_refused(gcs_bucket, text_data_cfg, capsys):
    storage.create_object(f"{gcs_bucket}/runs/x", b"not a run")
    rc = main(_train_args(f"{gcs_bucket}/runs/x", text_data_cfg))
    assert rc == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--workdir='{gcs_bucket}/runs/x' is an object, not a folder" in line, line
    assert storage.read_object(f"{gcs_bucket}/runs/x")[0] == b"not a run"


def test_a_folder_whose_objects_come_and_go_is_never_taken_for_an_object(gcs_bucket):
    """The hosts of a slice check one run folder at once, and each writes and deletes a probe
    object in it: a folder holding only another host's probe must never read as an object
    (epath's is_file() did, when the probe went between its exists() and is_dir(): 121 of 300
    reads under this load)."""
    folder = f"{gcs_bucket}/sweep/run"
    stop = threading.Event()

    def other_host():
        while not stop.is_set():
            probe = f"{folder}/.probe-{time.monotonic_ns()}"
            storage.delete_object(probe, storage.create_object(probe, b""))

    thread = threading.Thread(target=other_host)
    thread.start()
    try:
        seen = [storage.is_object(folder) for _ in range(300)]
        for _ in range(50):  # the check a starting run makes, as another host probes
            RunDir(folder).check_writable()
    finally:
        stop.set()
        thread.join()
    assert not any(seen)
    assert not storage.is_object(f"{folder}/nothing-here")
    storage.create_object(f"{folder}/kept", b"x")
    assert storage.is_object(f"{folder}/kept") and not storage.is_object(folder)
