"""A CPU-sized grid (`make grid-demo`): the study's design shrunk to a 2-core CPU, under an
hour on the embedded Shakespeare corpus, one run after another.

Both objectives at three sizes (cpu-xs 0.34M, cpu-s 1.3M, cpu-m 3.5M parameters by the study's
formula with the 4096-token vocabulary):

- **multi-epoch** `{obj}-{size}-U{U}-E{E}`: U in `UNIQUE_TOKENS` x E in `EPOCHS`, the
  data-constrained fit's input (step 2). The largest epoch counts are where AR overfits at this
  scale (`make demo`: cpu-s on 50k tokens turns upward after about 12 epochs).
- **single-epoch** `{obj}-{size}-U{D}-E1` on fresh data, D in `FRESH_TOKENS`: with the E = 1
  column of the multi-epoch runs they spread the single-epoch points over 36x in D and 10x in N
  for the Chinchilla fit (step 1).

`dvar sweep list --grid=small` prints the runs and the time estimate from the README's measured
CPU throughput.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.grids import add_run, run_name
from dvar_jax.configs.recipes import small_config

OBJECTIVES = ("ar", "diffusion")
SIZES = ("cpu-xs", "cpu-s", "cpu-m")
UNIQUE_TOKENS = (5_000, 10_000, 20_000)
EPOCHS = (1, 3, 8, 24)
FRESH_TOKENS = (60_000, 180_000)


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid: dict[str, ConfigDict] = {}
    for objective in OBJECTIVES:
        for size in SIZES:
            for unique in UNIQUE_TOKENS:
                for epochs in EPOCHS:
                    add_run(grid, run_name(objective, size, epochs, unique_tokens=unique),
                            small_config(objective, size, unique, epochs))
            for fresh in FRESH_TOKENS:
                add_run(grid, run_name(objective, size, 1, unique_tokens=fresh),
                        small_config(objective, size, fresh, 1))
    return list(grid.items())
