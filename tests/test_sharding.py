"""Sharding by logical axes: mesh from config, the rule table, parameter placement, and
training on simulated devices that matches a single device."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from support import run_together

from dvar_jax.config import transformer_config
from dvar_jax.configs.base import get_config
from dvar_jax.model.transformer import Transformer
from dvar_jax.sharding import (
    logical_to_spec,
    maybe_initialize_distributed,
    mesh_shape,
    rules_from_config,
    spec_table,
)

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "partition_specs_140M_mesh_1x4x2.json"
RULES = rules_from_config(get_config().mesh.rules)


def _mesh_cfg(data, fsdp, tensor):
    return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


@pytest.mark.parametrize("sizes, devices, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((1, -1, 2), 8, (1, 4, 2)), ((2, 2, 2), 8, (2, 2, 2)),
    ((1, 1, -1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_minus_one_axis(sizes, devices, expected):
    assert mesh_shape(_mesh_cfg(*sizes), devices) == expected


@pytest.mark.parametrize("sizes, devices, message", [
    ((2, 2, 1), 8, "the product 4 does not match the 8 devices"),
    ((-1, -1, 1), 8, "at most one may be -1"),
    ((3, -1, 1), 8, "the 8 devices do not divide by 3"),
    ((0, 1, 1), 1, "mesh.data=0"),
])
def test_impossible_meshes_are_refused_naming_the_sizes(sizes, devices, message):
    with pytest.raises(ValueError, match=message):
        mesh_shape(_mesh_cfg(*sizes), devices)


def test_rules_map_logical_names_to_mesh_axes():
    assert logical_to_spec(("batch", None), RULES) == jax.sharding.PartitionSpec(
        ("data", "fsdp"), None)
    assert logical_to_spec(("vocab", "embed"), RULES) == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    with pytest.raises(ValueError, match="'nope'"):
        logical_to_spec(("nope",), RULES)
    with pytest.raises(ValueError, match="'pipeline'"):
        rules_from_config((("embed", "pipeline"),))
    with pytest.raises(ValueError, match="more than one rule"):
        rules_from_config((("embed", "fsdp"), ("embed", None)))


def test_distributed_mode_is_checked_and_off_by_default_on_one_host(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert maybe_initialize_distributed("auto") is False
    assert maybe_initialize_distributed("off") is False
    with pytest.raises(ValueError, match="distributed='maybe'"):
        maybe_initialize_distributed("maybe")


def _shard_shapes_140m(mesh_sizes: dict[str, int], scan_layers: bool = False) -> dict[str, dict]:
    cfg = get_config()
    cfg.model.name = "140M"
    cfg.model.scan_layers = scan_layers
    model_cfg = transformer_config(cfg, tokenizer_vocab_size=50257)
    params = nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))),
                       nnx.Param)
    shapes = {jax.tree_util.keystr(p): x.shape
              for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
    table = {}
    for path, spec in spec_table(params, RULES).items():
        shape = shapes[path]
        shard = [dim // math.prod(mesh_sizes[a] for a in ([] if axes is None else
                                                          [axes] if isinstance(axes, str)
                                                          else axes))
                 for dim, axes in zip(shape, spec, strict=True)]
        table[path] = {"spec": spec, "shape": list(shape), "shard": shard}
    return table


def test_golden_partition_specs_of_the_140m_model_on_a_1x4x2_mesh():
    """Every parameter's mesh axes and shard shape: a change here changes every TPU run.

    Regenerate deliberately with DVAR_UPDATE_GOLDEN=1 and review the diff.
    """
    got = _shard_shapes_140m({"data": 1, "fsdp": 4, "tensor": 2})
    if os.environ.get("DVAR_UPDATE_GOLDEN"):
        lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(got.items())]
        GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one line per parameter
    assert got == json.loads(GOLDEN.read_text())
    assert len(got) == 1 + 15 * 6 + 1  # embedding, 15 blocks x 6 tensors, final norm
    assert got["['embed']['embedding']"] == {
        "spec": ["tensor", "fsdp"], "shape": [50304, 768], "shard": [25152, 192]}


def test_a_scanned_model_shards_each_layer_as_the_unrolled_model():
    """Same rules: a stacked parameter's spec is the unrolled block's with the layer axis
    (never sharded) in front, its shard the unrolled one's, one per layer."""
    unrolled = json.loads(GOLDEN.read_text())
    scanned = _shard_shapes_140m({"data": 1, "fsdp": 4, "tensor": 2}, scan_layers=True)
    assert len(scanned) == 1 + 6 + 1
    for path, got in scanned.items():
        if not path.startswith("['blocks']"):
            assert got == unrolled[path]
            continue
        for layer in range(15):
            want = unrolled[path.replace("['blocks']", f"['blocks'][{layer}]", 1)]
            assert got == {key: [first, *want[key]] for key, first in
                           (("spec", None), ("shape", 15), ("shard", 15))}


