"""One process of a 2-process `dvar` command over loopback (tests/test_checkpoint.py starts
two): jax.distributed over 127.0.0.1 with gloo collectives, one CPU device each, then the
command, with --config.distributed=off as the processes are already joined.

argv: process_id num_processes port dvar-argv...
"""

import sys

import jax

PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}",
                           num_processes=NUM_PROCESSES, process_id=PROCESS_ID)

from dvar_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[4:]))
