"""benchmarks/tpu_plan.py and benchmarks/scan_compile.py: they run, print their tables and
refuse bad arguments. Their timings are printed by the scripts, never asserted here."""

import json

import pytest
from support import load_benchmark


def test_scan_compile_prints_one_row_per_depth(capsys):
    assert load_benchmark("scan_compile").main(["--depths", "1,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "2"]


@pytest.mark.parametrize("depths", ["two", "0,2"])
def test_scan_compile_refuses_bad_depths(depths, capsys):
    with pytest.raises(SystemExit):
        load_benchmark("scan_compile").main(["--depths", depths])
    assert f"--depths={depths!r}" in capsys.readouterr().err


def test_tpu_plan_refuses_an_unknown_size(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("tpu_plan").main(["--sizes", "140M,999M"])
    assert "['999M'] are not sizes of the study's table" in capsys.readouterr().err


def test_tpu_plan_report_tabulates_recorded_rows(tmp_path, capsys):
    """--report only reads: one row per recorded size in the table's order, the searched
    compile time summed over the tries."""
    plan = {"mesh": {"data": 1, "fsdp": 4, "tensor": 1}, "microbatches": 2,
            "model": {"attention_impl": "splash"}, "peak_bytes_estimate": 3 * 2**30,
            "roofline_step_s": 0.5, "bound": "compute", "roofline_mfu": 0.61}
    rows = [{"size": "140M", "attention_dropout": 0.0, "topology": "v5p:2x2x1", "chips": 4,
             "plan": plan, "tries": [{"compile_s": 10.0}, {"compile_s": 5.0}]},
            {"size": "7M", "attention_dropout": 0.0, "topology": None, "tries": []}]
    out = tmp_path / "plan.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_benchmark("tpu_plan").main(["--report", "--out", str(out)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| 7M | none up to v5p:4x4x8")
    assert table[2] == ("| 140M | v5p:2x2x1 (4 chips) | 1, 4, 1 | 2 | splash | 3.0 | 15 | 0.500 "
                        "| compute | 0.61 |")
