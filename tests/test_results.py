"""Results files: concurrent appends never corrupt them; bad lines are named."""

import json
import multiprocessing

import pytest

from dvar_jax.results import append_record, read_records


def _writer(path, worker: int, count: int) -> None:
    for i in range(count):
        # Records of very different sizes, so torn writes would show.
        append_record(path, {"worker": worker, "i": i, "pad": "x" * (37 * i % 5000)})


def test_concurrent_writers_append_whole_records(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    records = read_records(path)
    assert len(records) == 160
    for w in range(4):  # each writer's records complete and in its own order
        assert [r["i"] for r in records if r["worker"] == w] == list(range(40))
    assert all(r["pad"] == "x" * (37 * r["i"] % 5000) for r in records)


def test_values_are_made_json_safe(tmp_path):
    import numpy as np

    path = tmp_path / "r.jsonl"
    append_record(path, {"a": np.float32(1.5), "b": float("nan"), "c": (1, np.int64(2)),
                         "d": {"e": float("inf")}})
    assert read_records(path) == [{"a": 1.5, "b": "nan", "c": [1, 2], "d": {"e": "inf"}}]


def test_a_torn_last_line_is_named_and_the_next_record_starts_fresh(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"i": 0})
    with path.open("a") as f:
        f.write('{"i": 1, "val')  # a writer killed mid-line
    append_record(path, {"i": 2})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"i": 0} and json.loads(lines[2]) == {"i": 2}
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 is not valid JSON"):
        read_records(path)
    assert path.read_bytes() == before  # reading never changes the file


def test_a_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"i": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 is list, not a JSON object"):
        read_records(path)
