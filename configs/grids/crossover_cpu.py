"""The crossover search on 2 CPU cores (issue 17, point 3): how close masked diffusion comes to
AR at U = 10k, 20k and 60k unique tokens of the embedded corpus, each objective with its own
size, epochs and dropout. `configs/crossover.py` is the same search sized for one accelerator.

    dvar sweep list --grid=crossover_cpu                  # the runs, their steps and FLOPs
    dvar sweep run  --grid=crossover_cpu --workdir=runs/crossover-cpu    # about 7 h (estimated)
    python benchmarks/gpu_crossover.py --collect --rescore 64 \\
        --grid configs/grids/crossover_cpu.py --workroot runs/crossover-cpu \\
        --out runs/crossover-cpu/report          # diffusion's bests re-scored, tables, figure

Every run has the small grid's settings (`configs/grids/small.py`: 1,024-token BPE vocabulary,
batch 8 x 64, peak lr 3e-3 with cosine decay over the whole run, the same 8,192 validation
tokens), at the sizes cpu-xxs to cpu-m (54k-2.9M parameters):

- the small grid's own cells at U = 20k (both objectives, 10, 30 and 100 epochs, no dropout),
  taken over under their names, so `make grid-demo`'s run folder serves for them;
- AR at 30 epochs with dropout 0.1 and 0.2 (its best comes within 4-10 epochs), and without
  dropout at lr 1e-3 and 5e-3;
- diffusion at 300-1000 epochs with dropout 0.1 and 0.2 (the study's code runs 0.1), one run at
  another seed, three at other learning rates (1e-3, 2e-3, 5e-3) and one at batch 32;
- at U = 10k, AR at 30 epochs and diffusion at 300 and 600 with dropout 0.1;
- weight decay 0.3 and 1.0 for both (and 10 % warmup for diffusion), then diffusion cpu-xs at
  600 epochs and at weight decay 1.0 and 3.0, and cpu-xxs at 1.0;
- with a moving average of the parameters (train.ema_decay 0.999) for both, and stratified
  noise levels (diffusion.noise_sampling) for diffusion: AR at four sizes, 30-, 100- and
  300-epoch schedules, weight decay 0.1-3.0, dropout and lr 5e-3; diffusion cpu-xs to cpu-s at
  300-600 epochs, decay 0.9999 and lr 5e-3; the closest pair at eight seeds each; the same
  search at U = 10k and 60k; diffusion cpu-s at U = 20k at two seeds, dropout 0.2, lr 1e-3 and
  10 % warmup. AR runs past their best were stopped
  (benchmarks/results/crossover_cpu_2026-12-05c/ar_watch.sh).

Search runs validate diffusion at SEARCH_EVAL_DRAWS draws and keep a checkpoint at every
evaluation, so `--rescore` can score the best one without the curve's selection bias.

Measured 2026-12-05 with the average (benchmarks/results/crossover_cpu_2026-12-05d/,
docs/crossover_cpu.png): no crossover; AR ahead at every U. At U = 20k, over eight seeds of the
closest pair, AR (cpu-sm, 100-epoch schedule, weight decay 1.0, best at epoch 5-8) averages
4.663 and diffusion (cpu-sm, 300 epochs, dropout 0.1, weight decay 1.0, stratified; each best
checkpoint re-scored at 64 draws) 4.688: +0.025 +- 0.012, at 12x the study's C_crit(20k). The
best single runs, 4.629 and 4.667, are seeds' luck. At U = 10k diffusion is 0.06-0.09 behind
(it overfits after about 320 epochs), at U = 60k 0.16 behind at 9.7x C_crit (cpu-s, 300
epochs, still falling). The larger diffusion model does not close U = 20k's gap: cpu-s
re-scores at 4.673 and 4.722 over two seeds, lr 1e-3, dropout 0.2 and a longer warmup worse
(crossover_cpu_2026-12-05e/). Without the average (crossover_cpu_2026-12-05b/) the U = 20k gap was
+0.079.
"""

import importlib.util
from pathlib import Path

from ml_collections import ConfigDict

from dvar_jax.configs.grids import add_run, apply_variant, run_name, variant_suffix

_SMALL = Path(__file__).with_name("small.py")
_spec = importlib.util.spec_from_file_location("_dvar_small_grid", _SMALL)
small = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(small)

SMALL_GRID_UNIQUE = 20_000  # the small grid's cells taken over
EVALS_PER_RUN = 60  # validation points along each search run's curve
# Diffusion's validation draws per sequence in the search runs: the best of 60 evaluations is
# picked by this estimate, so its noise is a selection bias (masked-count estimator, 8,192
# tokens: s.e. 0.05 nats at K = 2, 0.026 at K = 8; docs/diffusion_validation.md). The kept best
# checkpoint is then re-scored at 64 draws with other masks (gpu_crossover.py --rescore 64).
SEARCH_EVAL_DRAWS = 8

