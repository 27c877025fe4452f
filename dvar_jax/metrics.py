"""Metric records of a run: one JSON object a line in a metrics file, mirrored to TensorBoard.

Records have `kind` "train" (loss, lr, grad_norm, tokens, epoch, tokens_per_s, mfu) or "eval"
(val_loss, epoch, tokens, flops). This module knows the format, not where the files are: the
run folder (`dvar_jax.run_dir`) gives the paths, and readers use `RunDir.read_metrics`.
"""

import io
import json
import math
import os
from pathlib import Path

from tensorboardX import SummaryWriter, record_writer

from dvar_jax import storage
from dvar_jax.files import write_atomically


class MetricsWriter:
    """Appends records to the metrics file at `path` and scalars to `tensorboard_dir`.

    On gs:// (objects cannot be appended to) the writer keeps the file's lines and uploads the
    whole object after each record: one small upload a log line, and the object always holds
    every record written so far, as the local file does. TensorBoard's event file is kept in
    memory and uploaded whole on each of tensorboardX's flushes and at close
    (`_GcsEventFile`)."""

    def __init__(self, path: "Path | os.PathLike", tensorboard_dir: "Path | os.PathLike"):
        self.path = storage.path(path)
        self._gcs = storage.is_gcs(path)
        self._lines = b""
        if self._gcs:
            self._lines = self.path.read_bytes() if self.path.exists() else b""
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(os.fspath(tensorboard_dir))

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        if self._gcs:
            self._lines += line.encode()
            write_atomically(self.path, self._lines)
        else:
            # One write call per complete line, flushed: a reader (or a crash) never sees half
            # a record.
            with self.path.open("a") as f:
                f.write(line)
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, float | int):
                self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def close(self) -> None:
        self._tb.close()


class NoMetricsWriter:
    """What a multi-host run's processes other than 0 write: nothing (one writer per run)."""

    path = None

    def write(self, kind: str, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _GcsEventFile:
    """A TensorBoard event file on gs://: bytes kept in memory, the whole uploaded when
    tensorboardX flushes (every flush_secs, and at close). Replaces tensorboardX's own gs://
    writer, which needs google-cloud-storage and uploads once more from `__del__`, at
    interpreter exit, where an unreachable bucket hangs the exit in retries."""

    def __init__(self, path: str):
        self.path = path
        self._buffer = io.BytesIO()
        self._uploaded = -1
        self._closed = False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if self._buffer.tell() != self._uploaded:
            write_atomically(self.path, self._buffer.getvalue())
            self._uploaded = self._buffer.tell()

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True


class _GcsEventFiles:
    """tensorboardX's writer factory for the gs:// prefix."""

    def open(self, path: str) -> _GcsEventFile:
        return _GcsEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # GCS has no folders to create


record_writer.register_writer_factory("gs", _GcsEventFiles())


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


KINDS = ("train", "eval")


def _record(line: bytes) -> dict:
    """One metrics line as a record; ValueError saying what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"byte {e.start} is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    if record.get("kind") not in KINDS:
        raise ValueError(f"kind={record.get('kind')!r}, allowed {', '.join(KINDS)}")
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        raise ValueError(f"step={record.get('step')!r}, expected an integer")
    return record


def _parse(path: Path) -> list[dict]:
    """Every record of a metrics file; ValueError naming the file and line of a bad one.

    One exception: a last line without its newline that does not parse is a record cut short
    by a kill mid-write (each record is written whole, newline last). It is dropped, as its
    step will be trained and logged again; a bad line anywhere else, or a bad last line that
    was written whole, is damage the user must look at, and nothing is changed.
    """
    lines = storage.path(path).read_bytes().splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_record(line))
        except ValueError as e:
            if number == len(lines) and not line.endswith(b"\n"):
                break
            shown = line.decode("utf-8", errors="replace").rstrip("\n")[:80]
            raise ValueError(
                f"{path} line {number} is not a metrics record ({e}): {shown!r}; allowed: one "
                f"JSON object per line with kind ({', '.join(KINDS)}) and an integer step. "
                "The file was not changed: repair or delete that line, then run again"
            ) from None
    return records


def read_metrics_file(path: "Path | os.PathLike", kind: str | None = None) -> list[dict]:
    """All records of the metrics file at `path` (optionally one kind), in the order written."""
    return [r for r in _parse(storage.path(path)) if kind is None or r["kind"] == kind]


def keep_metrics_through(path: "Path | os.PathLike", step: int) -> None:
    """Drops the records of steps after `step` (work a resumed run will redo), atomically."""
    path = storage.path(path)
    if not path.exists():
        return
    kept = [r for r in _parse(path) if r["step"] <= step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
