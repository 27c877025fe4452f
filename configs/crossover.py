"""The crossover search on the embedded corpus (issue 17): AR and masked diffusion at the same
unique-token budgets U, each with its own model size and epoch count, sized for ONE accelerator
(minutes on an H200), where the study's laws favour diffusion: small U, compute far above
C_crit(U), larger models, many epochs.

    dvar sweep list --grid=configs/crossover.py              # the runs, their steps and FLOPs
    dvar sweep run  --grid=configs/crossover.py --workdir=runs/crossover
    dvar train --config=configs/crossover.py:diffusion --workdir=runs/xo-diffusion  # one run
    python benchmarks/gpu_crossover.py --out /tmp/xo --rescore 64    # all of it + figure, one GPU

Shakespeare with a 1k-token BPE vocabulary (2.0M train tokens; the small vocabulary puts more of
N into the transformer: the embedding is 1152 x d of N). Learning rate 1e-3 (7e-4 above
d = 256), cosine decay over the whole run, so the schedule stretches with the epoch count
(PAPER.md §4). Dropout 0 (the plain objectives, as the demo) and 0.1 (the study's code default,
PAPER.md §1.1) for both objectives.

**Sizing.** The CPU lead (DESIGN.md, "Sizing runs for a 2-core CPU": U = 20k, d = 128 x 4
layers, batch 8, 150 epochs) left diffusion 0.27 nats behind AR's best and still falling. This
grid continues it on a GPU and adds two larger budgets:

- U = 20k, batch 8 x 128 (19 steps an epoch), C_crit(U) = 1.1e12: diffusion 128x4 at 1000
  epochs and at 300 with dropout, 256x8 at 800 and at 200 with dropout, 384x6 at 600; AR
  128x4, 256x8 and 384x6 at 30 epochs, 256x8 also with dropout.
- U = 100k, batch 16 x 128 (48 steps an epoch), C_crit(U) = 2.7e13: diffusion 256x8 at 400
  epochs and at 150 with dropout; AR 128x4 and 256x8 at 30 epochs.
- U = 500k, batch 32 x 128 (122 steps an epoch), C_crit(U) = 7.1e14: diffusion 384x6 at 150
  epochs and at 100 with dropout; AR 384x6 at 20 epochs, with and without dropout.

AR's best comes within 4-9 epochs, so its 20-30 epochs cost far less than diffusion's runs:
within the same compute, AR is free to stop early.

(C_crit(U): `dvar_jax.scaling.planner.critical_compute` on the "prabhudesai2025" laws; FLOPs
are the study's C = 6 N D with N its formula at V = 1024; 128x4 is 0.89M, 256x8 6.3M, 384x6
11.0M.) The first 17 runs took about 9 minutes on one H200, 5-6 at a time (float32 = TF32 matmuls,
XLA attention); on 2 CPU cores a 20k-step run of the 256x8 model takes hours, so run only the
128x4 cells there (`--only='*-128x4-U20k-*'`); `configs/grids/crossover_cpu.py` is the search
sized for 2 CPU cores (with a moving average of the parameters, AR ahead at U = 10k, 20k and
60k; closest at 20k, +0.025 +- 0.012 over eight seeds of each;
benchmarks/results/crossover_cpu_2026-12-05d/).

**Measured (benchmarks/results/gpu_2026-12-04.md, docs/crossover_gpu.png): no crossover.**
Diffusion's best stayed above AR's best at every U: +0.18 nats at U = 20k (4.937 vs 4.759),
+0.09 at 100k (4.252 vs 4.162), +0.15 at 500k (3.716 vs 3.570), at 4.7-750x C_crit(U).
Without dropout diffusion overfits too, after 60-125 epochs; with dropout 0.1 its curves at
100k and 500k had not turned upward when their schedules ended (150 and 100 epochs). The next
cells to try: those two with dropout, 300-500 epochs and a larger model, all with the
parameter average that closed most of the CPU gap. They are the grid's last six runs (the
third device call), waiting for a device.
"""

from ml_collections import ConfigDict

from dvar_jax.configs import base
from dvar_jax.configs.grids import add_run, apply_variant, run_name, variant_suffix

VOCAB_SIZE = 1024
TOKENIZER_TYPE = "bpe"
SEQ_LEN = 128
VALIDATION_TOKENS = 32_768  # 256 windows of the held-out works, the same for every run
EVALS_PER_RUN = 40

# Sizes as (d_model, n_layers); heads of 32 dimensions. N (study formula, V = 1024):
# 128x4 0.89M, 256x8 6.3M, 384x6 11.0M, 512x8 25.5M.
SIZES = {"128x4": (128, 4), "256x8": (256, 8), "384x6": (384, 6), "512x8": (512, 8)}

# Sequences per step at each U: about 20-120 steps per epoch, so that diffusion gets tens of
# thousands of optimizer steps over hundreds of epochs (DESIGN.md: too few steps never leave the
# unigram plateau).
BATCH_SIZES = {20_000: 8, 100_000: 16, 500_000: 32}

# The third call's variants (dvar_jax/configs/grids.py VARIANTS), named in its runs' names.
THIRD_CALL_AR = {"ema": 0.999}
THIRD_CALL_DIFFUSION = {"ema": 0.999, "noise": "stratified"}

