"""Metric records of a run: one JSON object a line in a metrics file, mirrored to TensorBoard.

Records have `kind` "train" (loss, lr, grad_norm, tokens, epoch, tokens_per_s, mfu) or "eval"
(val_loss, epoch, tokens, flops). This module knows the format, not where the files are: the
run folder (`dvar_jax.run_dir`) gives the paths, and readers use `RunDir.read_metrics`.
"""

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter

from dvar_jax.files import write_atomically


class MetricsWriter:
    """Appends records to the metrics file at `path` and scalars to `tensorboard_dir`."""

    def __init__(self, path: Path, tensorboard_dir: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, kind: str, step: int, values: dict) -> None:
        record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}}
        # One write call per complete line, flushed: a reader (or a crash) never sees half a record.
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, float | int):
                self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def close(self) -> None:
        self._tb.close()


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
    lines = path.read_bytes().splitlines(keepends=True)
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


def read_metrics_file(path: Path, kind: str | None = None) -> list[dict]:
    """All records of the metrics file at `path` (optionally one kind), in the order written."""
    return [r for r in _parse(Path(path)) if kind is None or r["kind"] == kind]


def keep_metrics_through(path: Path, step: int) -> None:
    """Drops the records of steps after `step` (work a resumed run will redo), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in _parse(path) if r["step"] <= step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
