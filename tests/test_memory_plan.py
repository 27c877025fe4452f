"""`dvar plan-memory`: the real train step compiled ahead of time for a TPU topology, on CPU."""

import importlib.util

import pytest

from dvar_jax.cli import main
from dvar_jax.configs.base import get_config

# libtpu is the `tpu` extra, which `make test` installs on x86-64 Linux (where it exists).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs the `tpu` extra (libtpu: x86-64 Linux only)")


def _small_cfg():
    cfg = get_config()
    cfg.model.name = "cpu-s"
    cfg.data.vocab_size = 4096
    cfg.data.seq_len = 64
    cfg.train.batch_size = 8
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 1
    return cfg


@pytest.fixture(scope="module")
def v5p_plan():
    from dvar_jax.memory_plan import plan_memory, tpu_devices

    return plan_memory(_small_cfg(), tpu_devices("v5p:2x2x1"))


@pytest.mark.slow
def test_parameter_bytes_per_device_match_a_hand_count(v5p_plan):
    d, layers, width, h_f, vocab = 128, 4, 128, 320, 4224  # cpu-s, 4096 tokens + MASK padded
    weights = vocab * d + layers * (d * 3 * width + width * d + d * 2 * h_f + h_f * d)
    norms = (2 * layers + 1) * d
    # fsdp=4 splits every weight's `embed` dimension; norm gains stay whole; float32 = 4 bytes.
    assert v5p_plan["param_bytes"] == 4 * (weights // 4 + norms)
    # AdamW keeps two moments shaped like the parameters, plus a few scalar counters.
    assert 0 <= v5p_plan["opt_state_bytes"] - 2 * v5p_plan["param_bytes"] <= 64
    assert v5p_plan["topology_devices"] == 4 and v5p_plan["chip"] == "v5p"
    assert v5p_plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}


@pytest.mark.slow
def test_compiled_cost_and_roofline_are_consistent(v5p_plan):
    p = v5p_plan
    assert p["argument_bytes"] >= p["param_bytes"] + p["opt_state_bytes"]
    assert p["temp_bytes"] > 0 and p["fits"]
    # The compiled per-device FLOPs cover at least this device's share of the model's matmuls.
    assert p["flops_per_device"] >= 0.9 * p["model_flops_per_step"] / 4
    assert p["roofline_step_s"] == pytest.approx(max(p["flops_per_device"] / 459e12,
                                                     p["bytes_accessed_per_device"] / 2765e9))
    assert 0 < p["roofline_mfu"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["plan-memory"], "--topology is required"),
    (["plan-memory", "--topology=v99:1x1"], "--topology='v99:1x1'"),
    (["plan-memory", "--topology=v5p:2x2x1", "--mesh=1,x,1"], "--mesh='1,x,1'"),
    (["plan-memory", "--topology=v5p:2x2x1", "--mesh=3,1,1"], "does not match the 4 devices"),
    (["plan-memory", "--topology=v5p:2x2x1", "--workdir=/nonexistent/run"],
     "--workdir='/nonexistent/run' holds no trained run (no config.json)"),
    (["plan-memory", "--topology=v5p:2x2x1", "--workdir=/nonexistent/run",
      "--config=configs/tiny.py"], "--config=FILE and --workdir both name the config"),
])
def test_plan_memory_wrong_arguments(argv, message, capsys):
    assert main(["dvar", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_memory_of_a_trained_run_uses_its_saved_config(trained_runs, capsys):
    """--workdir plans the run's config.json (the run folder's saved config over today's
    defaults), with --config.KEY changes on top: here the run's cpu-xs model at batch 8."""
    workdir = trained_runs["ar"]
    argv = ["dvar", "plan-memory", "--topology=v5p:2x2x1", "--mesh=1,4,1",
            f"--workdir={workdir}", "--config.data.vocab_size=400"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ar cpu-xs on v5p:2x2x1" in out and "batch 8 x 32" in out, out