# (objective, size, U, epochs, dropout, variant): a variant changes one setting and names it.
RUNS = (
    ("ar", "cpu-xs", 20_000, 30, 0.1, {}),
    ("ar", "cpu-sm", 20_000, 30, 0.1, {}),
    ("ar", "cpu-s", 20_000, 30, 0.1, {}),
    ("ar", "cpu-sm", 20_000, 30, 0.2, {}),
    ("ar", "cpu-s", 20_000, 30, 0.2, {}),
    ("diffusion", "cpu-xs", 20_000, 300, 0.1, {}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {}),
    ("diffusion", "cpu-s", 20_000, 300, 0.1, {}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"seed": 2}),
    ("diffusion", "cpu-s", 20_000, 300, 0.1, {"lr": 1e-3}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"batch": 32}),
    ("diffusion", "cpu-sm", 20_000, 400, 0.1, {}),
    ("diffusion", "cpu-sm", 20_000, 1000, 0.1, {"evals": 80}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.2, {}),
    ("diffusion", "cpu-sm", 20_000, 600, 0.2, {}),
    # The learning rate for both (3e-3 above): AR at 1e-3 and 5e-3, diffusion at 2e-3 and 5e-3.
    ("ar", "cpu-sm", 20_000, 30, 0.0, {"lr": 1e-3}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"lr": 1e-3}),
    ("ar", "cpu-sm", 20_000, 30, 0.0, {"lr": 5e-3}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"lr": 5e-3}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"lr": 5e-3}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"lr": 2e-3}),
    # Weight decay (0.1 above) and, for diffusion, a longer warmup: the study's notes find
    # diffusion "slightly better with higher LR and warmup", and Gao et al. (2510.04071) find
    # weight decay gives multi-epoch gains like masking's. AR gets the same decays.
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"wd": 0.3}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"wd": 1.0}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"warmup": 0.1}),
    ("ar", "cpu-sm", 20_000, 30, 0.0, {"wd": 0.3}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"wd": 0.3}),
    ("ar", "cpu-sm", 20_000, 30, 0.0, {"wd": 1.0}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"wd": 1.0}),
    # Re-measured with the masked-count estimator, cpu-xs was still falling at 300 epochs and
    # weight decay 1.0 helped cpu-sm: both, on cpu-xs.
    ("diffusion", "cpu-xs", 20_000, 600, 0.1, {}),
    ("diffusion", "cpu-xs", 20_000, 300, 0.1, {"wd": 1.0}),
    # Smaller still, and more decay.
    ("diffusion", "cpu-xxs", 20_000, 300, 0.1, {"wd": 1.0}),
    ("diffusion", "cpu-xs", 20_000, 300, 0.1, {"wd": 3.0}),
    # Polyak averaging (train.ema_decay) for both, and stratified noise levels for diffusion
    # (diffusion.noise_sampling): neither changes what is estimated, both reduce noise.
    ("ar", "cpu-sm", 20_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"ema": 0.999}),
    ("ar", "cpu-m", 20_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("diffusion", "cpu-xs", 20_000, 300, 0.1, {"wd": 1.0, "ema": 0.999}),
    ("diffusion", "cpu-xs", 20_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-xs", 20_000, 600, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-s", 20_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 20_000, 500, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    # AR's search with the average: the 100-epoch schedule (its best without, 4.723), dropout,
    # a higher learning rate, more decay. Validated every half epoch, as its best comes early.
    ("ar", "cpu-s", 20_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200}),
    ("ar", "cpu-sm", 20_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200}),
    ("ar", "cpu-s", 20_000, 30, 0.1, {"wd": 1.0, "ema": 0.999}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"wd": 1.0, "ema": 0.999, "lr": 5e-3}),
    ("ar", "cpu-s", 20_000, 30, 0.0, {"wd": 3.0, "ema": 0.999}),
    ("ar", "cpu-s", 20_000, 300, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 600}),
    ("ar", "cpu-sm", 20_000, 300, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 600}),
    ("ar", "cpu-sm", 20_000, 100, 0.0, {"wd": 3.0, "ema": 0.999, "evals": 200}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1, {"wd": 1.0, "ema": 0.9999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "lr": 5e-3}),
    # The closest pair again at another seed.
    ("ar", "cpu-sm", 20_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200, "seed": 2}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "seed": 2}),
    ("ar", "cpu-sm", 20_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200, "seed": 3}),
    ("diffusion", "cpu-sm", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "seed": 3}),
    # Five more seeds of the closest pair, to put a tighter error on the gap of the means.
    *(run for seed in (4, 5, 6, 7, 8) for run in (
        ("ar", "cpu-sm", 20_000, 100, 0.0,
         {"wd": 1.0, "ema": 0.999, "evals": 200, "seed": seed}),
        ("diffusion", "cpu-sm", 20_000, 300, 0.1,
         {"wd": 1.0, "ema": 0.999, "noise": "stratified", "seed": seed}))),
    # U = 60k with the average (the small grid's other U): does a larger U close the gap
    # further, as the GPU search's 100k did (+0.09 against +0.18 at 20k)?
    ("ar", "cpu-sm", 60_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("ar", "cpu-s", 60_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("ar", "cpu-m", 60_000, 30, 0.0, {"wd": 1.0, "ema": 0.999}),
    ("diffusion", "cpu-sm", 60_000, 150, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-s", 60_000, 150, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    # U = 10k with the average: the smaller U, where the study's laws favour diffusion more.
    ("ar", "cpu-xs", 10_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200}),
    ("ar", "cpu-sm", 10_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200}),
    ("diffusion", "cpu-xs", 10_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 10_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 10_000, 600, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    # At U = 10k diffusion overfits after about 300 epochs: more regularisation, a larger model;
    # AR at more seeds and a larger model.
    ("diffusion", "cpu-sm", 10_000, 400, 0.2, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-sm", 10_000, 400, 0.1, {"wd": 3.0, "ema": 0.999, "noise": "stratified"}),
    ("diffusion", "cpu-s", 10_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    ("ar", "cpu-s", 10_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200}),
    ("ar", "cpu-sm", 10_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200, "seed": 2}),
    ("ar", "cpu-sm", 10_000, 100, 0.0, {"wd": 1.0, "ema": 0.999, "evals": 200, "seed": 3}),
    # U = 60k, cpu-s on twice the schedule: was the 150-epoch run's gap a matter of compute?
    ("diffusion", "cpu-s", 60_000, 300, 0.1, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    # U = 20k, the larger diffusion model to the end (its 300-epoch run above was stopped at 95
    # epochs for time): cpu-s beat cpu-sm at 10k and 60k at equal epochs.
    ("diffusion", "cpu-s", 20_000, 300, 0.2, {"wd": 1.0, "ema": 0.999, "noise": "stratified"}),
    # Before the average, cpu-s at lr 1e-3 came within 0.04 of cpu-sm at 3e-3 (4.824 against
    # 4.784, crossover_cpu_2026-12-05/): the same with the average. AdamW's decay scales with lr,
    # so weight decay 3.0 at 1e-3 decays as 1.0 does at 3e-3.
    ("diffusion", "cpu-s", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "lr": 1e-3}),
    ("diffusion", "cpu-s", 20_000, 300, 0.1,
     {"wd": 3.0, "ema": 0.999, "noise": "stratified", "lr": 1e-3}),
    # cpu-s at 3e-3 sat on the unigram plateau for its first 50 epochs and still tied cpu-sm:
    # a longer warmup, and another seed.
    ("diffusion", "cpu-s", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "warmup": 0.1}),
    ("diffusion", "cpu-s", 20_000, 300, 0.1,
     {"wd": 1.0, "ema": 0.999, "noise": "stratified", "seed": 2}),
    ("ar", "cpu-xxs", 10_000, 30, 0.0, {}),
    ("ar", "cpu-xs", 10_000, 30, 0.0, {}),
    ("ar", "cpu-sm", 10_000, 30, 0.0, {}),
    ("ar", "cpu-s", 10_000, 30, 0.0, {}),
    ("ar", "cpu-sm", 10_000, 30, 0.1, {}),
    ("diffusion", "cpu-xs", 10_000, 300, 0.1, {}),
    ("diffusion", "cpu-sm", 10_000, 300, 0.1, {}),
    ("diffusion", "cpu-sm", 10_000, 600, 0.1, {}),
)

def search_config(objective: str, size: str, unique_tokens: int, epochs: float,
                  dropout: float, variant: dict) -> ConfigDict:
    """The small grid's config for one search run: dropout on attention and hidden states,
    EVALS_PER_RUN validations (or the variant's "evals"), and the variant's changes."""
    c = small.grid_config(objective, size, unique_tokens, epochs)
    c.model.attention_dropout = c.model.hidden_dropout = dropout
    c.eval.every_epochs = epochs / variant.get("evals", EVALS_PER_RUN)
    c.eval.num_mc = SEARCH_EVAL_DRAWS
    # A checkpoint at every evaluation, so the best one is kept to be re-scored.
    c.checkpoint.every_steps = 0
    return apply_variant(c, variant)


def search_name(objective: str, size: str, unique_tokens: int, epochs: float, dropout: float,
                variant: dict) -> str:
    name = run_name(objective, size, epochs, unique_tokens=unique_tokens) + f"-drop{dropout:g}"
    return name + variant_suffix(variant)


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid = dict((name, cfg) for name, cfg in small.get_grid()
                if cfg.data.unique_tokens == SMALL_GRID_UNIQUE)
    for run in RUNS:
        add_run(grid, search_name(*run), search_config(*run))
    return list(grid.items())
