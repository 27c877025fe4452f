"""benchmarks/sharding.py: one table row per mesh, and per-device bytes that match a hand count.

The script always runs in a subprocess: it sets XLA_FLAGS for 8 simulated devices before JAX
starts, which must not leak into this process. Timings are printed, never asserted.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "sharding.py"
MESHES = [[1, 1, 1], [8, 1, 1], [1, 8, 1], [2, 2, 2], [1, 4, 2]]
F32 = 4


def _run(args: list[str], env_extra: dict[str, str] | None = None, python: list[str] | None = None,
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    env.pop("XLA_FLAGS", None)  # the script's own flag, not whatever this shell carries
    return subprocess.run([sys.executable, *(python or [str(SCRIPT)]), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def _hand_param_bytes(model: dict, mesh: list[int]) -> int:
    """Parameter bytes one device holds, counted from the architecture and configs/base.py's
    rule table restated by hand (not through the sharding code):

    every >= 2-D weight has exactly one dimension named `embed` (-> fsdp) and one named
    `vocab`, `qkv`, `heads` or `mlp` (-> tensor), so it is split fsdp x tensor ways; the norm
    gains (`norm` -> None) are whole on every device; nothing maps to `data`.
    """
    d, layers = model["d_model"], model["n_layers"]
    width = model["n_heads"] * model["head_dim"]
    ffn = int(8 * d / 3 / 64) * 64  # SwiGLU width, Megatron's rounding
    matrices = [(model["vocab_rows"], d)]  # tied embedding [vocab, embed]
    for _ in range(layers):
        matrices += [(d, 3 * width),  # qkv [embed, qkv]
                     (width, d),  # attn_out [heads, embed]
                     (d, 2 * ffn),  # mlp_in [embed, mlp]
                     (ffn, d)]  # mlp_out [mlp, embed]
    vectors = 2 * layers + 1  # attn_norm, mlp_norm per block + final_norm, each [d]
    _, fsdp, tensor = mesh
    per_device = 0
    for rows, cols in matrices:
        assert rows * cols % (fsdp * tensor) == 0, (rows, cols, mesh)
        per_device += rows * cols // (fsdp * tensor)
    return F32 * (per_device + vectors * d)


@pytest.mark.slow
def test_quick_run_prints_one_row_per_mesh_with_hand_counted_bytes(tmp_path):
    out = tmp_path / "sharding.json"
    # XLA's warnings shown (level 0), to see that no mesh needs a replicating reshard.
    proc = _run(["--quick", "--json", str(out)], env_extra={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-4000:]
    text = proc.stdout
    assert "jax " in text and "partitioning overhead" in text

    # The table: one row per mesh, single device first.
    rows = [line.split() for line in text.splitlines() if re.match(r"\d+x\d+x\d+ ", line)]
    assert [r[0] for r in rows] == ["x".join(map(str, m)) for m in MESHES]
    assert [int(r[1]) for r in rows] == [1, 8, 8, 8, 8]

    result = json.loads(out.read_text())
    model, args = result["meta"]["model"], result["meta"]["args"]
    assert model == {"d_model": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16,
                     "vocab_rows": 384}  # --quick's model
    assert [r["mesh"] for r in result["rows"]] == MESHES
    counters = set()
    for row, cells in zip(result["rows"], rows, strict=True):
        mesh, got = row["mesh"], row["bytes_per_device"]
        assert got["params"] == _hand_param_bytes(model, mesh), mesh
        assert cells[5] == f"{got['params'] / 2**20:.3f}"  # the table shows the same bytes
        # AdamW's two moments are sharded like the parameters; the rest is a few replicated
        # scalar counters, the same on every mesh.
        counters.add(got["opt_state"] - 2 * got["params"])
        # memory_analysis is per device: the arguments are this device's state (+ the int32
        # step counter) and its rows of the [batch, seq + 1] int32 token batch.
        token_rows = args["batch"] // (mesh[0] * mesh[1])
        assert got["xla_argument"] == (got["params"] + got["opt_state"] + 4
                                       + token_rows * (args["seq"] + 1) * 4), mesh
        assert got["xla_temp"] is not None and got["xla_temp"] > 0
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0
    assert len(counters) == 1 and 0 <= counters.pop() <= 64
    # Concretely, for (1, 8, 1): each weight's `embed` dimension split 8 ways.
    fsdp8 = result["rows"][2]["bytes_per_device"]["params"]
    assert fsdp8 == F32 * ((384 * 32 + 32 * 96 + 32 * 32 + 32 * 128 + 64 * 32) // 8 + 3 * 32)


def test_too_few_devices_is_a_clear_error():
    """JAX started (with 1 CPU device) before the script could ask for 8."""
    start = ("import jax, runpy, sys; jax.devices(); sys.argv = ['sharding.py', '--quick']; "
             f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = _run([], python=["-c", start])
    assert proc.returncode != 0
    assert "needs 8 simulated CPU devices but JAX has 1" in proc.stderr


def test_a_batch_the_meshes_cannot_split_is_refused():
    proc = _run(["--quick", "--batch", "12"])
    assert proc.returncode == 2
    assert "--batch 12 must divide by 8" in proc.stderr
