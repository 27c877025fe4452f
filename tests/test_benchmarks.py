"""The throughput benchmark runs, and its two contenders compute the same losses.

Wall-clock numbers are printed by the script, never asserted here (they depend on the machine).
"""


import pytest
from support import load_benchmark


def test_quick_benchmark_prints_a_checked_table(capsys):
    rows = load_benchmark("train_throughput").main(["--quick"])
    out = capsys.readouterr().out
    assert {r["objective"] for r in rows} == {"ar", "diffusion"}
    for row in rows:
        assert row["max_loss_diff"] < 1e-3  # ours and the plain-JAX reference agree
    assert "ours/ref" in out and "GFLOP/s" in out


def test_benchmark_rejects_an_unknown_size():
    with pytest.raises(SystemExit):
        load_benchmark("train_throughput").main(["--sizes", "huge"])
