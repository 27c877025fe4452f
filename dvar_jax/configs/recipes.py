"""Run recipes that several configs and grids share: the study's run at its scale, the CPU
grid's run, the ablations' shared run and the tiny test run. Each returns a complete config
(`base.get_config()` with the recipe's changes); the example grids in the repository's
`configs/` folder call them.
"""

from ml_collections import ConfigDict

from dvar_jax.configs import base
from dvar_jax.configs.grids import required

# ------------------------------------------------------------------------------------------------
# The study's scale (PAPER.md §4; configs/grids/paper.py)

STUDY_SEQ_LEN = 2048
STUDY_BATCH_SIZE = 256  # 524,288 tokens a step (PAPER.md §4)
STUDY_VOCAB = 50257  # the study's N formula counts this vocabulary (GPT-2, unpadded)
STUDY_EVAL_EVERY_STEPS = 1000  # the study's --eval-interval
STUDY_EVAL_TOKENS = 100 * STUDY_BATCH_SIZE * STUDY_SEQ_LEN  # --eval-iters 100


def study_config(objective: str, size: str, unique_tokens: int, epochs: float) -> ConfigDict:
    """The base config (the study's optimiser, schedule, dropout, seed) at the study's scale."""
    c = base.get_config()
    c.objective = objective
    c.model.name = size
    # Dropout stays the study code's Megatron 0.1 / 0.1 (base config): the study ran it, and it
    # helps diffusion more than AR (benchmarks/results/gpu_2026-12-04.md). On TPU that means the
    # xla attention path, since splash has no dropout; --config.model.attention_dropout=0
    # switches "auto" to splash (README, "The study's runs on TPU").
    # Layers are scanned (compile time flat in depth) and the projections' outputs kept for the
    # backward pass ("dots"): the study's batch then fits every size (benchmarks/tpu_plan.py).
    c.model.scan_layers = True
    c.model.remat = "dots"
    # Stores made by `dvar prepare` from C4 with GPT-2's BPE (README, "Reproduce the study").
    c.data.source = "store"
    c.data.train_store = required("data.train_store", "the C4 train store from dvar prepare")
    c.data.validation_store = required("data.validation_store",
                                       "the C4 validation store from dvar prepare")
    c.data.vocab_size = STUDY_VOCAB
    c.data.seq_len = STUDY_SEQ_LEN
    c.data.unique_tokens = unique_tokens
    c.data.epochs = float(epochs)
    c.data.validation_tokens = STUDY_EVAL_TOKENS
    c.train.batch_size = STUDY_BATCH_SIZE
    # Shard parameters and optimizer state over every device: the 2.5B model's float32 Adam
    # state alone is 40 GB. The batch of 256 divides every slice up to 256 chips.
    c.mesh.data, c.mesh.fsdp = 1, -1
    # The study's cadence (every 1000 steps), but at least 10 evaluations in a short run, so
    # every run has a best checkpoint and a curve.
    steps_per_epoch = (unique_tokens - 1) // STUDY_SEQ_LEN / STUDY_BATCH_SIZE
    c.eval.every_epochs = min(STUDY_EVAL_EVERY_STEPS / steps_per_epoch, epochs / 10)
    c.eval.batch_size = STUDY_BATCH_SIZE
    c.eval.num_mc = 1  # the study's during-training setting; 52M tokens keep the noise small
    return c


# ------------------------------------------------------------------------------------------------
# The CPU grid's run (configs/grids/small.py)

SMALL_SEQ_LEN = 64
SMALL_BATCH_SIZE = 16  # 1,024 tokens a step: 4 steps an epoch of the smallest U
SMALL_EVALS_PER_RUN = 8
SMALL_VALIDATION_TOKENS = 4_096


