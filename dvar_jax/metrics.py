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


def _parse(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # a line cut short by a kill: the step will be redone
                break
            raise ValueError(f"{path} line {number} is not a JSON record ({e.msg}): "
                             f"{line[:80]!r}") from e
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