# (objective, size, U, epochs, dropout[, variant]), in the order a one-GPU runner starts them:
# the long diffusion runs first, the short AR runs beside them. The first two calls as run on
# 2026-12-04.
RUNS = (
    ("diffusion", "256x8", 20_000, 800, 0.0),
    ("diffusion", "128x4", 20_000, 1000, 0.0),
    ("diffusion", "256x8", 100_000, 400, 0.0),
    ("ar", "256x8", 20_000, 30, 0.0),
    ("ar", "128x4", 20_000, 30, 0.0),
    ("ar", "256x8", 100_000, 30, 0.0),
    ("ar", "384x6", 20_000, 30, 0.0),
    ("ar", "256x8", 20_000, 30, 0.1),
    ("ar", "128x4", 100_000, 30, 0.0),
    ("diffusion", "384x6", 20_000, 600, 0.0),
    ("ar", "384x6", 500_000, 20, 0.0),
    ("diffusion", "384x6", 500_000, 150, 0.0),
    # Second device call (dropout 0.1, the study's code default; shorter schedules, as the
    # runs without dropout had their best at 60-125 epochs).
    ("diffusion", "384x6", 500_000, 100, 0.1),
    ("diffusion", "256x8", 100_000, 150, 0.1),
    ("diffusion", "128x4", 20_000, 300, 0.1),
    ("diffusion", "256x8", 20_000, 200, 0.1),
    ("ar", "384x6", 500_000, 20, 0.1),
    # Third device call, not yet run (no device lent since): the two closest cells, with dropout,
    # longer and larger, and AR at the same sizes for the comparison, all with the parameter
    # average (train.ema_decay) that closed most of the CPU search's gap, and diffusion with
    # stratified noise levels (configs/grids/crossover_cpu.py). Estimated (not
    # run) at 5-8 minutes on one H200, 5 at a time, from the tokens/s of the first two calls
    # (benchmarks/results/gpu_2026-12-04.md); select them with --only='*-ema*' --rescore 64
    # (the first two calls' diffusion bests are curve minima at K = 8 of the 1/p estimator,
    # biased low by their noise; docs/diffusion_validation.md).
    ("diffusion", "256x8", 100_000, 400, 0.1, THIRD_CALL_DIFFUSION),
    ("diffusion", "512x8", 100_000, 300, 0.1, THIRD_CALL_DIFFUSION),
    ("diffusion", "384x6", 500_000, 300, 0.1, THIRD_CALL_DIFFUSION),
    ("ar", "512x8", 100_000, 30, 0.1, THIRD_CALL_AR),
    ("ar", "256x8", 100_000, 30, 0.1, THIRD_CALL_AR),
    ("ar", "256x8", 100_000, 30, 0.0, THIRD_CALL_AR),
)


def crossover_config(objective: str, size: str = "256x8", unique_tokens: int = 20_000,
                     epochs: float = 800, dropout: float = 0.0,
                     variant: dict | None = None) -> ConfigDict:
    """base.py at this grid's shape: one run, with the variant's changes."""
    c = base.get_config()
    c.objective = objective
    d_model, n_layers = SIZES[size]
    c.model.name = "custom"
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = d_model // 32
    c.model.head_dim = 32
    c.model.attention_dropout = dropout
    c.model.hidden_dropout = dropout
    c.data.vocab_size = VOCAB_SIZE
    c.data.tokenizer_type = TOKENIZER_TYPE
    c.data.unique_tokens = unique_tokens
    c.data.epochs = float(epochs)
    c.data.seq_len = SEQ_LEN
    c.data.validation_tokens = VALIDATION_TOKENS
    c.train.batch_size = BATCH_SIZES.get(unique_tokens, 32)
    c.train.peak_lr = 1e-3 if d_model <= 256 else 7e-4
    c.train.warmup_fraction = 0.02
    c.train.log_every = 100
    c.eval.every_epochs = epochs / EVALS_PER_RUN
    c.eval.batch_size = 128
    c.eval.num_mc = 8
    # Diffusion keeps its best checkpoint (a save at every evaluation) for the re-score of
    # benchmarks/gpu_crossover.py --rescore: the minimum of its noisy curve is biased low.
    # AR's loss is exact: it saves at the end only (and on SIGTERM).
    c.checkpoint.every_steps = 0 if objective == "diffusion" else 1_000_000_000
    c.checkpoint.keep = 1
    return apply_variant(c, variant or {})


def name_of(objective: str, size: str, unique_tokens: int, epochs: float,
            dropout: float = 0.0, variant: dict | None = None) -> str:
    name = run_name(objective, size, epochs, unique_tokens=unique_tokens)
    return name + (f"-drop{dropout:g}" if dropout else "") + variant_suffix(variant or {})


def get_grid() -> list[tuple[str, ConfigDict]]:
    grid: dict[str, ConfigDict] = {}
    for run in RUNS:
        add_run(grid, name_of(*run), crossover_config(*run))
    return list(grid.items())


def get_config(objective: str = "diffusion") -> ConfigDict:
    """`dvar train --config=configs/crossover.py:OBJECTIVE`: the grid's U = 20k 256x8 cell
    (diffusion 800 epochs, AR 30)."""
    objective = objective or "diffusion"
    return crossover_config(objective, "256x8", 20_000, 800 if objective == "diffusion" else 30)
