"""A CPU-sized grid (`make grid-demo`): the study's design shrunk to a 2-core CPU on the embedded
Shakespeare corpus, one run after another, within 90 minutes.

Both objectives at four sizes (cpu-xxs 0.15M, cpu-xs 0.34M, cpu-s 1.3M, cpu-m 3.5M parameters by
the study's formula with the 4096-token vocabulary):

- **multi-epoch** `{obj}-{size}-U{U}-E{E}`, family "data_constrained" (step 2 of the fit): each
  U in `DATA_CONSTRAINED` at its epoch counts, up to 100 epochs of the smallest U, where AR has
  long overfitted at this scale.
- **single-epoch** `{obj}-{size}-U{D}-E1` on fresh data, family "isoflop" (step 1, the Chinchilla
  fit): D in `FRESH_TOKENS`, a decade of budgets at every size.

**Enough steps.** A cell with fewer than a few hundred optimizer steps leaves diffusion on the
unigram plateau (about 6.0-6.3 nats with this vocabulary) whatever its epochs, and the fit then
measures the plateau, not the law (DESIGN.md, "Sizing runs for a 2-core CPU"). So the batch
scales with the budget: every U (and every fresh D) gets the largest batch of `BATCH_SIZES` that
still gives its shortest cell `MIN_STEPS` steps, and all epoch counts of one U share that batch.

`dvar sweep list --grid=small` prints the runs, their steps and the time estimate.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.grids import FAMILY_DATA_CONSTRAINED, FAMILY_ISOFLOP, add_run, run_name
from dvar_jax.configs.recipes import SMALL_SEQ_LEN, small_config

OBJECTIVES = ("ar", "diffusion")
SIZES = ("cpu-xxs", "cpu-xs", "cpu-s", "cpu-m")
# Unique tokens U -> epoch counts of the data-constrained family.
DATA_CONSTRAINED = {5_000: (4, 16, 40, 100), 20_000: (4, 12, 30)}
# Fresh single-epoch budgets D of the isoFLOP family (one decade).
FRESH_TOKENS = (25_000, 80_000, 250_000)
# The step floor of every cell, and the batches (sequences of SMALL_SEQ_LEN tokens) it picks from.
MIN_STEPS = 150
BATCH_SIZES = (16, 8, 4, 2, 1)


def batch_size_for(unique_tokens: int, epochs: float) -> int:
    """The largest of BATCH_SIZES that gives `epochs` passes over `unique_tokens` at least
    MIN_STEPS steps (the smallest batch when none does)."""
    windows = (unique_tokens - 1) // SMALL_SEQ_LEN
    return next((b for b in BATCH_SIZES if epochs * windows // b >= MIN_STEPS), BATCH_SIZES[-1])


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid: dict[str, ConfigDict] = {}
    for objective in OBJECTIVES:
        for size in SIZES:
            for unique, epoch_counts in DATA_CONSTRAINED.items():
                batch = batch_size_for(unique, min(epoch_counts))
                for epochs in epoch_counts:
                    add_run(grid, run_name(objective, size, epochs, unique_tokens=unique),
                            small_config(objective, size, unique, epochs, batch_size=batch),
                            family=FAMILY_DATA_CONSTRAINED)
            for fresh in FRESH_TOKENS:
                add_run(grid, run_name(objective, size, 1, unique_tokens=fresh),
                        small_config(objective, size, fresh, 1,
                                     batch_size=batch_size_for(fresh, 1)),
                        family=FAMILY_ISOFLOP)
    return list(grid.items())