@pytest.fixture(scope="module")
def sharded_runs():
    """tests/sharded_worker.py on 8 simulated CPU devices (the device count is fixed when JAX
    starts, so it runs in its own process)."""
    env = {**os.environ,
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                         + " --xla_force_host_platform_device_count=8").strip(),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, str(TESTS / "sharded_worker.py")], env=env,
                          capture_output=True, text=True, cwd=TESTS.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _expected_shard(shape, names, mesh):
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    rules = dict(RULES)
    out = []
    for dim, name in zip(shape, names, strict=True):
        axes = rules[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(dim // math.prod(sizes[a] for a in axes))
    return out


LOGICAL = {"embedding": ("vocab", "embed"), "qkv": ("embed", "qkv"),
           "attn_out": ("heads", "embed"), "mlp_in": ("embed", "mlp"),
           "mlp_out": ("mlp", "embed"), "scale": ("norm",)}


@pytest.mark.slow
def test_each_parameter_is_sharded_as_the_rules_say(sharded_runs):
    for run in sharded_runs:
        for path, leaf in run["shards"].items():
            kind = next(k for k in LOGICAL if f"'{k}'" in path)
            names = LOGICAL[kind]
            assert leaf["shard"] == _expected_shard(leaf["shape"], names, run["mesh"]), (
                run["mesh"], path)
        # Optimizer moments are sharded like their parameters, nothing held whole.
        param_shards = sorted(tuple(map(tuple, (v["shape"], v["shard"])))
                              for v in run["shards"].values())
        moments = sorted(tuple(map(tuple, leaf)) for leaf in run["opt_leaves"] if leaf[0])
        assert moments == sorted(param_shards * 2)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_sharded_training_matches_one_device(sharded_runs, objective):
    """Losses of 3 steps, parameters after them, and the validation loss agree with a single
    device to float32 reduction-order noise: rtol 1e-6 on losses, atol 1e-5 on parameters
    (observed: at most 4e-6 after 3 AdamW steps at lr 1e-2)."""
    runs = [r for r in sharded_runs if r["objective"] == objective and not r["kernels"]]
    reference = next(r for r in runs if r["mesh"] == [1, 1, 1])
    meshes = [r["mesh"] for r in runs]
    assert [8, 1, 1] in meshes and [1, 8, 1] in meshes and [2, 2, 2] in meshes \
        and [1, 4, 2] in meshes
    for run in runs:
        assert run["step"] == 3
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-6)
        assert run["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)
        for key, values in reference["params"].items():
            np.testing.assert_allclose(run["params"][key], values, rtol=0, atol=1e-5,
                                       err_msg=f"{run['mesh']} {key}")
    assert reference["losses"][0] != reference["losses"][-1]  # the steps changed the model


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_pallas_kernels_on_a_mesh_match_xla_on_one_device(sharded_runs, objective):
    """attention_impl = loss_impl = pallas on 2x2x2 and 1x4x2 meshes (kernels per shard, the
    embedding gathered for the loss and its gradient summed back) train to the same losses and
    parameters as the XLA model on one device: rtol 1e-5 on losses, atol 1e-5 on parameters."""
    runs = [r for r in sharded_runs if r["objective"] == objective]
    reference = next(r for r in runs if r["mesh"] == [1, 1, 1] and not r["kernels"])
    kernel_runs = [r for r in runs if r["kernels"]]
    assert sorted(r["mesh"] for r in kernel_runs) == [[1, 4, 2], [2, 2, 2]]
    for run in kernel_runs:
        assert run["step"] == 3
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5)
        assert run["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
        for key, values in reference["params"].items():
            np.testing.assert_allclose(run["params"][key], values, rtol=0, atol=1e-5,
                                       err_msg=f"{run['mesh']} {key}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_two_hosts_each_feeding_its_rows_match_one_device(objective):
    """Two processes (2 CPU devices each, mesh data=2 x tensor=2) joined by
    jax.distributed: each reads only its half of every global batch, the global array is
    assembled with make_array_from_process_local_data, and the losses equal one device's."""
    sys.path.insert(0, str(TESTS))
    from multihost_reference import STEPS, batches_for, setup

    from dvar_jax.step import create_train_state, make_train_step

    cfg, model_cfg, tx, objective_fn, _ = setup(objective)
    graphdef, state, _ = create_train_state(model_cfg, tx, cfg.seed)
    step = make_train_step(graphdef, objective_fn, tx, mask_id=200, seed=cfg.seed)
    batches = batches_for(0, 1)
    expected = []
    for i in range(STEPS):
        state, metrics = step(state, batches.batch(i))
        expected.append(float(metrics["loss"]))

    port = str(_free_port())
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(TESTS)}
    outputs = run_together([[sys.executable, str(TESTS / "multihost_worker.py"), str(i), "2",
                             port, objective] for i in range(2)], timeout=300, env=env,
                           cwd=TESTS.parent)
    for rc, _, err in outputs:
        assert rc == 0, err[-4000:]
    result = json.loads(outputs[0][1].strip().splitlines()[-1])
    assert result["devices"] == 4 and result["processes"] == 2 and result["local_rows"] == 4
    np.testing.assert_allclose(result["losses"], expected, rtol=1e-6)
