"""A CPU-sized grid (`make grid-demo`): the study's design shrunk to a 2-core CPU on the embedded
Shakespeare corpus, one run after another, within 90 minutes.

Both objectives at four sizes (by the study's formula with this grid's 1,024-token vocabulary:
cpu-xxs 54k, cpu-xs 164k, cpu-sm 430k, cpu-s 888k parameters):

- **multi-epoch** `{obj}-{size}-U{U}-E{E}`, family "data_constrained" (step 2 of the fit): each
  U in `DATA_CONSTRAINED` at its epoch counts, up to 100 epochs of the smallest U, where AR has
  long overfitted at this scale.
- **single-epoch** `{obj}-{size}-U{D}-E1` on fresh data, family "isoflop" (step 1, the Chinchilla
  fit): D in `FRESH_TOKENS`, a decade of budgets at every size, up to the whole 2.0M-token train
  split.

**Leaving the unigram plateau.** Masked diffusion sits on the unigram plateau (5.63 nats with
this vocabulary) for its first few hundred thousand tokens, and a fit over cells still on it
measures the plateau, not the law. The first version of this grid (4,096-token vocabulary, U of
5k and 20k, 150-step floor; README, "At CPU scale") left every diffusion cell there. So this one
(measured first, benchmarks/results/grid_demo_2026-12-04b/pilots.md):

- a 1,024-token BPE vocabulary: a lower plateau, more of N in the transformer, and 1.5-2x the
  tokens/s of the 4,096 vocabulary at these sizes;
- budgets of 190k tokens and up in every cell (U x E), where diffusion has left the plateau at
  cpu-s after about 200k tokens;
- one batch (8 x 64 tokens) for every cell, so batch size is not a variable of the fit: the
  smallest cell trains 371 steps (`MIN_STEPS` checks the floor);
- peak learning rate 3e-3: at these sizes both objectives learn faster than at the demo's 1e-3.

`dvar sweep list --grid=small` prints the runs, their steps and the time estimate.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.grids import FAMILY_DATA_CONSTRAINED, FAMILY_ISOFLOP, add_run, run_name
from dvar_jax.configs.recipes import small_config

OBJECTIVES = ("ar", "diffusion")
SIZES = ("cpu-xxs", "cpu-xs", "cpu-sm", "cpu-s")
VOCAB_SIZE = 1024
TOKENIZER_TYPE = "bpe"
# Unique tokens U -> epoch counts of the data-constrained family.
DATA_CONSTRAINED = {20_000: (10, 30, 100), 60_000: (4, 12, 40)}
# Fresh single-epoch budgets D of the isoFLOP family (one decade; the train split has 1.99M).
FRESH_TOKENS = (190_000, 600_000, 1_900_000)
BATCH_SIZE = 8  # sequences of 64 tokens
MIN_STEPS = 350
PEAK_LR = 3e-3
VALIDATION_TOKENS = 8_192


def grid_config(objective: str, size: str, unique_tokens: int, epochs: float) -> ConfigDict:
    """small_config (the demo's CPU settings, validation at least once an epoch) with this
    grid's vocabulary, batch, learning rate and validation set."""
    c = small_config(objective, size, unique_tokens, epochs, batch_size=BATCH_SIZE)
    c.data.vocab_size = VOCAB_SIZE
    c.data.tokenizer_type = TOKENIZER_TYPE
    c.data.validation_tokens = VALIDATION_TOKENS
    c.train.peak_lr = PEAK_LR
    return c


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid: dict[str, ConfigDict] = {}
    for objective in OBJECTIVES:
        for size in SIZES:
            for unique, epoch_counts in DATA_CONSTRAINED.items():
                for epochs in epoch_counts:
                    add_run(grid, run_name(objective, size, epochs, unique_tokens=unique),
                            grid_config(objective, size, unique, epochs),
                            family=FAMILY_DATA_CONSTRAINED)
            for fresh in FRESH_TOKENS:
                add_run(grid, run_name(objective, size, 1, unique_tokens=fresh),
                        grid_config(objective, size, fresh, 1), family=FAMILY_ISOFLOP)
    return list(grid.items())
