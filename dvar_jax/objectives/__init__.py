"""Training objectives: pure functions `(model, tokens, rng) -> (loss, metrics)`.

An `Objective` bundles what the shared train and eval steps need to know about one: whether the
model attends causally, its training loss, and its validation loss. Adding an objective means
adding a module here and an entry in `OBJECTIVE_NAMES` / `objective_from_config`; nothing else
changes. The study's ablations are options of these objectives (`ar.*`, `block_diffusion.*`
config keys), bound into the functions by `objective_from_config`.
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
from ml_collections import ConfigDict

from dvar_jax.configs.base import get_config as base_config
from dvar_jax.objectives.ar import (
    PLAIN_AR,
    ARVariant,
    ar_loss,
    ar_validation_draws,
    ar_validation_loss,
)
from dvar_jax.objectives.block_diffusion import (
    block_diffusion_loss,
    block_diffusion_validation_draws,
    block_diffusion_validation_loss,
)
from dvar_jax.objectives.diffusion import (
    diffusion_loss,
    diffusion_validation_draws,
    diffusion_validation_loss,
)
from dvar_jax.objectives.orderings import make_orders

# (model, tokens [batch, seq + 1], rng, mask_id) -> (scalar loss, metrics)
TrainLoss = Callable[..., tuple[jax.Array, dict]]
# (model, tokens [batch, seq + 1], rng, mask_id, num_mc) -> per-sequence loss sums [batch]
ValidationLoss = Callable[..., jax.Array]
# The same, before averaging the Monte-Carlo draws: [batch, num_mc] (AR: [batch, 1], exact).
ValidationDraws = Callable[..., jax.Array]


class Objective(NamedTuple):
    name: str
    causal: bool
    loss: TrainLoss
    validation_loss: ValidationLoss
    validation_draws: ValidationDraws

    @property
    def exact(self) -> bool:
        """Whether validation is exact (one draw) rather than a Monte-Carlo ELBO estimate."""
        return self.name == "ar"


OBJECTIVE_NAMES = ("ar", "diffusion", "block_diffusion")


def _ar(variant: ARVariant = PLAIN_AR) -> Objective:
    loss = ar_loss if variant.plain else partial(ar_loss, variant=variant)
    return Objective("ar", causal=True, loss=loss,
                     validation_loss=ar_validation_loss, validation_draws=ar_validation_draws)


def _diffusion() -> Objective:
    return Objective("diffusion", causal=False, loss=diffusion_loss,
                     validation_loss=diffusion_validation_loss,
                     validation_draws=diffusion_validation_draws)


def _block_diffusion(block_size: int) -> Objective:
    return Objective("block_diffusion", causal=False,
                     loss=partial(block_diffusion_loss, block_size=block_size),
                     validation_loss=partial(block_diffusion_validation_loss,
                                             block_size=block_size),
                     validation_draws=partial(block_diffusion_validation_draws,
                                              block_size=block_size))


def get_objective(name: str) -> Objective:
    """The objective `name` with configs/base.py's options (plain AR; its block size)."""
    if name not in OBJECTIVE_NAMES:
        raise ValueError(f"objective must be one of {list(OBJECTIVE_NAMES)}, got {name!r}")
    cfg = base_config()
    cfg.objective = name
    return objective_from_config(cfg)


def objective_from_config(cfg: ConfigDict) -> Objective:
    """The run's objective with its ablation options (cfg.ar, cfg.block_diffusion) bound.

    The N orders are drawn here, once, from cfg.seed: the same on every host and every resume.
    """
    if cfg.objective == "ar":
        a = cfg.ar
        orders = None
        if a.num_orders > 1:
            orders = make_orders(a.num_orders, cfg.data.seq_len, a.order_kind, cfg.seed)
        return _ar(ARVariant(orders=orders, randmask_ratio=float(a.randmask_ratio)))
    if cfg.objective == "block_diffusion":
        return _block_diffusion(cfg.block_diffusion.block_size)
    if cfg.objective == "diffusion":
        return _diffusion()
    raise ValueError(f"objective must be one of {list(OBJECTIVE_NAMES)}, got {cfg.objective!r}")
