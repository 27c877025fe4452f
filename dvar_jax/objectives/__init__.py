"""The objective registry: the one place that maps an objective's name to what it is.

An `Objective` tells the rest of the code everything it needs about one objective: how the model
attends, the training and validation losses, which tokens the losses score, and how evaluation
decodes with the model. Code outside this module takes an `Objective`, never a name; names are
turned into objects here (`get_objective`, `objective_from_config`), and the objective-specific
config keys (`ar.*`, `diffusion.*`, `block_diffusion.*`) are checked here (`config_problems`).
Adding an objective means adding a module in this package and a builder in `_BUILDERS`.
"""

import enum
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import numpy as np
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
    NOISE_SAMPLINGS,
    diffusion_loss,
    diffusion_validation_draws,
    diffusion_validation_loss,
)
from dvar_jax.objectives.orderings import make_orders, order_problems

# (model, tokens [batch, seq + 1], rng, mask_id, rows=None) -> (scalar loss, metrics); rows:
# which rows of the global batch the tokens are (objectives/rows.py).
TrainLoss = Callable[..., tuple[jax.Array, dict]]
# (model, tokens [batch, seq + 1], rng, mask_id, num_mc) -> per-sequence loss sums [batch]
ValidationLoss = Callable[..., jax.Array]
# The same, before averaging the Monte-Carlo draws: [batch, num_mc] (AR: [batch, 1], exact).
ValidationDraws = Callable[..., jax.Array]


class Decoding(enum.Enum):
    """How evaluation scores and generates text with a model (eval/scoring.py, eval/sampling.py)."""

    # Left to right: exact log-likelihoods, one new token per model call.
    NEXT_TOKEN = "next-token"
    # Masked positions of one bidirectional window filled in: ELBO estimates, unmasking samplers.
    UNMASKING = "unmasking"


class Objective(NamedTuple):
    """One training objective, as the train step, the model config and evaluation use it.

    name: the config's `objective` value (for records and messages; never dispatched on).
    causal: the model attends causally; else bidirectionally.
    loss, validation_loss, validation_draws: the objective's functions (types above).
    exact: validation is exact (one draw), not a Monte-Carlo ELBO estimate.
    predicts_next_token: the losses score window[1:] given window[:-1]; else they reconstruct
        window[:-1] (the window's last token unused).
    diffusion_block: B of the model's block-diffusion mask ([noisy; clean] inputs); 0 = none.
    decoding: how the evaluation scorer and samplers use the model; None = they do not support
        this objective.
    """

    name: str
    causal: bool
    loss: TrainLoss
    validation_loss: ValidationLoss
    validation_draws: ValidationDraws
    exact: bool
    predicts_next_token: bool
    diffusion_block: int
    decoding: Decoding | None

    def scored_tokens(self, windows: np.ndarray) -> np.ndarray:
        """The tokens of windows [n, seq + 1] whose losses the validation loss sums: [n, seq]."""
        return windows[:, 1:] if self.predicts_next_token else windows[:, :-1]


def _ar(variant: ARVariant = PLAIN_AR) -> Objective:
    loss = ar_loss if variant.plain else partial(ar_loss, variant=variant)
    return Objective("ar", causal=True, loss=loss, validation_loss=ar_validation_loss,
                     validation_draws=ar_validation_draws, exact=True, predicts_next_token=True,
                     diffusion_block=0, decoding=Decoding.NEXT_TOKEN)


def _diffusion(stratified: bool = False) -> Objective:
    loss = partial(diffusion_loss, stratified=True) if stratified else diffusion_loss
    return Objective("diffusion", causal=False, loss=loss,
                     validation_loss=diffusion_validation_loss,
                     validation_draws=diffusion_validation_draws, exact=False,
                     predicts_next_token=False, diffusion_block=0, decoding=Decoding.UNMASKING)


def _block_diffusion(block_size: int) -> Objective:
    return Objective("block_diffusion", causal=False,
                     loss=partial(block_diffusion_loss, block_size=block_size),
                     validation_loss=partial(block_diffusion_validation_loss,
                                             block_size=block_size),
                     validation_draws=partial(block_diffusion_validation_draws,
                                              block_size=block_size),
                     exact=False, predicts_next_token=False, diffusion_block=block_size,
                     decoding=None)


