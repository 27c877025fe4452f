"""benchmarks/kernels.py: the loss-memory check and the timing code paths (never their clock)."""


import jax
from support import LIBTPU_PLATFORM, load_benchmark


def test_quick_run_checks_loss_memory_and_times_every_impl(capsys):
    bench = load_benchmark("kernels")
    rows = bench.main(["--quick"])
    out = capsys.readouterr().out
    memory = {(r["target"].split()[0], r["impl"]): r for r in rows if r["part"] == "memory"}
    checked = {"cpu": ("chunked",)} | ({"tpu": ("chunked", "pallas")} if LIBTPU_PLATFORM else {})
    for target, impls in checked.items():
        naive = memory[(target, "naive")]["temp_bytes"]
        assert naive >= 2 * 2048 * 8192 * 4  # the quick shapes: two float32 [T, V] buffers
        for impl in impls:
            assert memory[(target, impl)]["temp_bytes"] <= naive / 4
            assert memory[(target, impl)]["check"] == "PASS"
    assert not bench.failed(rows)

    timed = [r for r in rows if r["part"] in ("attention", "loss")]
    assert {(r["part"], r["impl"]) for r in timed} == {
        *(("attention", i) for i in ("xla", "jax.nn.dpa", "pallas", "splash")),
        *(("loss", i) for i in ("naive", "chunked", "pallas"))}
    assert len([r for r in timed if r["part"] == "attention"]) == 8  # causal and full
    assert all(r["ms"] > 0 and "note" not in r for r in timed)  # every row ran (interpret)
    assert "TFLOP/s" in out and "/2 causal" in out


def test_gpu_rows_report_unsupported_kernels(monkeypatch):
    """On a GPU backend our Mosaic kernels are reported, not run; the rest still run."""
    bench = load_benchmark("kernels")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args = bench.parse_args(["--seqs", "128", "--batch", "1", "--heads", "2", "--head-dim", "16",
                             "--loss-tokens", "64", "--loss-vocab", "256", "--loss-dim", "16",
                             "--warmup", "0", "--repeats", "1"])
    rows = {(r["part"], r["impl"], r["causal"]): r for r in bench.timing_rows(args)}
    for key in [("attention", "pallas", True), ("attention", "splash", False),
                ("loss", "pallas", None)]:
        assert rows[key]["note"] == "not supported on gpu"
    for key in [("attention", "xla", True), ("attention", "jax.nn.dpa", False),
                ("loss", "chunked", None)]:
        assert rows[key]["ms"] > 0
    assert ("attention", "jax.nn.dpa cudnn", True) in rows  # here (CPU) an error row


def test_cpu_without_cpu_timing_skips_timing(capsys):
    rows = load_benchmark("kernels").main(["--parts", "timing"])
    assert rows == []
    assert "needs a GPU or TPU backend" in capsys.readouterr().out
