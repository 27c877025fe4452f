"""Results files: one JSON record a line, appended by any number of processes at once.

Evaluations (`<workdir>/eval.jsonl`) and sweeps append records here. A writer takes an exclusive
`flock` on the file, writes one complete line with a single `write`, and fsyncs before letting
go, so concurrent writers interleave whole records and a reader never sees half of one (a kill
mid-write can only leave a final line without its newline, which `read_records` reports).

On gs:// there is no flock and no append: the file is one object, and a writer reads it with
its generation, adds its line, and uploads the whole under "only if still at that generation"
(`dvar_jax.storage.replace_object`), reading and trying again when another writer got there
first. So concurrent writers still interleave whole records and `append_once` still records a
name once, and readers (`dvar fit`) read one JSONL object as they read a local file.
"""

import fcntl
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from dvar_jax import storage


def _plain(value: Any) -> Any:
    """JSON-safe: numpy/jax scalars as Python numbers, non-finite floats as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _line(record: dict) -> bytes:
    return (json.dumps(_plain(record), sort_keys=False) + "\n").encode()


def _append_gcs(path: str, record: dict, once: bool) -> bool:
    """Appends to a gs:// JSONL object with a generation precondition, retried on conflict;
    with `once`, nothing (False) if a record of the same name is there."""
    for attempt in range(100):
        current = storage.read_object(path)
        data, generation = current if current is not None else (b"", 0)
        if once and record["name"] in {r.get("name") for r in _parse(data, path)}:
            return False
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            if generation:
                storage.replace_object(path, data + _line(record), generation)
            else:
                storage.create_object(path, _line(record))
            return True
        except storage.PreconditionFailedError:  # another writer appended first: read it again
            time.sleep(random.uniform(0, 0.05 * min(attempt + 1, 20)))
    raise OSError(f"{path}: gave up appending after 100 conflicting writers")


def append_record(path: str | Path, record: dict) -> None:
    """Appends `record` as one line to the JSONL file at `path` (created with its folder;
    gs:// too)."""
    if storage.is_gcs(path):
        _append_gcs(os.fspath(path), record, once=False)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _line(record)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A previous writer killed mid-line left no newline: start on a fresh line, so that
        # only its record is damaged and not this one too.
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _parse(data: bytes, path: Any) -> list[dict]:
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{path}: line {number} is not valid JSON ({e}); a results file holds one "
                "JSON object per line. Fix or remove that line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is {type(record).__name__}, not a JSON "
                             "object; a results file holds one JSON object per line")
        records.append(record)
    return records


def read_records(path: str | Path) -> list[dict]:
    """Every record of a JSONL results file (local or gs://), in order. A line that is not a
    JSON object is a ValueError naming the file and the line number (the file is left as it
    is)."""
    return _parse(storage.path(path).read_bytes(), path)


def recorded_names(path: str | Path) -> set[str]:
    """Names of the runs a results file already holds (none if it does not exist)."""
    path = storage.path(path)
    return {r.get("name") for r in read_records(path)} if path.is_file() else set()


def append_once(path: str | Path, record: dict) -> bool:
    """Appends `record` unless a record of the same `name` is there already; False if it was.

    The check and the append happen under an exclusive lock on PATH.lock, so two sweeps
    finishing the same run (or a multi-host run's every host) add it once; append_record's own
    lock keeps each line whole for writers that do not take this one. On gs:// the check and
    the append are one conditional upload (see the module's docstring).
    """
    if storage.is_gcs(path):
        return _append_gcs(os.fspath(path), record, once=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if record["name"] in recorded_names(path):
            return False
        append_record(path, record)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
