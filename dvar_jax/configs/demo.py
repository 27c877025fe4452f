"""`make demo`: AR and diffusion of one CPU size on the same small unique-token budget, many
epochs, on 2 CPU cores in a few minutes each (README, "The demo").

Sized so the study's first effect shows: AR's validation loss turns upward after a few epochs
of repetition while diffusion's keeps falling (DESIGN.md, "Sizing runs for a 2-core CPU").
"""

from ml_collections import ConfigDict

from dvar_jax.configs import base


def get_config() -> ConfigDict:
    c = base.get_config()
    c.model.name = "cpu-s"
    # No dropout: the study's regularisation question is an ablation; the demo shows the
    # plain objectives (dropout would also cost ~40% of CPU step time in random bits).
    c.model.attention_dropout = 0.0
    c.model.hidden_dropout = 0.0
    c.data.unique_tokens = 50_000
    c.data.epochs = 24.0
    c.data.seq_len = 128
    c.data.validation_tokens = 16_384
    c.train.batch_size = 32
    # A small model on a small budget tolerates (and needs) a larger step than the study's 2e-4.
    c.train.peak_lr = 1e-3
    c.train.warmup_fraction = 0.02
    c.train.log_every = 20
    c.eval.every_epochs = 1.0
    c.eval.batch_size = 64
    c.eval.num_mc = 4
    return c