def _ar_from_config(cfg: ConfigDict) -> Objective:
    # The N orders are drawn here, once, from cfg.seed: the same on every host and every resume.
    a = cfg.ar
    orders = None
    if a.num_orders > 1:
        orders = make_orders(a.num_orders, cfg.data.seq_len, a.order_kind, cfg.seed)
    return _ar(ARVariant(orders=orders, randmask_ratio=float(a.randmask_ratio)))


_BUILDERS: dict[str, Callable[[ConfigDict], Objective]] = {
    "ar": _ar_from_config,
    "diffusion": lambda cfg: _diffusion(cfg.diffusion.noise_sampling == "stratified"),
    "block_diffusion": lambda cfg: _block_diffusion(cfg.block_diffusion.block_size),
}
OBJECTIVE_NAMES = tuple(_BUILDERS)


def _builder(name: str) -> Callable[[ConfigDict], Objective]:
    if name not in _BUILDERS:
        raise ValueError(f"objective={name!r}: allowed {list(OBJECTIVE_NAMES)}")
    return _BUILDERS[name]


def get_objective(name: str) -> Objective:
    """The objective `name` with configs/base.py's options (plain AR; its block size)."""
    cfg = base_config()
    cfg.objective = name
    return _builder(name)(cfg)


def objective_from_config(cfg: ConfigDict) -> Objective:
    """The run's objective with its ablation options (cfg.ar, cfg.block_diffusion) bound."""
    return _builder(cfg.objective)(cfg)


def decoded_objective_names() -> tuple[str, ...]:
    """The objectives the evaluation scorer and samplers support (for messages)."""
    return tuple(n for n in OBJECTIVE_NAMES if get_objective(n).decoding is not None)


def config_problems(cfg: ConfigDict) -> list[str]:
    """What is wrong with the objective's config keys: `objective`, `ar.*` (the AR ablations,
    PAPER.md §8), `diffusion.*` and `block_diffusion.*`, one message per problem (empty: none)."""
    problems = []

    def check(ok: bool, message: str):
        if not ok:
            problems.append(message)

    check(cfg.objective in OBJECTIVE_NAMES,
          f"objective={cfg.objective!r}: allowed {', '.join(OBJECTIVE_NAMES)}")
    a = cfg.ar
    check(0.0 <= a.randmask_ratio <= 1.0,
          f"ar.randmask_ratio={a.randmask_ratio}: must be in [0, 1] (0 = no token masking)")
    problems += order_problems(a.num_orders, a.order_kind)
    used = [k for k, plain in (("randmask_ratio", 0.0), ("num_orders", 1),
                               ("target_positions", False)) if a[k] != plain]
    check(cfg.objective == "ar" or not used,
          f"ar.{', ar.'.join(used)} set with objective={cfg.objective!r}: "
          "the ar.* options apply to objective='ar' only")
    check(a.randmask_ratio == 0 or cfg.model.attention_impl in ("xla", "auto"),
          f"ar.randmask_ratio={a.randmask_ratio} needs model.attention_impl='xla' or 'auto' (a "
          f"dense per-sequence mask), got {cfg.model.attention_impl!r}")
    sampling = cfg.diffusion.noise_sampling
    check(sampling in NOISE_SAMPLINGS,
          f"diffusion.noise_sampling={sampling!r}: allowed {', '.join(NOISE_SAMPLINGS)}")
    check(cfg.objective == "diffusion" or sampling == NOISE_SAMPLINGS[0],
          f"diffusion.noise_sampling={sampling!r} set with objective={cfg.objective!r}: the "
          "diffusion.* options apply to objective='diffusion' only")
    if cfg.objective == "block_diffusion":
        b = cfg.block_diffusion.block_size
        check(b >= 1 and cfg.data.seq_len % b == 0,
              f"block_diffusion.block_size={b}: must be >= 1 and divide data.seq_len="
              f"{cfg.data.seq_len}")
        check(cfg.model.attention_impl in ("auto", "xla", "pallas"),
              f"model.attention_impl={cfg.model.attention_impl!r}: block diffusion allows "
              "auto, xla, pallas")
    return problems
