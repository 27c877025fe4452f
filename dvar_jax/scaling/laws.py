"""Data-constrained scaling laws (Muennighoff et al.; PAPER.md §7): the form, the two-step fit of
the study (§7.2) per objective, goodness of fit and bootstrap confidence intervals.

The form (§7.1), for N parameters trained on D tokens drawn from U unique tokens:

    L(N, D, U) = E + A / N'^alpha + B / D'^beta
    D' = U_D + U_D R_D* (1 - exp(-R_D / R_D*)),  U_D = min(U, D),         R_D = max(D/U_D - 1, 0)
    N' = U_N + U_N R_N* (1 - exp(-R_N / R_N*)),  U_N = min(N, N_opt(U_D)), R_N = max(N/U_N - 1, 0)
    N_opt(U) = G (U G)^(beta / alpha),  G = (alpha A / (beta B))^(1 / (alpha + beta))

with A = e^a, B = e^b, E = e^e. R_D counts *repeated* epochs (epochs - 1), so one epoch is fresh
data (D' = D). U_D = min(U, D) because a run shorter than one epoch sees only D unique tokens (as
datablations' fitting code does). A law is a plain dict holding at least a, b, e, alpha, beta,
rd_star, rn_star (`make_law` adds the derived A, B, E, G); `fit_laws` returns one per objective.

The fit minimises sum_i Huber_delta(LSE(a - alpha log N'_i, b - beta log D'_i, e) - log L_i),
delta = 1e-3, with scipy's L-BFGS-B from a grid of starts (value and gradient by jax in float64),
keeping the best. Step 1 fits a, b, e, alpha, beta on the isoFLOP runs with the plain Chinchilla
form (N' = N, D' = D); step 2 fits R_D*, R_N* on the data-constrained runs with step 1's
constants frozen.

Families. Each results record belongs to one family, its "family" field (set by the grid, in the
run's config `family`, and written by the sweep):

- "isoflop" (FAMILY_ISOFLOP): one epoch on fresh data (U = D), the study's isoFLOP runs; step 1.
  The plain Chinchilla form describes such a run while N <= N_opt(D), as on the grids'
  isoFLOP curves near their optimum.
- "data_constrained" (FAMILY_DATA_CONSTRAINED): a run at a fixed unique budget U, at any number
  of epochs, one included; step 2. Its N may be far above N_opt(U), where N' < N even at one
  epoch, so it must not enter step 1: fitting the Chinchilla form to such E = 1 runs biases every
  constant (on the paper grid's runs generated from the C4 law, AR's R_D* comes back 12.0
  instead of 15.39 and R_N* 17.1 instead of 5.31; tests/test_laws.py).

A record without a family (None or "": written before records carried one, or by a grid that
sets none) is classified by `record_families`' rule, in this order:

1. a run sized from a compute budget, named `...-C<flops>-E<epochs>` by the grids' `run_name`
   (the paper grid's isoFLOP and data-value runs), is "isoflop" when epochs <= 1, else
   "data_constrained";
2. any other run is "isoflop" when epochs <= 1 and no record of the same objective, N and U has
   more epochs (a one-epoch run with repeated siblings is the start of a data-constrained
   series), else "data_constrained".

On complete results of the shipped grids this gives their families exactly (checked in
tests/test_laws.py): paper, rule 1 for the C-named runs and rule 2 for the multi-epoch series;
small, rule 2, whose fresh-data runs have no siblings. Rule 1 comes first because a paper-grid
isoFLOP run can share N and U with a data-value run of a 10x budget (diffusion 425M at 1e19, and
at 1e20 over 10 epochs). Rule 2 misreads a one-epoch run whose series has no record with more
epochs yet (an unfinished sweep); the fit notes how many records it classified by the rule.
"""

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dvar_jax.configs.grids import FAMILIES, FAMILY_DATA_CONSTRAINED, FAMILY_ISOFLOP

HUBER_DELTA = 1e-3  # datablations / the study (PAPER.md §7.2)
LAW_KEYS = ("a", "b", "e", "alpha", "beta", "rd_star", "rn_star")
RECORD_KEYS = ("params", "unique_tokens", "epochs", "tokens")

# Muennighoff et al.'s published C4 fit (datablations README; PAPER.md §7.3), alpha tied to beta.
MUENNIGHOFF_C4 = {"a": 6.255414, "b": 7.3049974, "e": 0.6254804, "alpha": 0.3526596,
                  "beta": 0.3526596, "rd_star": 15.387756, "rn_star": 5.309743}

