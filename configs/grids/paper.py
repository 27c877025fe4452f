"""The study's grid (PAPER.md §2, §4, §4.2): AR and masked diffusion at the study's sizes and
hyperparameters, on your corpus. A superset of the study's ~200 models; pick parts with
`dvar sweep run --grid=paper --only='ar-*-U100M-*'` (names and shell patterns).

Three sets of runs, each for both objectives; each run's `family` (its config and results
record) says which step of `dvar fit` it feeds:

- **multi-epoch** `{obj}-{size}-U{U}-E{E}`, family "data_constrained": U in {25M, 50M, 100M}
  unique tokens, sizes from 7M to 2.5B (`SIZES`, roughly log-spaced through the table, with the
  study's best AR 140M and best diffusion 425M), E in {1, ..., 800} epochs: the data-constrained
  fit's input (step 2). The E = 1 runs belong here too: at sizes far above N_opt(U) the plain
  Chinchilla form of step 1 does not describe them.
- **isoFLOP** `{obj}-{size}-C{C}-E1`, family "isoflop": one epoch on fresh data at C in
  {6e18, 1e19, 3e19, 1e20}, D = C / (6 N), for the sizes of `ISO_SIZES` within
  `ISO_TOKENS_PER_PARAM` of D/N: the single-epoch Chinchilla fit (step 1), the study's
  "initial fit" on its isoFLOP runs (TRAIN.md).
- **data value** `{obj}-{size}-C{C}-E{E}`: each objective's compute-optimal (N, D) at 1e19,
  3e19, 1e20 (PAPER.md §4.2), D split into E in {1, 2, 4, 10, 20, 50, 100} epochs over D / E
  unique tokens. E = 1 is the isoFLOP run itself (trained once, family "isoflop"); E > 1 are
  "data_constrained" (step 2).

The data: English C4 tokenized with GPT-2's BPE into two token stores by `dvar prepare`
(README, "Reproduce the study"), given as `--config.data.train_store=...` and
`--config.data.validation_store=...`. Until both are given, exist, share the runs' tokenizer and
hold the largest U asked for, `dvar sweep run` refuses to start; `dvar sweep list` works
without them. U is the first U tokens of the train store (`data.unique_tokens`), so each run's
U is exactly the U the law is fitted with; the study took the first K = U / 478.6 documents,
which `--config.data.unique_tokens=0 --config.data.unique_documents=K` reproduces. The isoFLOP
runs need up to 40B tokens of fresh text; the multi-epoch runs only the first 100M.

Dropout: the study's code ran Megatron's 0.1 on attention and hidden states, and so does this
grid (`study_config`). On TPU that keeps attention on the xla path (splash has no dropout);
`--config.model.attention_dropout=0` switches `auto` to splash, faster but unlike the study.
Layers are scanned with remat "dots"; `dvar plan-memory` and benchmarks/tpu_plan.py show the
slice and microbatches each size needs at the study's batch.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.grids import FAMILY_DATA_CONSTRAINED, FAMILY_ISOFLOP, add_run, run_name
from dvar_jax.configs.models import PAPER_SIZES
from dvar_jax.configs.recipes import STUDY_VOCAB, study_config
from dvar_jax.scaling.flops import paper_param_count

OBJECTIVES = ("ar", "diffusion")
UNIQUE_TOKENS = (25_000_000, 50_000_000, 100_000_000)
SIZES = ("7M", "14M", "35M", "57M", "90M", "140M", "217M", "425M", "724M", "1143M", "2639M")
EPOCHS = (1, 2, 4, 10, 20, 50, 100, 200, 500, 800)

ISO_FLOPS = (6e18, 1e19, 3e19, 1e20)
ISO_SIZES = ("14M", "35M", "57M", "90M", "117M", "140M", "217M", "306M", "425M", "552M", "724M",
             "1018M", "1266M", "1731M")
# Sizes whose D / N lies in this band at a budget: about a decade of N around the optimum
# (the study's optima sit at D / N of 35 for AR and about 100 for diffusion).
ISO_TOKENS_PER_PARAM = (8.0, 400.0)

# Compute-optimal sizes per budget and objective (PAPER.md §4.2, from the study's TRAIN.md).
OPTIMAL_SIZE = {
    1e19: {"ar": "217M", "diffusion": "117M"},
    3e19: {"ar": "425M", "diffusion": "217M"},
    1e20: {"ar": "724M", "diffusion": "425M"},
}
DATA_VALUE_EPOCHS = (1, 2, 4, 10, 20, 50, 100)


def params(size: str) -> int:
    """The study's N formula for a size of the table, with the study's vocabulary."""
    d_model, n_layers, _, _ = PAPER_SIZES[size]
    return paper_param_count(d_model, n_layers, STUDY_VOCAB)


def _multi_epoch(grid: dict[str, ConfigDict]) -> None:
    for objective in OBJECTIVES:
        for unique in UNIQUE_TOKENS:
            for size in SIZES:
                for epochs in EPOCHS:
                    add_run(grid, run_name(objective, size, epochs, unique_tokens=unique),
                            study_config(objective, size, unique, epochs),
                            family=FAMILY_DATA_CONSTRAINED)


def _fresh_tokens(flops: float, size: str) -> int:
    """D = C / (6 N) (the study's DATA_CNT = int((FLOPS/6) * (1/N)))."""
    return int(flops / 6 / params(size))


def _isoflop(grid: dict[str, ConfigDict]) -> None:
    low, high = ISO_TOKENS_PER_PARAM
    for flops in ISO_FLOPS:
        optimal = set(OPTIMAL_SIZE.get(flops, {}).values())
        for size in ISO_SIZES:
            tokens = _fresh_tokens(flops, size)
            if not (low <= tokens / params(size) <= high or size in optimal):
                continue
            for objective in OBJECTIVES:
                add_run(grid, run_name(objective, size, 1, compute=flops),
                        study_config(objective, size, tokens, 1), family=FAMILY_ISOFLOP)


def _data_value(grid: dict[str, ConfigDict]) -> None:
    for flops, sizes in OPTIMAL_SIZE.items():
        for objective, size in sizes.items():
            tokens = _fresh_tokens(flops, size)
            for epochs in DATA_VALUE_EPOCHS:
                # One epoch is the budget's isoFLOP run (the same run); more repeat D / E.
                family = FAMILY_ISOFLOP if epochs == 1 else FAMILY_DATA_CONSTRAINED
                add_run(grid, run_name(objective, size, epochs, compute=flops),
                        study_config(objective, size, tokens // epochs, epochs), family=family)


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid: dict[str, ConfigDict] = {}
    _multi_epoch(grid)
    _isoflop(grid)
    _data_value(grid)
    return list(grid.items())
