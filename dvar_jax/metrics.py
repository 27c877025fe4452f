"""Metric records of a run: one JSON object a line in `metrics.jsonl`, mirrored to TensorBoard.

Records have `kind` "train" (loss, lr, grad_norm, tokens, epoch, tokens_per_s, mfu) or "eval"
(val_loss, epoch, tokens, flops). Readers (reports, plots, sweeps) only need `read_metrics`.
"""

import json
import math
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends records to `<workdir>/metrics.jsonl` and scalars to `<workdir>/tb/`."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(Path(workdir) / "tb"))

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


def read_metrics(workdir: Path, kind: str | None = None) -> list[dict]:
    """All records of a run (optionally one kind), in the order they were written."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics at {path}: has a run been trained in {workdir}?")
    return [r for r in _parse(path) if kind is None or r["kind"] == kind]


def keep_metrics_through(workdir: Path, step: int) -> None:
    """Drops the records of steps after `step` (work a resumed run will redo), atomically."""
    from dvar_jax.data.corpus import write_atomically

    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [r for r in _parse(path) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    write_atomically(path, lambda f: f.write(text.encode()))