# The families of runs (see the module docstring): which step of the fit a run feeds.

# A run is at most one epoch when epochs <= 1 up to float noise in the records.
_ONE_EPOCH = 1.0 + 1e-9
# Minimum runs per fitted step: one more than the free constants, so the fit is overdetermined.
_STEP1_MIN = {True: 5, False: 6}
_STEP2_MIN = 3


# ----------------------------------------------------------------------------------------------
# The form. Written once over an array namespace `xp` (numpy here, jax.numpy in the objectives).
# ----------------------------------------------------------------------------------------------

def log_effective(log_unique, repeats, r_star, xp=np):
    """log(U + U R* (1 - exp(-R / R*))): log of the effective count (tokens D' or params N').

    log_unique: log of the unique count (U_D or U_N); repeats: R (R_D or R_N, >= 0), any shape;
    r_star: the half-life R* > 0. -expm1 keeps 1 - exp(-x) exact for small x; log1p the sum.
    """
    return log_unique + xp.log1p(r_star * -xp.expm1(-repeats / r_star))


def log_predicted_loss(a, b, e, alpha, beta, log_n_eff, log_d_eff, xp=np):
    """log L = LSE(a - alpha log N', b - beta log D', e), elementwise over the runs (nats)."""
    t1 = a - alpha * log_n_eff
    t2 = b - beta * log_d_eff
    t3 = e + 0.0 * t1
    # Shifting by the largest term keeps exp finite; the shift cancels in value and gradient.
    m = xp.maximum(xp.maximum(t1, t2), t3)
    return m + xp.log(xp.exp(t1 - m) + xp.exp(t2 - m) + xp.exp(t3 - m))


def make_law(a: float, b: float, e: float, alpha: float, beta: float, rd_star: float,
             rn_star: float) -> dict:
    """A law dict: the seven constants plus the derived A = e^a, B = e^b, E = e^e and G."""
    law = {"a": a, "b": b, "e": e, "alpha": alpha, "beta": beta, "rd_star": rd_star,
           "rn_star": rn_star}
    law.update(A=_exp(a), B=_exp(b), E=_exp(e), G=g_constant(law))
    return {k: float(v) for k, v in law.items()}


def _exp(x: float) -> float:
    # A runaway fit (e.g. untied exponents on too few model sizes) may reach constants whose
    # exponential overflows: that is inf, reported in the fit's notes, not a crash.
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(x)))


def _constants(law: Mapping) -> tuple[float, ...]:
    missing = [k for k in LAW_KEYS if k not in law]
    if missing:
        raise ValueError(f"law is missing {missing}; a law holds {list(LAW_KEYS)}")
    return tuple(float(law[k]) for k in LAW_KEYS)


def g_constant(law: Mapping) -> float:
    """G = (alpha A / (beta B))^(1 / (alpha + beta)): N_opt(C) = G (C/6)^(beta/(alpha+beta))."""
    a, b, _, alpha, beta, _, _ = _constants(law)
    if alpha <= 0 or beta <= 0:
        return float("nan")
    return _exp((math.log(alpha / beta) + a - b) / (alpha + beta))


def n_opt(law: Mapping, unique_tokens):
    """N_opt(U) = G (U G)^(beta/alpha): the compute-optimal parameter count for U tokens seen
    once (datablations' D_to_N). unique_tokens: tokens, scalar or array."""
    _, _, _, alpha, beta, _, _ = _constants(law)
    g = g_constant(law)
    return g * (np.asarray(unique_tokens, dtype=np.float64) * g) ** (beta / alpha)


def repeat_terms(law: Mapping, params, tokens, unique_tokens):
    """(U_N, R_N, U_D, R_D) of the form, elementwise (params N, tokens D, unique tokens U)."""
    n = np.asarray(params, dtype=np.float64)
    d = np.asarray(tokens, dtype=np.float64)
    u_d = np.minimum(np.asarray(unique_tokens, dtype=np.float64), d)
    r_d = np.maximum(d / u_d - 1.0, 0.0)
    u_n = np.minimum(n, n_opt(law, u_d))
    r_n = np.maximum(n / u_n - 1.0, 0.0)
    return u_n, r_n, u_d, r_d