def small_config(objective: str, size: str, unique_tokens: int, epochs: float, *,
                 batch_size: int = SMALL_BATCH_SIZE) -> ConfigDict:
    """The base config with the demo's CPU settings (dvar_jax/configs/demo.py) at the small
    grid's shape; `batch_size` sequences of SMALL_SEQ_LEN tokens a step."""
    c = base.get_config()
    c.objective = objective
    c.model.name = size
    # No dropout, as the demo: the plain objectives, and 40% less CPU time.
    c.model.attention_dropout = 0.0
    c.model.hidden_dropout = 0.0
    c.data.unique_tokens = unique_tokens
    c.data.epochs = float(epochs)
    c.data.seq_len = SMALL_SEQ_LEN
    # The first SMALL_VALIDATION_TOKENS of the held-out works, the same for every run.
    c.data.validation_tokens = SMALL_VALIDATION_TOKENS
    c.train.batch_size = batch_size
    c.train.peak_lr = 1e-3  # small models on small budgets need a larger step (as the demo)
    c.train.warmup_fraction = 0.02
    c.train.log_every = 20
    # At least once an epoch: AR's best comes within a few epochs at these budgets, and a long
    # run evaluated only SMALL_EVALS_PER_RUN times would miss it (the fit takes the best loss).
    c.eval.every_epochs = min(epochs / SMALL_EVALS_PER_RUN, 1.0)
    c.eval.batch_size = 64
    c.eval.num_mc = 2
    # Save at the end only (and on SIGTERM): runs take seconds to minutes, and saving at every
    # evaluation would cost more than it protects.
    c.checkpoint.every_steps = 1_000_000
    c.checkpoint.keep = 1
    return c


# ------------------------------------------------------------------------------------------------
# The ablations' shared run (configs/ablations/)

# The study's ablation setting: AR 140M, 50 epochs of U = 100M (Fig. 8) ...
ABLATION_SIZE, ABLATION_UNIQUE, ABLATION_EPOCHS = "140M", 100_000_000, 50
# ... and for the orderings, 278M for 100 epochs (Fig. 7).
ORDERINGS_SIZE, ORDERINGS_EPOCHS = "278M", 100
# CPU: the small grid's cpu-s on 10k unique tokens for 100 epochs (the study's orderings epochs)
# at batch 8, 1,950 optimizer steps: plain AR has its best within about 5 epochs and memorises for
# the other 95, and the runs have the steps to learn several orders (at 20k tokens for 24 epochs,
# 468 steps, N >= 8 never left the unigram plateau; README, "Ablations").
CPU_ABLATION_SIZE, CPU_ABLATION_UNIQUE, CPU_ABLATION_EPOCHS = "cpu-s", 10_000, 100
CPU_ABLATION_BATCH_SIZE = 8
CPU_ABLATION_EVAL_EVERY_EPOCHS = 2.0  # validation points along each curve


def ablation_config(objective: str, cpu: bool, *, size: str | None = None,
                    epochs: int | None = None, unique_tokens: int | None = None,
                    batch_size: int | None = None) -> ConfigDict:
    """The ablations' shared run: the study's (AR 140M, U 100M, 50 epochs, its dropout 0.1) or
    the CPU one (cpu-s, U 10k, 100 epochs, batch 8, dropout 0 as the small grid); the keywords
    override its size, epochs, U and (CPU) batch."""
    if cpu:
        epochs = epochs or CPU_ABLATION_EPOCHS
        cfg = small_config(objective, size or CPU_ABLATION_SIZE,
                           unique_tokens or CPU_ABLATION_UNIQUE, epochs,
                           batch_size=batch_size or CPU_ABLATION_BATCH_SIZE)
        cfg.eval.every_epochs = CPU_ABLATION_EVAL_EVERY_EPOCHS
        cfg.eval.num_mc = 4
        return cfg
    if batch_size is not None:
        raise ValueError(f"ablation_config: batch_size={batch_size} is for the CPU run; the "
                         f"study's run keeps its batch of {STUDY_BATCH_SIZE}")
    return study_config(objective, size or ABLATION_SIZE, unique_tokens or ABLATION_UNIQUE,
                        epochs or ABLATION_EPOCHS)


# ------------------------------------------------------------------------------------------------
# The tiny run (configs/tiny.py; tests, benchmarks and smoke checks)


def tiny_config(objective: str = "ar", corpus_dir: str = "", cache_dir: str = "") -> ConfigDict:
    """cpu-xs on 4,000 unique tokens of the text corpus in `corpus_dir` for 2 epochs of 32-token
    windows (about 15 s on 2 cores), evaluated every epoch."""
    cfg = base.get_config()
    cfg.objective = objective
    cfg.data.source, cfg.data.path = "text", corpus_dir
    cfg.data.validation_fraction, cfg.data.vocab_size = 0.2, 400
    cfg.data.cache_dir = cache_dir
    cfg.model.name = "cpu-xs"
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.unique_tokens, cfg.data.epochs, cfg.data.seq_len = 4_000, 2.0, 32
    cfg.data.validation_tokens = 1_000
    cfg.train.batch_size, cfg.train.peak_lr = 8, 3e-3
    cfg.eval.every_epochs, cfg.eval.num_mc = 1.0, 4
    return cfg
