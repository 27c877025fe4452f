"""The run folder: the one module that knows its layout and reads its state.

    <workdir>/
      config.json           the run's config, over today's defaults when read back
      metrics.jsonl         train and eval records (`dvar_jax.metrics`)
      tb/                   the same records as TensorBoard scalars
      checkpoints/<step>/   orbax checkpoints (`dvar_jax.checkpoint`)
      summary.json          written once the run has completed
      eval.jsonl            one record per `dvar eval`
      run.lock              held by the one process training the run: host, pid (an flock
                            locally; on gs:// a lease object, `GcsLease`)

A sweep folder holds one run folder per run name and `results.jsonl`; a demo folder one run
folder per objective, `report.md`, `curves.png` and `summary.json`. Every path of a run
folder is built here, and every reader of a run's state (the saved config, the finished
summary, which checkpoint is best) asks here. A run folder is a local path or gs://BUCKET/PATH
(`dvar_jax.storage`): paths here are pathlib.Path or etils.epath.Path alike.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from dvar_jax import storage
from dvar_jax.configs.base import get_config
from dvar_jax.files import write_atomically
from dvar_jax.metrics import MetricsWriter, keep_metrics_through, read_metrics_file

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
SUMMARY_FILE = "summary.json"
EVALS_FILE = "eval.jsonl"
RESULTS_FILE = "results.jsonl"  # in a sweep folder
LOCK_FILE = "run.lock"


class RunBusyError(OSError):
    """Another live process is training this run folder; the message names its host and id."""

# The config keys whose change changes the run (model, objective, data, optimisation, seed);
# mesh, logging, evaluation and checkpoint cadence may change between restarts, and so may how
# a step fits in memory (remat, a scan over layers, microbatches): they compute the same update
# (microbatches up to rounding and dropout masks), which a run moved to another slice needs.
RUN_DEFINING = ("objective", "seed", "model.", "data.", "train.", "ar.", "block_diffusion.")
NOT_RUN_DEFINING = ("data.cache_dir", "train.log_every", "model.remat", "model.scan_layers",
                    "train.microbatches")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config dict; tuples as lists (as JSON holds them)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def run_defining_differences(saved: dict, requested: dict) -> list[str]:
    """Keys (dotted) whose values differ between two flattened configs and change the run."""
    keys = sorted(set(saved) | set(requested))
    return [k for k in keys
            if k.startswith(RUN_DEFINING) and k not in NOT_RUN_DEFINING
            and saved.get(k) != requested.get(k)]


def _flat(cfg: ConfigDict) -> dict[str, Any]:
    return flatten(json.loads(cfg.to_json()))


class RunDir:
    """One run's folder (local or gs://): its paths, and what its files say."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- layout ------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def evals_path(self) -> Path:
        return self.root / EVALS_FILE

    # -- the saved config --------------------------------------------------------------------

    def _flag(self) -> str:
        return f"--workdir={str(self.root)!r}"

    def saved_config_flat(self) -> dict[str, Any] | None:
        """The saved config over today's defaults, flattened (keys added to the code since the
        run was saved count as their defaults); None when nothing is saved yet."""
        if not self.config_path.is_file():
            return None
        return _flat(get_config()) | flatten(json.loads(self.config_path.read_text()))

    def saved_config(self) -> ConfigDict:
        """The saved config over today's defaults as a ConfigDict (not validated). ValueError
        when there is none, or for a key this version does not know, naming it."""
        flat = self.saved_config_flat()
        if flat is None:
            raise ValueError(f"{self._flag()} holds no trained run (no {CONFIG_FILE})")
        cfg = get_config()
        for key, value in flat.items():
            parent, _, leaf = key.rpartition(".")
            node = cfg
            for part in parent.split(".") if parent else ():
                node = node.get(part, None)
                if node is None:
                    break
            if node is None or leaf not in node:
                raise ValueError(f"{self.config_path}: config key {key!r} is not known to this "
                                 "version")
            node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
        return cfg

    def config_differences(self, cfg: ConfigDict) -> list[str]:
        """Run-defining keys in which the saved config differs from `cfg` (none when nothing
        is saved yet)."""
        saved = self.saved_config_flat()
        return [] if saved is None else run_defining_differences(saved, _flat(cfg))

    def write_config(self, cfg: ConfigDict) -> None:
        write_atomically(self.config_path, cfg.to_json(indent=2))

    # -- progress and results ----------------------------------------------------------------

    def finished_summary(self) -> dict | None:
        """summary.json if it says the run completed, else None."""
        if not self.summary_path.is_file():
            return None
        summary = json.loads(self.summary_path.read_text())
        return summary if summary.get("completed") else None

    def write_summary(self, summary: dict) -> None:
        write_atomically(self.summary_path, json.dumps(summary, indent=2))

    def read_metrics(self, kind: str | None = None) -> list[dict]:
        """All metric records of the run (optionally of one kind), in the order written;
        FileNotFoundError when the run has none."""
        if not self.metrics_path.exists():
            raise FileNotFoundError(f"no metrics at {self.metrics_path}: has a run been trained "
                                    f"in {self.root}?")
        return read_metrics_file(self.metrics_path, kind)

    def keep_metrics_through(self, step: int) -> None:
        """Drops the metric records after `step` (work a resumed run will redo), atomically."""
        keep_metrics_through(self.metrics_path, step)

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self.metrics_path, self.tensorboard_dir)

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_steps(self) -> list[int]:
        root = self.checkpoints_dir
        return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) \
            if root.is_dir() else []

    def best_step(self, among: Iterable[int] | None = None) -> int | None:
        """The step of the lowest finite validation loss in metrics.jsonl (the first on ties),
        optionally among some steps only; None when there is no such evaluation."""
        allowed = None if among is None else set(among)
        evals = [r for r in self.read_metrics("eval")
                 if isinstance(r.get("val_loss"), float)
                 and (allowed is None or r["step"] in allowed)]
        return min(evals, key=lambda r: r["val_loss"])["step"] if evals else None

    def choose_checkpoint(self, checkpoint: str) -> int:
        """The step of `checkpoint`: "best" (the lowest logged validation loss among the kept
        checkpoints; the latest if none was evaluated), "latest", or a step number that has a
        checkpoint. ValueError naming what is allowed."""
        steps = self.checkpoint_steps()
        if not steps:
            raise ValueError(f"{self._flag()} has no checkpoints to load")
        if checkpoint == "latest":
            return steps[-1]
        if checkpoint == "best":
            best = self.best_step(among=steps)
            return steps[-1] if best is None else best
        if checkpoint.isdigit() and int(checkpoint) in steps:
            return int(checkpoint)
        raise ValueError(f"--checkpoint={checkpoint!r}: allowed best, latest or one of the "
                         f"saved steps {', '.join(map(str, steps))}")

    def checkpoint_state_dir(self, step: int) -> Path:
        """Where the train state of the checkpoint at `step` is (an orbax item folder)."""
        return self.checkpoints_dir / str(step) / "state"

    # -- one writer --------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    def _busy(self, holder: dict[str, Any]) -> RunBusyError:
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since "
               f"{holder.get('since', '?')})") if holder else "another process"
        expiry = ""
        if isinstance(holder.get("expires"), int | float):  # a gs:// lease
            until = datetime.datetime.fromtimestamp(holder["expires"], datetime.UTC)
            expiry = (f" (if that process was killed, its lease frees the run at "
                      f"{until.isoformat(timespec='seconds')})")
        return RunBusyError(f"{self._flag()} is being trained by {who}; wait for it to finish "
                            f"or stop it, or use another workdir{expiry}")

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Holds the run folder for this process while training it (creating the folder), or
        raises RunBusyError naming the live process that holds it. Locally an flock: the kernel
        drops it when its holder exits or is killed, so no lock outlives its process. On gs://
        a lease object (`GcsLease`) that a killed holder leaves to expire."""
        if storage.is_gcs(self.root):
            lease = GcsLease(self.lock_path)
            holder = lease.acquire()
            if holder is not None:
                raise self._busy(holder)
            try:
                yield
            finally:
                lease.release()
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(_read_holder(fd)) from None
            me = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            yield
        finally:
            os.close(fd)

    def holder(self) -> dict[str, Any] | None:
        """{host, pid, since} of the live process training this run, or None when none does
        (a probe: it takes and drops the lock, creating nothing)."""
        if storage.is_gcs(self.root):
            return GcsLease(self.lock_path).live_holder()
        if not self.lock_path.exists():
            return None
        fd = os.open(self.lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        finally:
            os.close(fd)
        return None

    def check_not_held(self) -> None:
        """RunBusyError naming the live process training this run, if one is."""
        holder = self.holder()
        if holder is not None:
            raise self._busy(holder)

    def check_writable(self) -> None:
        """ValueError unless the folder is one this process can write, or can be created in
        one (the nearest existing parent). Creates nothing (on gs://: a probe object, removed
        again; a missing bucket is named)."""
        if storage.is_gcs(self.root):
            self._check_gcs_writable()
            return
        root = self.root
        if root.exists() and not root.is_dir():
            raise ValueError(f"{self._flag()} is a file, not a folder; give a folder (an "
                             "existing run to resume, or a new one)")
        existing = root
        while not existing.exists():  # created later, once the data has loaded
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"{self._flag()} cannot be created: {existing} is a file")
        folders = [existing] + [f for f in (self.checkpoints_dir,) if f.is_dir()]
        for folder in folders:
            try:
                _probe_write(folder)
            except OSError as e:
                raise ValueError(
                    f"{self._flag()} is not writable ({folder}: "
                    f"{e.strerror or type(e).__name__}); nothing was changed. Make it "
                    "writable, or give a folder you can write to") from None


    def _check_gcs_writable(self) -> None:
        storage.check_bucket(self.root)
        if storage.is_object(self.root):
            raise ValueError(f"{self._flag()} is an object, not a folder; give a folder (an "
                             "existing run to resume, or a new one)")
        probe = self.root / f".dvar-write-probe-{uuid.uuid4().hex}"
        try:
            storage.delete_object(probe, storage.create_object(probe, b""))
        except OSError as e:  # gcsfs: HTTP 403 as OSError("Forbidden: ...")
            raise ValueError(
                f"{self._flag()} is not writable ({str(e).splitlines()[0]}); nothing was "
                "changed. Grant this account roles/storage.objectUser on the bucket, or give "
                "a folder you can write to") from None


# A gs:// lease lasts this long unless its holder renews it (every LEASE_SECONDS / 5), so a
# holder that was killed frees the run after at most this long; one on this host whose process
# is gone frees it at once.
LEASE_SECONDS = 300.0


class GcsLease:
    """A run's one-writer lock on GCS, which has no flock: the object WORKDIR/run.lock, created
    only if absent (generation precondition 0), holding {host, pid, since, expires}. Its holder
    renews `expires` from a thread, each time only if the object is still the generation it
    wrote; release deletes it. A lease past `expires`, or held by a process of this host that
    no longer exists, is stale and may be taken over, again with a precondition on the stale
    generation, so two takers cannot both win."""

    def __init__(self, where: Any):
        self.where = where
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # "lease" tells this holder from another in the same process (a test, a notebook).
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "lease": uuid.uuid4().hex}

    def _content(self) -> bytes:
        return json.dumps(self.me | {"expires": time.time() + LEASE_SECONDS}).encode()

    @staticmethod
    def _live(holder: dict[str, Any]) -> bool:
        if float(holder.get("expires", 0)) < time.time():
            return False
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return False  # killed on this very host: no need to wait for the expiry
            except PermissionError:
                pass
        return True

    def _read(self) -> tuple[dict[str, Any], int] | None:
        current = storage.read_object(self.where)
        if current is None:
            return None
        try:
            holder = json.loads(current[0].decode() or "{}")
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), current[1]

    def live_holder(self) -> dict[str, Any] | None:
        """{host, pid, since, expires} of the live holder, or None."""
        current = self._read()
        return current[0] if current is not None and self._live(current[0]) else None

    def acquire(self) -> dict[str, Any] | None:
        """Takes the lease (None) or returns the live holder's record, taking nothing."""
        for _ in range(3):
            try:
                self._generation = storage.create_object(self.where, self._content())
                break
            except storage.PreconditionFailedError:
                current = self._read()
                if current is None:
                    continue  # released in between: try again
                holder, generation = current
                if {k: holder.get(k) for k in self.me} == self.me:
                    # Our own write, its reply lost and the upload retried (hence the 412).
                    self._generation = generation
                    break
                if self._live(holder):
                    return holder
                try:
                    self._generation = storage.replace_object(self.where, self._content(),
                                                              generation)
                    break
                except storage.PreconditionFailedError:
                    continue  # another process took it over first: look again
        else:
            current = self._read()
            return current[0] if current is not None else {}
        self._thread = threading.Thread(target=self._renew, daemon=True, name="dvar-lease")
        self._thread.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 5):
            try:
                self._generation = storage.replace_object(self.where, self._content(),
                                                          self._generation)
            except storage.PreconditionFailedError:
                print(f"warning: lost the lease {self.where} (not renewed for "
                      f"{LEASE_SECONDS:g} s, taken over by another process)", flush=True)
                return
            except OSError as e:  # a network hiccup: the next renewal may succeed
                print(f"warning: could not renew the lease {self.where}: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Bounded: a renewal stuck on the network must not keep a finished run from exiting
            # (the lease then expires by itself).
            self._thread.join(timeout=60)
        if self._generation is not None:
            storage.delete_object(self.where, self._generation)
            self._generation = None


def _read_holder(fd: int) -> dict[str, Any]:
    """What the holder of a lock file wrote about itself (empty if it has not yet)."""
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _probe_write(folder: Path) -> None:
    """Creates and removes a file in `folder`: the only sure test that this process may write
    there (permission bits, ACLs, read-only mounts, root)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".dvar-write-probe-")
    os.close(fd)
    os.unlink(probe)


class DemoDir:
    """A demo's folder (local or gs://): one run folder per objective, report.md, curves.png,
    summary.json."""

    def __init__(self, root: str | os.PathLike):
        self.root = storage.path(root)

    def run_path(self, objective_name: str) -> Path:
        return self.root / objective_name

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    @property
    def curves_path(self) -> Path:
        return self.root / "curves.png"

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE


def read_metrics(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The metric records of the run in `workdir` (see `RunDir.read_metrics`)."""
    return RunDir(workdir).read_metrics(kind)


def sweep_results_path(workdir: str | os.PathLike) -> Path:
    """The results file of a sweep folder (one record per finished run)."""
    return storage.path(workdir) / RESULTS_FILE
