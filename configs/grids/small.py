"""A CPU-sized grid (`make grid-demo`): the study's design shrunk to a 2-core CPU, under an
hour on the embedded Shakespeare corpus, one run after another.

Both objectives at three sizes (cpu-xs 0.34M, cpu-s 1.3M, cpu-m 3.5M parameters by the study's
formula with the 4096-token vocabulary):

- **multi-epoch** `{obj}-{size}-U{U}-E{E}`, family "data_constrained": U in `UNIQUE_TOKENS` x E
  in `EPOCHS` (E = 1 included), the data-constrained fit's input (step 2). The largest epoch
  counts are where AR overfits at this scale (`make demo`: cpu-s on 50k tokens turns upward
  after about 12 epochs).
- **single-epoch** `{obj}-{size}-U{D}-E1` on fresh data, family "isoflop", D in
  `FRESH_TOKENS`: the Chinchilla fit's input (step 1), 3 sizes x 3 D per objective.

`dvar sweep list --grid=small` prints the runs and the time estimate from the README's measured
CPU throughput.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.grids import FAMILY_DATA_CONSTRAINED, FAMILY_ISOFLOP, add_run, run_name
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
                            small_config(objective, size, unique, epochs),
                            family=FAMILY_DATA_CONSTRAINED)
            for fresh in FRESH_TOKENS:
                add_run(grid, run_name(objective, size, 1, unique_tokens=fresh),
                        small_config(objective, size, fresh, 1), family=FAMILY_ISOFLOP)
    return list(grid.items())