def effective_tokens(law: Mapping, tokens, unique_tokens):
    """D' (tokens): what D tokens over U unique ones are worth as fresh data under `law`."""
    _, _, _, _, _, rd_star, _ = _constants(law)
    _, _, u_d, r_d = repeat_terms(law, 1.0, tokens, unique_tokens)
    return np.exp(log_effective(np.log(u_d), r_d, rd_star))


def effective_params(law: Mapping, params, unique_tokens):
    """N' (parameters): what N parameters are worth when U unique tokens limit them."""
    _, _, _, _, _, _, rn_star = _constants(law)
    u_n, r_n, _, _ = repeat_terms(law, params, np.asarray(unique_tokens, np.float64),
                                  unique_tokens)
    return np.exp(log_effective(np.log(u_n), r_n, rn_star))


def predicted_loss(law: Mapping, params, tokens, unique_tokens):
    """L(N, D, U) of the data-constrained form (nats/token), elementwise over numpy-broadcast
    params N, tokens D and unique tokens U."""
    a, b, e, alpha, beta, rd_star, rn_star = _constants(law)
    u_n, r_n, u_d, r_d = repeat_terms(law, params, tokens, unique_tokens)
    log_n_eff = log_effective(np.log(u_n), r_n, rn_star)
    log_d_eff = log_effective(np.log(u_d), r_d, rd_star)
    return np.exp(log_predicted_loss(a, b, e, alpha, beta, log_n_eff, log_d_eff))


def chinchilla_loss(law: Mapping, params, tokens):
    """E + A/N^alpha + B/D^beta: the form on fresh data (step 1's model), nats/token."""
    a, b, e, alpha, beta, _, _ = _constants(law)
    return np.exp(log_predicted_loss(a, b, e, alpha, beta, np.log(np.asarray(params, float)),
                                     np.log(np.asarray(tokens, float))))


# ----------------------------------------------------------------------------------------------
# Objectives (jax, float64) and the multi-start L-BFGS driver (scipy).
# ----------------------------------------------------------------------------------------------

def _step1_objective(theta, log_n, log_d, log_l, weights):
    """Scaled Huber sum of step 1. theta = (a, b, e, alpha) tied or (a, b, e, alpha, beta)."""
    import jax.numpy as jnp
    import optax

    beta = theta[3] if theta.shape[0] == 4 else theta[4]
    pred = log_predicted_loss(theta[0], theta[1], theta[2], theta[3], beta, log_n, log_d, xp=jnp)
    # Divided by delta^2 so the objective is O(1) per run and scipy's tolerances mean something.
    return jnp.sum(weights * optax.losses.huber_loss(pred, log_l, delta=HUBER_DELTA)) \
        / HUBER_DELTA**2


def _step2_objective(theta, consts, log_un, r_n, log_ud, r_d, log_l, weights):
    """Scaled Huber sum of step 2. theta = (log R_D*, log R_N*); consts = (a, b, e, alpha, beta).
    Fitted in log space so that R* stays positive without bounds."""
    import jax.numpy as jnp
    import optax

    a, b, e, alpha, beta = consts[0], consts[1], consts[2], consts[3], consts[4]
    log_n_eff = log_effective(log_un, r_n, jnp.exp(theta[1]), xp=jnp)
    log_d_eff = log_effective(log_ud, r_d, jnp.exp(theta[0]), xp=jnp)
    pred = log_predicted_loss(a, b, e, alpha, beta, log_n_eff, log_d_eff, xp=jnp)
    return jnp.sum(weights * optax.losses.huber_loss(pred, log_l, delta=HUBER_DELTA)) \
        / HUBER_DELTA**2


_COMPILED: dict[Callable, Callable] = {}


def _value_and_grad(objective: Callable) -> Callable:
    """jit(value_and_grad(objective)) packed into one float64 vector [value, *grad], so that a
    call costs one device-to-host copy (scipy calls it thousands of times)."""
    if objective not in _COMPILED:
        import jax
        import jax.numpy as jnp

        vg = jax.value_and_grad(objective)

        def packed(theta, *args):
            value, grad = vg(theta, *args)
            return jnp.concatenate([value[None], grad])

        _COMPILED[objective] = jax.jit(packed)
    return _COMPILED[objective]


