"""`dvar plan-memory`: the real train step compiled ahead of time for a TPU topology, on CPU."""

import re

import pytest
from support import needs_libtpu

from dvar_jax.cli import main
from dvar_jax.configs.base import get_config

pytestmark = needs_libtpu


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


@pytest.mark.parametrize("message, expected", [
    ("RESOURCE_EXHAUSTED: ... the total memory required for HLO temporaries (229.90G) exceeds "
     "available HBM (95.73G). HLO module: jit_step_fn.", (229.90 * 2**30, 95.73 * 2**30)),
    ("HLO temporaries (1.18T) exceeds available HBM (15.75G)", (1.18 * 2**40, 15.75 * 2**30)),
    ("INTERNAL: something else", None),
])
def test_xla_out_of_memory_messages_are_read_for_their_bytes(message, expected):
    from dvar_jax.memory_plan import parse_hbm_oom

    got = parse_hbm_oom(message)
    assert got == (None if expected is None else pytest.approx(expected))


def test_a_plan_that_does_not_fit_is_reported_with_what_would_fit(capsys):
    """No traceback: the bytes needed and available, and flags to try (cpu-xs at 128 x 8192
    with xla attention needs about 49 GiB a chip; a v5e has 16)."""
    argv = ["dvar", "plan-memory", "--topology=v5e:2x2", "--mesh=1,4,1",
            "--config.model.name=cpu-xs", "--config.data.seq_len=8192",
            "--config.train.batch_size=128", "--config.data.vocab_size=400",
            "--config.model.loss_impl=xla"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    match = re.search(r"does not fit: needs about ([\d.,]+) GiB per chip, ([\d.]+) GiB available",
                      out)
    assert match, out
    needed, available = float(match[1].replace(",", "")), float(match[2])
    assert needed > available > 15
    assert "--config.model.remat=full" in out
    m = int(re.search(r"--config.train.microbatches=(\d+)", out)[1])
    # The smallest accumulation that brings the activations (all but ~0 GiB of state) under
    # 90% of the chip, dividing the batch so that every slice splits over the 4 chips.
    assert 128 % m == 0 and (128 // m) % 4 == 0
    assert needed / m <= 0.9 * available < needed / (m // 2)
    assert re.search(r"more chips: about (\d+)", out)


def test_kernel_flops_reach_the_roofline():
    """XLA cannot see inside a Pallas kernel: ours declare their cost, splash is counted."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from dvar_jax.kernels.common import lowering_for
    from dvar_jax.kernels.cross_entropy import fused_cross_entropy
    from dvar_jax.memory_plan import splash_flops, tpu_devices
    from dvar_jax.model.transformer import TransformerConfig

    tokens, dim, vocab = 1024, 256, 8192
    on_chip = SingleDeviceSharding(tpu_devices("v5p:2x2x1")[0])
    shapes = [jax.ShapeDtypeStruct(s, t, sharding=on_chip) for s, t in
              [((tokens, dim), jnp.float32), ((vocab, dim), jnp.float32),
               ((tokens,), jnp.int32), ((tokens,), jnp.float32)]]
    grads = jax.jit(jax.grad(lambda *a: fused_cross_entropy(*a)[0], argnums=(0, 1)))
    with lowering_for("tpu"):
        cost = grads.lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    # Forward logits, then dh and dE each recompute the logits and multiply: 5 matmuls of
    # 2 T d V; XLA adds only elementwise work around them.
    matmuls = 5 * 2 * tokens * dim * vocab
    assert matmuls <= cost["flops"] <= 1.01 * matmuls

    # splash, causal, seq 1024 in blocks of 512: 3 of the 4 blocks; forward 2 matmuls, the
    # backward 7, and with remat the forward twice: (2 * 2 + 7) x 2 b h s^2 d x 3/4 per layer.
    model = TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16,
                              causal=True, remat="dots")
    assert splash_flops(model, batch=8, seq=1024) == 2 * 11 * 2 * 8 * 4 * 1024**2 * 16 * 0.75


def test_a_wide_model_gets_loss_tiles_that_fit_vmem():
    """The study's 2.6B (d = 2560, bfloat16, GPT-2 vocabulary) at the default 256 x 384 tiles
    asked Mosaic for 16 MiB of VMEM and failed to compile; smaller tiles compile."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from dvar_jax.kernels.common import lowering_for
    from dvar_jax.kernels.cross_entropy import (
        VMEM_BUDGET,
        fit_blocks_to_vmem,
        fused_cross_entropy,
        kernel_vmem_bytes,
    )
    from dvar_jax.memory_plan import tpu_devices

    # Hand count at 256 x 384, d = 2560, 2 bytes: inputs 2 (256 + 384) 2560 2, output block
    # twice in bf16 and once in f32, and two f32 logits tiles.
    assert kernel_vmem_bytes(256, 384, 2560, 2) == (2 * 640 * 2560 * 2 + 2 * 384 * 2560 * 2
                                                    + 384 * 2560 * 4 + 2 * 256 * 384 * 4)
    assert fit_blocks_to_vmem(256, 384, 1024, 2) == (256, 384)  # narrow models keep theirs
    blocks = fit_blocks_to_vmem(256, 384, 2560, 2)
    assert blocks == (256, 256) and kernel_vmem_bytes(*blocks, 2560, 2) <= VMEM_BUDGET

    on_chip = SingleDeviceSharding(tpu_devices("v5p:2x2x1")[0])
    shapes = [jax.ShapeDtypeStruct(s, t, sharding=on_chip) for s, t in
              [((1024, 2560), jnp.bfloat16), ((50304, 2560), jnp.bfloat16),
               ((1024,), jnp.int32), ((1024,), jnp.float32)]]
    grads = jax.jit(jax.grad(lambda *a: fused_cross_entropy(*a)[0], argnums=(0, 1)))
    with lowering_for("tpu"):
        grads.lower(*shapes).compile()
