"""Naming and bookkeeping helpers for grids of runs.

A grid is a module (the examples are in the repository's `configs/grids/` and
`configs/ablations/`) that defines `get_grid() -> list[(name, ConfigDict)]`.

Every element is a complete run config (configs/base.py with the grid's changes) under a stable,
unique, human-readable name such as `ar-140M-U100M-E50` (objective, size, unique tokens U or
compute budget C, epochs E). `dvar sweep list --grid=NAME` prints a grid, `dvar sweep run`
trains it; NAME is a shipped grid (`paper`, `small`, `ablations/...`) or a path to any .py
file with get_grid().

Each run of a scaling study names its family (`add_run(..., family=...)`, stored as the config's
`family` and written into its results record): "isoflop" runs feed step 1 of `dvar fit`,
"data_constrained" runs step 2 (dvar_jax/scaling/laws.py).

A value the user must supply (the paper grid's token stores) is left as `required(key, what)`, a
string the sweep runner refuses to start with, naming the `--config.KEY=VALUE` to pass.
"""

from ml_collections import ConfigDict

# Which step of the fit a run feeds (`config.family`; dvar_jax/scaling/laws.py): the grid
# knows what it built, so the grid says it.
FAMILY_ISOFLOP = "isoflop"  # one epoch on fresh data: step 1
FAMILY_DATA_CONSTRAINED = "data_constrained"  # a fixed unique budget U, any epochs: step 2
FAMILIES = (FAMILY_ISOFLOP, FAMILY_DATA_CONSTRAINED)

# Marks a config value that must be overridden before any run starts (see `required`).
REQUIRED_PREFIX = "<required: --config."


def required(key: str, what: str) -> str:
    """A placeholder for config `key` that `dvar sweep run` refuses until overridden; a
    non-empty string, so the config still validates for `dvar sweep list`."""
    return f"{REQUIRED_PREFIX}{key}=... ({what})>"


def unset_required(cfg: ConfigDict, prefix: str = "") -> list[str]:
    """The dotted keys of `cfg` still holding a `required(...)` placeholder."""
    keys = []
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            keys += unset_required(value, f"{prefix}{key}.")
        elif isinstance(value, str) and value.startswith(REQUIRED_PREFIX):
            keys.append(f"{prefix}{key}")
    return keys


def token_label(n: float) -> str:
    """A token count as a name part: 25_000_000 -> "25M", 8_000 -> "8k", 1.5e9 -> "1.5B"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def compute_label(flops: float) -> str:
    """A compute budget as a name part: 1e19 -> "1e19", 6e18 -> "6e18"."""
    mantissa, exponent = f"{flops:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def run_name(objective: str, size: str, epochs: float, *, unique_tokens: float | None = None,
             compute: float | None = None) -> str:
    """`{objective}-{size}-U{U}-E{E}` for a fixed unique budget, `{objective}-{size}-C{C}-E{E}`
    for a run sized from a compute budget (isoFLOP and data-value runs)."""
    budget = f"C{compute_label(compute)}" if compute is not None else \
        f"U{token_label(unique_tokens)}"
    return f"{objective}-{size}-{budget}-E{epochs:g}"


def add_run(grid: dict[str, ConfigDict], name: str, cfg: ConfigDict, *,
            family: str | None = None) -> None:
    """Adds `cfg` under `name`; the same name twice must mean the same run (a data-value run
    at one epoch is its budget's isoFLOP run, and is trained once, family included).

    family: the run's family for the scaling-law fit, stored in the config (`cfg.family`, the
    one place the sweep's results record takes it from): "isoflop" (one epoch on fresh data,
    the fit's step 1) or "data_constrained" (a fixed unique budget U at any epochs, step 2);
    None leaves `cfg.family` as it is."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"grid run {name!r}: family={family!r}; allowed "
                             f"{', '.join(repr(f) for f in FAMILIES)}")
        cfg.family = family
    if name in grid and grid[name].to_json() != cfg.to_json():
        raise ValueError(f"grid run {name!r} is defined twice with different configs")
    grid[name] = cfg


# A grid run's variant: a dict of single changes, each named in the run's name. Variant key ->
# (the config key it sets, its name suffix). "evals" (the validation count) changes no training,
# so it sets nothing here (the grid applies it to its cadence) and is left out of the name.
VARIANTS = {"seed": ("seed", "-seed{:d}"), "lr": ("train.peak_lr", "-lr{:g}"),
            "batch": ("train.batch_size", "-batch{:d}"),
            "wd": ("train.weight_decay", "-wd{:g}"),
            "warmup": ("train.warmup_fraction", "-warmup{:g}"),
            "ema": ("train.ema_decay", "-ema{:g}"),
            "noise": ("diffusion.noise_sampling", "-{}"), "evals": (None, "")}


def apply_variant(cfg: ConfigDict, variant: dict) -> ConfigDict:
    """`cfg` with the variant's changes set (in place; returned for chaining)."""
    unknown = set(variant) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variant keys {sorted(unknown)} unknown; allowed: {sorted(VARIANTS)}")
    cfg.update_from_flattened_dict({VARIANTS[k][0]: v for k, v in variant.items()
                                    if VARIANTS[k][0]})
    return cfg


def variant_suffix(variant: dict) -> str:
    """The run-name suffix of a variant, in its keys' order: {"wd": 1.0, "ema": 0.999} ->
    "-wd1-ema0.999"."""
    return "".join(VARIANTS[k][1].format(v) for k, v in variant.items())