def _blas_single_thread():
    """scipy's L-BFGS-B calls BLAS on vectors of length ~5; a multi-threaded OpenBLAS spins its
    threads for each call and, on a loaded machine, makes every iteration ~50x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a dependency of ours: slower, same result
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _minimize(objective: Callable, starts: np.ndarray, args: tuple) -> tuple[np.ndarray, float]:
    """Runs L-BFGS-B from every row of `starts` (n_starts, n_params) on objective(theta, *args)
    and returns the best (theta, value). Must be called with jax's x64 mode enabled."""
    import jax.numpy as jnp
    from scipy.optimize import minimize

    packed = _value_and_grad(objective)
    dev_args = tuple(jnp.asarray(a) for a in args)

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        out = np.asarray(packed(jnp.asarray(theta), *dev_args), dtype=np.float64)
        if not np.all(np.isfinite(out)):
            return math.inf, np.zeros_like(theta)  # off the domain: the line search backs off
        return float(out[0]), out[1:]

    best_theta, best_value = np.full(starts.shape[1], np.nan), math.inf
    with _blas_single_thread():
        for x0 in starts:
            res = minimize(fun, np.asarray(x0, np.float64), jac=True, method="L-BFGS-B",
                           options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
            if np.isfinite(res.fun) and res.fun < best_value:
                best_theta, best_value = np.asarray(res.x), float(res.fun)
    return best_theta, best_value


def _grid(*axes: Sequence[float]) -> np.ndarray:
    """Cartesian product of the axes as rows (n_points, n_axes)."""
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def step1_starts(tie_alpha_beta: bool, init_grid: str = "full") -> np.ndarray:
    """Initialisations of step 1 (rows of a, b, e, alpha[, beta]).

    "full": datablations' grids (PAPER.md §7.2): tied a, b in linspace(0,25,5), e in
    linspace(-1,1,4), alpha in linspace(0,2,4) (400 starts); untied a, b in linspace(0,12,4),
    e in linspace(-1,1,4), alpha, beta in linspace(0,1,4) (1024 starts).
    "coarse": 2 values an axis (16 / 32 starts), for tests and bootstrap refits.
    """
    if init_grid == "full":
        if tie_alpha_beta:
            return _grid(np.linspace(0, 25, 5), np.linspace(0, 25, 5), np.linspace(-1, 1, 4),
                         np.linspace(0, 2, 4))
        return _grid(np.linspace(0, 12, 4), np.linspace(0, 12, 4), np.linspace(-1, 1, 4),
                     np.linspace(0, 1, 4), np.linspace(0, 1, 4))
    if init_grid == "coarse":
        exponents = [(0.2, 0.6)] * (1 if tie_alpha_beta else 2)
        return _grid((4.0, 12.0), (4.0, 12.0), (-0.5, 1.0), *exponents)
    raise ValueError(f"init_grid {init_grid!r}: 'full' or 'coarse'")


def step2_starts(init_grid: str = "full") -> np.ndarray:
    """Initialisations of step 2 (rows of log R_D*, log R_N*). [inferred] A log grid, R* in
    {1, 10, ..., 1e4} ("full", 25 starts) or {3, 300} ("coarse", 4): datablations' linspace(0, 20)
    grid would miss the study's diffusion values (R_D* ~ 500, R_N* ~ 1266) and holds R* = 0."""
    if init_grid == "full":
        axis = np.log(np.geomspace(1.0, 1e4, 5))
    elif init_grid == "coarse":
        axis = np.log([3.0, 300.0])
    else:
        raise ValueError(f"init_grid {init_grid!r}: 'full' or 'coarse'")
    return _grid(axis, axis)


# ----------------------------------------------------------------------------------------------
# Records -> arrays, the two steps, metrics.
# ----------------------------------------------------------------------------------------------

def _finite_positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0


# Column of the runs table -> record key (None: the loss key chosen by the caller).
_COLUMNS = {"N": "params", "D": "tokens", "U": "unique_tokens", "E": "epochs", "L": None}

# A run sized from a compute budget C, as `dvar_jax.configs.grids.run_name` names it:
# `{objective}-{size}-C{mantissa}e{exponent}-E{epochs}` (e.g. ar-217M-C1e19-E1).
_COMPUTE_NAME = re.compile(r"-C\d+(\.\d+)?e\+?\d+-E[\d.]+$")

# What the error messages say counts for each step.
_STEP1_RUNS = (f"isoFLOP runs (family {FAMILY_ISOFLOP!r}: one epoch on fresh data; a record "
               "without a family counts when epochs <= 1 and it is named ...-C<flops>-E1 or no "
               "record of its objective, N and U has more epochs)")
_STEP2_RUNS = (f"data-constrained runs (family {FAMILY_DATA_CONSTRAINED!r}: a fixed unique "
               "budget U at any epochs; a record without a family counts unless it is an "
               "isoFLOP run by that rule)")


def _record_name(rec: Mapping, i: int) -> str:
    return str(rec.get("name", f"#{i}"))


def _check_record(rec: Mapping, i: int, loss_key: str) -> None:
    name = _record_name(rec, i)
    if "objective" not in rec:
        raise ValueError(f"record {name!r} has no 'objective'; a results record has "
                         f"objective, {', '.join(RECORD_KEYS)} and {loss_key!r}")
    if loss_key not in rec:
        raise ValueError(f"record {name!r} has no {loss_key!r} (it has {sorted(rec)}); "
                         "pick the loss with loss_key")
    for key in RECORD_KEYS:
        if not _finite_positive(rec.get(key)):
            raise ValueError(f"record {name!r}: {key} = {rec.get(key)!r}; must be a finite "
                             "number > 0")


def record_families(records: Sequence[Mapping]) -> list[tuple[str, bool]]:
    """(family, given) of each record: family in FAMILIES, given False when the record has no
    "family" (None or "") and the rule of the module docstring classified it (by its name when
    the name says it was sized from a compute budget, else by its epochs and siblings).

    records: results records with objective, params, unique_tokens and epochs (finite, > 0).
    ValueError, naming the record, for a family outside FAMILIES or an "isoflop" record of more
    than one epoch (an isoFLOP run is one epoch on fresh data)."""
    # Series of the rule: (objective, N, U) of every record with more than one epoch.
    repeated = {(str(r["objective"]), float(r["params"]), float(r["unique_tokens"]))
                for r in records if float(r["epochs"]) > _ONE_EPOCH}
    out = []
    for i, rec in enumerate(records):
        family = rec.get("family")
        single = float(rec["epochs"]) <= _ONE_EPOCH
        if family is None or family == "":
            series = (str(rec["objective"]), float(rec["params"]), float(rec["unique_tokens"]))
            # Rule 1 (compute-sized names) before rule 2 (siblings): see the module docstring.
            fresh = single and (_COMPUTE_NAME.search(str(rec.get("name", "")))
                                or series not in repeated)
            out.append((FAMILY_ISOFLOP if fresh else FAMILY_DATA_CONSTRAINED, False))
            continue
        if family not in FAMILIES:
            raise ValueError(f"record {_record_name(rec, i)!r}: family = {family!r}; allowed "
                             f"{', '.join(repr(f) for f in FAMILIES)}, or none (null: "
                             "classified by the rule of dvar_jax/scaling/laws.py)")
        if family == FAMILY_ISOFLOP and not single:
            raise ValueError(f"record {_record_name(rec, i)!r}: family = {family!r} with epochs "
                             f"= {rec['epochs']!r}; an isoFLOP run is one epoch on fresh data "
                             "(epochs <= 1): give it family 'data_constrained'")
        out.append((family, True))
    return out


def _runs_table(records: Iterable[Mapping],
                loss_key: str) -> tuple[dict[str, dict], dict[str, int]]:
    """Per objective: arrays N, D, U, epochs, L (float64), iso (bool: the isoFLOP family) and
    inferred (bool: family classified by the rule) of the usable runs, and the number of runs
    skipped because their loss is not a finite positive number (diverged, or a string such as
    "nan" written by the results file). Skipped runs still count as series for the rule."""
    records = list(records)
    for i, rec in enumerate(records):
        _check_record(rec, i, loss_key)
    families = record_families(records)
    table: dict[str, dict[str, list]] = {}
    skipped: dict[str, int] = {}
    for rec, (family, given) in zip(records, families, strict=True):
        if not _finite_positive(rec[loss_key]):
            skipped[str(rec["objective"])] = skipped.get(str(rec["objective"]), 0) + 1
            continue
        cols = table.setdefault(str(rec["objective"]),
                                {k: [] for k in (*_COLUMNS, "iso", "inferred")})
        for column, key in _COLUMNS.items():
            cols[column].append(float(rec[loss_key if key is None else key]))
        cols["iso"].append(family == FAMILY_ISOFLOP)
        cols["inferred"].append(not given)
    return {obj: {k: np.asarray(v) for k, v in cols.items()} for obj, cols in table.items()}, \
        skipped


def r2_score(observed: np.ndarray, predicted: np.ndarray) -> float:
    """1 - SS_res / SS_tot."""
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    ss_res = float(np.sum((observed - predicted) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def _metrics(observed: np.ndarray, predicted: np.ndarray) -> dict:
    """R^2 on L and on log L, and the Huber loss on log L (mean over runs, and the sum)."""
    r = np.log(predicted) - np.log(observed)
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2,
                     HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    return {"r2": r2_score(observed, predicted),
            "r2_log": r2_score(np.log(observed), np.log(predicted)),
            "huber": float(huber.mean()), "huber_sum": float(huber.sum())}


def _fit_step1(runs: dict, weights: np.ndarray, tie: bool, starts: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) from the isoFLOP runs (plain Chinchilla form)."""
    args = (np.log(runs["N"]), np.log(runs["D"]), np.log(runs["L"]), weights)
    theta, _ = _minimize(_step1_objective, starts, args)
    return np.append(theta, theta[3]) if tie else theta


def _step2_inputs(consts: np.ndarray, runs: dict) -> tuple[np.ndarray, ...]:
    law = dict(zip(LAW_KEYS, (*consts, 1.0, 1.0), strict=True))
    u_n, r_n, u_d, r_d = repeat_terms(law, runs["N"], runs["D"], runs["U"])
    return np.log(u_n), r_n, np.log(u_d), r_d


def _fit_step2(consts: np.ndarray, runs: dict, weights: np.ndarray,
               starts: np.ndarray) -> tuple[float, float]:
    """(R_D*, R_N*) with the step-1 constants frozen. R_N* is nan when no run has N > N_opt(U)
    (then the form does not depend on it)."""
    log_un, r_n, log_ud, r_d = _step2_inputs(consts, runs)
    args = (consts, log_un, r_n, log_ud, r_d, np.log(runs["L"]), weights)
    theta, _ = _minimize(_step2_objective, starts, args)
    rd, rn = (float(v) for v in np.exp(theta))
    if not np.any((r_n > 0) & (weights > 0)):
        rn = math.nan
    return rd, rn


def _select(runs: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in runs.items()}


def fit_laws(records: Iterable[Mapping], *, loss_key: str = "best_val_loss",
             tie_alpha_beta: bool = False, bootstrap: int = 0, seed: int = 0,
             bootstrap_step1: bool = True, init_grid: str = "full",
             step2_all_runs: bool = False) -> dict[str, dict]:
    """Fits the data-constrained law per objective with the study's two steps (PAPER.md §7.2).

    records: results records (`dvar_jax.results.read_records`) with objective, params (N),
    unique_tokens (U), epochs, tokens (D = U epochs), `loss_key` (nats/token) and family
    (FAMILIES; absent or null: classified by `record_families`' rule). Runs whose loss is not a
    finite positive number are skipped (counted in "skipped").
    Step 1 (a, b, e, alpha, beta; alpha = beta with tie_alpha_beta, as Muennighoff) uses the
    isoFLOP runs (family "isoflop": one epoch on fresh data), on the plain Chinchilla form, as the
    study's "initial fit". Step 2 (R_D*, R_N*) uses the data-constrained runs (family
    "data_constrained", one epoch included; every run with step2_all_runs).
    ValueError, naming the objective, the step and which runs count, when a step has too few
    runs (step 1: 5 tied, 6 untied; step 2: 3); naming the record for a bad record.
    bootstrap > 0: that many resamples of the runs with replacement (per step), refitting step 2
    (and step 1 too with bootstrap_step1) from the full-data optimum and a coarse grid; "ci"
    holds percentile 95% intervals.

    Returns {objective: law dict} with the constants (a, b, e, alpha, beta, rd_star, rn_star,
    A, B, E, G) and step1_/step2_ runs, r2 (on L), r2_log (on log L), huber (Huber_delta of log
    L, mean over runs), huber_sum, skipped, families_inferred (records classified by the rule),
    notes; plus "ci" and "bootstrap" when bootstrap > 0.
    """
    import jax

    table, skipped = _runs_table(records, loss_key)
    if not table:
        raise ValueError(f"no runs with a finite {loss_key!r} to fit "
                         f"(skipped {sum(skipped.values())})")
    fits = {}
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        for objective in sorted(table):
            fits[objective] = _fit_objective(objective, table[objective], loss_key,
                                             tie_alpha_beta, bootstrap, rng, bootstrap_step1,
                                             init_grid, step2_all_runs)
            fits[objective]["skipped"] = skipped.get(objective, 0)
    return fits


def _fit_objective(objective: str, runs: dict, loss_key: str, tie: bool, bootstrap: int,
                   rng: np.random.Generator, bootstrap_step1: bool, init_grid: str,
                   step2_all_runs: bool) -> dict:
    iso = runs["iso"]
    runs1 = _select(runs, iso)
    runs2 = runs if step2_all_runs else _select(runs, ~iso)
    n1, n2 = len(runs1["L"]), len(runs2["L"])
    if n1 < _STEP1_MIN[tie]:
        raise ValueError(
            f"objective {objective!r}: step 1 (Chinchilla constants a, b, e, alpha"
            f"{'' if tie else ', beta'}) needs at least {_STEP1_MIN[tie]} {_STEP1_RUNS}, "
            f"got {n1}")
    if n2 < _STEP2_MIN:
        which = "runs" if step2_all_runs else _STEP2_RUNS
        raise ValueError(f"objective {objective!r}: step 2 (R_D*, R_N*) needs at least "
                         f"{_STEP2_MIN} {which}, got {n2}")

    starts1 = step1_starts(tie, init_grid)
    starts2 = step2_starts(init_grid)
    consts = _fit_step1(runs1, np.ones(n1), tie, starts1)
    rd, rn = _fit_step2(consts, runs2, np.ones(n2), starts2)
    law = make_law(*consts, rd, rn)
    fit = {"objective": objective, **law, "tied_alpha_beta": tie, "loss_key": loss_key,
           "step1_runs": n1, "step2_runs": n2, "notes": []}
    fit["notes"] += _warnings(law)
    inferred = int(np.sum(runs["inferred"]))
    fit["families_inferred"] = inferred
    if inferred:
        fit["notes"].append(
            f"{inferred} of {len(runs['L'])} records carry no family (written before records "
            f"had one): classified by the rule, {FAMILY_ISOFLOP!r} when epochs <= 1 and named "
            "...-C<flops>-E1 or no record of the same N and U has more epochs (an unfinished "
            "series misleads it)")
    step1_pred = chinchilla_loss(law, runs1["N"], runs1["D"])
    fit.update({f"step1_{k}": v for k, v in _metrics(runs1["L"], step1_pred).items()})
    law_for_pred = law if math.isfinite(rn) else {**law, "rn_star": 1.0}  # R_N* is unused then
    step2_pred = predicted_loss(law_for_pred, runs2["N"], runs2["D"], runs2["U"])
    fit.update({f"step2_{k}": v for k, v in _metrics(runs2["L"], step2_pred).items()})
    if bootstrap > 0:
        fit.update(_bootstrap(runs1, runs2, consts, (rd, rn), tie, bootstrap, rng,
                              bootstrap_step1))
    return fit


def _warnings(law: Mapping) -> list[str]:
    """Notes on constants the runs did not pin down (a fit that is the best of its grid can
    still be degenerate, e.g. from isoFLOP runs spanning too narrow a range of N)."""
    notes = []
    for k in ("alpha", "beta"):
        if not 0.01 < law[k] < 2.0:
            notes.append(f"step 1: {k} = {law[k]:.4g} is outside (0.01, 2): the isoFLOP runs "
                         f"do not determine the {'N' if k == 'alpha' else 'D'} term; add runs "
                         "over a wider range of N and D, or tie alpha to beta")
    if not math.isfinite(law["rn_star"]):
        notes.append("R_N* not identifiable: no data-constrained run has N > N_opt(U), so the law "
                     "does not depend on it; predictions need runs with larger N")
    for k, name in (("rd_star", "R_D*"), ("rn_star", "R_N*")):
        if math.isfinite(law[k]) and not 1e-3 < law[k] < 1e6:
            notes.append(f"step 2: {name} = {law[k]:.3g} ran to the edge of what the runs can "
                         "tell: treat it as undetermined")
    return notes


def _bootstrap(runs1: dict, runs2: dict, consts: np.ndarray, r_stars: tuple[float, float],
               tie: bool, n_resamples: int, rng: np.random.Generator,
               refit_step1: bool) -> dict:
    """Percentile 95% intervals over resamples of the runs (with replacement, each step's runs
    resampled separately). Resample weights are multinomial counts, which is the same objective
    as a resampled list of runs. Refits start from the full-data optimum plus a coarse grid
    [inferred: a resample's optimum lies near the full-data one; 400-1024 starts per resample
    would cost minutes]."""
    n1, n2 = len(runs1["L"]), len(runs2["L"])
    warm1 = (consts[:4] if tie else consts)[None]
    warm2 = np.log(np.nan_to_num(np.asarray(r_stars), nan=1.0))[None]
    starts2 = np.concatenate([warm2, step2_starts("coarse")])
    names = ["rd_star", "rn_star"] + (["a", "b", "e", "alpha", "beta"] if refit_step1 else [])
    draws = {k: [] for k in names}
    for _ in range(n_resamples):
        c = consts
        if refit_step1:
            w1 = np.bincount(rng.integers(0, n1, n1), minlength=n1).astype(np.float64)
            c = _fit_step1(runs1, w1, tie, warm1)
        w2 = np.bincount(rng.integers(0, n2, n2), minlength=n2).astype(np.float64)
        rd, rn = _fit_step2(c, runs2, w2, starts2)
        for k, v in zip(names, (rd, rn, *c), strict=False):
            draws[k].append(v)
    ci = {}
    for k, values in draws.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        ci[k] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) \
            else [math.nan, math.nan]
    return {"bootstrap": n_resamples, "ci": ci}


# ----------------------------------------------------------------------------------------------
# Table.
# ----------------------------------------------------------------------------------------------

def _num(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _with_ci(fit: Mapping, key: str) -> str:
    text = _num(fit[key], 5)
    ci = fit.get("ci", {}).get(key)
    return f"{text} [{_num(ci[0])}, {_num(ci[1])}]" if ci else text


_HEADER = f"{'objective':<12}{'runs':>6}{'R^2':>9}{'R^2(log)':>10}{'loss sum':>12}{'mean':>12}"


def _metric_row(objective: str, fit: Mapping, step: str) -> str:
    return (f"{objective:<12}{fit[step + '_runs']:>6}{fit[step + '_r2']:>9.4f}"
            f"{fit[step + '_r2_log']:>10.4f}{fit[step + '_huber_sum']:>12.4g}"
            f"{fit[step + '_huber']:>12.4g}")


_CONSTANT_COLUMNS = ("a", "b", "e", "alpha", "beta", "A", "B", "E", "G")


def format_fits(fits: Mapping[str, Mapping]) -> str:
    """The fits as the study's Table 1: (a) step-1 R^2 / loss, (b) step-2 R^2 / loss with R_D*
    and R_N* (95% bootstrap intervals when fitted with bootstrap), then the constants."""
    if not fits:
        return "no fits"
    any_fit = next(iter(fits.values()))
    boot = any_fit.get("bootstrap", 0)
    lines = [
        f"Data-constrained scaling laws (Muennighoff form) fitted to {any_fit['loss_key']}. "
        "R^2 on L; loss = Huber_delta(log L_fit - log L), delta="
        f"{HUBER_DELTA:g}, sum and mean over runs"
        + (f"; [95% CI from {boot} bootstrap resamples]" if boot else ""),
        "",
        "(a) initial fit, isoFLOP runs (one epoch on fresh data)",
        _HEADER,
    ]
    for obj, f in fits.items():
        lines.append(_metric_row(obj, f, "step1"))
    lines += ["", "(b) second step, data-constrained runs, step-1 constants frozen",
              f"{_HEADER}  {'R_D*':<28}{'R_N*':<28}"]
    for obj, f in fits.items():
        lines.append(f"{_metric_row(obj, f, 'step2')}"
                     f"  {_with_ci(f, 'rd_star'):<28}{_with_ci(f, 'rn_star'):<28}")
    lines += ["", "constants" + (" (alpha tied to beta)" if any_fit.get("tied_alpha_beta")
                                 else ""),
              f"{'objective':<12}" + "".join(f"{k:>13}" for k in _CONSTANT_COLUMNS)]
    for obj, f in fits.items():  # a space before every column, however wide a runaway value
        lines.append(f"{obj:<12}" + "".join(f" {_num(f[k], 6):>12}" for k in _CONSTANT_COLUMNS))
    lines += [f"note ({obj}): {note}" for obj, f in fits.items() for note in f.get("notes", [])]
    return "\n".join(lines)
