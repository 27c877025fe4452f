"""Training objectives: pure functions `(model, tokens, rng) -> (loss, metrics)`.

An `Objective` bundles what the shared train and eval steps need to know about one: whether the
model attends causally, its training loss, and its validation loss. Adding an objective means
adding a module here and an entry in `OBJECTIVES`; nothing else changes.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax

from dvar_jax.objectives.ar import ar_loss, ar_validation_draws, ar_validation_loss
from dvar_jax.objectives.diffusion import (
    diffusion_loss,
    diffusion_validation_draws,
    diffusion_validation_loss,
)

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


OBJECTIVES = {
    "ar": Objective("ar", causal=True, loss=ar_loss, validation_loss=ar_validation_loss,
                    validation_draws=ar_validation_draws),
    "diffusion": Objective("diffusion", causal=False, loss=diffusion_loss,
                           validation_loss=diffusion_validation_loss,
                           validation_draws=diffusion_validation_draws),
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]
