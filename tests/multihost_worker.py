"""One process of a 2-host CPU run (tests/test_sharding.py starts two): jax.distributed over
loopback with gloo collectives, each process feeding only its own rows of every global batch.

argv: process_id num_processes port objective. Process 0 prints the step losses as JSON.
"""

import json
import sys

import jax

PROCESS_ID, NUM_PROCESSES, PORT, OBJECTIVE = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                              sys.argv[4])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}",
                           num_processes=NUM_PROCESSES, process_id=PROCESS_ID)

from multihost_reference import STEPS, batches_for, setup  # noqa: E402

from dvar_jax.sharding import activation_sharding, global_batch, make_mesh  # noqa: E402
from dvar_jax.step import create_train_state, make_train_step  # noqa: E402


def main():
    cfg, model_cfg, tx, objective, rules = setup(OBJECTIVE)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 2
    mesh = make_mesh(cfg.mesh)
    batches = batches_for(jax.process_index(), jax.process_count())
    with activation_sharding(mesh, rules):
        graphdef, state, placement = create_train_state(model_cfg, tx, cfg.seed, mesh, rules)
        step = make_train_step(graphdef, objective, tx, mask_id=200, seed=cfg.seed,
                               placement=placement)
        losses = []
        for i in range(STEPS):
            state, metrics = step(state, global_batch(batches.batch(i), placement.batch))
            losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                          "local_rows": int(batches.local_batch_size), "losses": losses}))


if __name__ == "__main__":
    main()
