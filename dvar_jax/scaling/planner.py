"""AR or diffusion? Critical compute C_crit(U) and a planner from two data-constrained laws
(PAPER.md §7.4).

For a compute budget C (FLOPs, C = 6 N D as the study counts) and U unique tokens, each objective
is taken at its loss-optimal allocation: the N minimising L(N, D = C / (6 N), U) (epochs = D / U
follow). dL(C, U) = L_diffusion* - L_AR*; C_crit(U) is where dL crosses zero from above (AR ahead
below, diffusion ahead above), and the crossover frontier is the straight line through
(log10 C_crit, log10 U[millions]), the study's form log10(U[M]) = 0.460 log10(C) - 7.052.

A law set is {"name", "description", "source", "laws": {"ar": law, "diffusion": law},
"frontier": {"slope", "intercept"} or None}; the functions also take the bare {"ar", "diffusion"}
mapping (e.g. `fit_laws`'s result).
"""

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from dvar_jax.scaling.flops import FLOPS_CONVENTION
from dvar_jax.scaling.laws import LAW_KEYS, MUENNIGHOFF_C4, make_law, predicted_loss

OBJECTIVES = ("ar", "diffusion")

# The study's published crossover frontier, log10(U / 1e6) = slope log10(C) + intercept
# (PAPER.md §7.4: U in millions of unique tokens, C in FLOPs; C_crit ~ U^(1/0.460) = U^2.174).
PUBLISHED_FRONTIER = {"slope": 0.460, "intercept": -7.052}

# [inferred] The study published R_D*, R_N* (Table 1b) but not its step-1 constants. Both families
# borrow Muennighoff's C4 constants (alpha = beta); with no more than that, diffusion's larger R*
# make it at least as good as AR at every compute ("prabhudesai2025-shared": no crossover). The
# study's diffusion is worse on fresh data, so in "prabhudesai2025" its A, B are scaled by
# e^0.29445 (x1.342) and its E by e^0.04838 (x1.050): the two numbers that make these laws'
# C_crit(U) at U = 25M, 50M, 100M reproduce the published frontier (slope 0.4602, intercept
# -7.055 vs 0.460, -7.052; least squares on log10 C_crit). They are a calibration, not the
# study's constants.
_DIFFUSION_A_B_SHIFT = 0.29445
_DIFFUSION_E_SHIFT = 0.04838
_STUDY_R_STARS = {"ar": (31.19, 55.16), "diffusion": (493.89, 1265.65)}  # P Table 1(b)


def _study_law(objective: str, calibrated: bool) -> dict:
    rd, rn = _STUDY_R_STARS[objective]
    c = dict(MUENNIGHOFF_C4, rd_star=rd, rn_star=rn)
    if calibrated and objective == "diffusion":
        c.update(a=c["a"] + _DIFFUSION_A_B_SHIFT, b=c["b"] + _DIFFUSION_A_B_SHIFT,
                 e=c["e"] + _DIFFUSION_E_SHIFT)
    return make_law(**c)


# The law set `dvar plan` and the demo report use unless told otherwise.
DEFAULT_LAW_SET = "prabhudesai2025"

LAW_SETS: dict[str, dict] = {
    "prabhudesai2025": {
        "description": (
            "the study's published R_D*/R_N* (Table 1b: diffusion 493.89 / 1265.65, AR 31.19 / "
            "55.16) on BORROWED step-1 constants: Muennighoff et al.'s C4 fit (a=6.255414, "
            "b=7.3049974, e=0.6254804, alpha=beta=0.3526596) for AR; for diffusion the same "
            "with A, B x1.342 and E x1.050, calibrated so that C_crit(U) reproduces the "
            "published frontier (the study did not publish A, B, E, alpha, beta)"),
        "source": "Prabhudesai et al. 2025 Table 1(b) and §3.3; Muennighoff et al. 2023 C4 fit",
        "laws": {obj: _study_law(obj, calibrated=True) for obj in OBJECTIVES},
        "frontier": dict(PUBLISHED_FRONTIER),
    },
    "prabhudesai2025-shared": {
        "description": (
            "the study's published R_D*/R_N* (Table 1b) on Muennighoff et al.'s C4 step-1 "
            "constants for BOTH objectives, uncalibrated: diffusion is then never worse than "
            "AR, and there is no crossover (shown for comparison)"),
        "source": "Prabhudesai et al. 2025 Table 1(b); Muennighoff et al. 2023 C4 fit",
        "laws": {obj: _study_law(obj, calibrated=False) for obj in OBJECTIVES},
        "frontier": dict(PUBLISHED_FRONTIER),
    },
}

# Two losses closer than this (relative) are a tie: below it the sign of dL is rounding.
_TIE = 1e-9


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} = {value!r}: must be a finite number > 0")
    return float(value)


def _pair(laws: Mapping) -> tuple[Mapping, Mapping]:
    """(AR law, diffusion law) of a law set or of a bare {objective: law} mapping."""
    laws = laws.get("laws", laws)
    missing = [obj for obj in OBJECTIVES if obj not in laws]
    if missing:
        raise ValueError(f"laws for {missing} are missing (have {sorted(laws)}); comparing "
                         f"needs both {list(OBJECTIVES)}")
    for obj in OBJECTIVES:
        bad = {k: laws[obj].get(k) for k in LAW_KEYS
               if not isinstance(laws[obj].get(k), int | float) or not math.isfinite(laws[obj][k])}
        if bad:
            raise ValueError(f"law for {obj!r} has {bad}: every constant of {list(LAW_KEYS)} "
                             "must be a finite number (R_N* is nan when no fitted run had "
                             "N > N_opt(U))")
    return laws["ar"], laws["diffusion"]


# ----------------------------------------------------------------------------------------------
# Loss-optimal allocation and the crossover.
# ----------------------------------------------------------------------------------------------

def optimal_allocation(law: Mapping, flops: float, unique_tokens: float) -> dict:
    """The N minimising L(N, C/(6N), U) for compute `flops` (C) and U unique tokens.

    A 400-point log grid over N in [1, C/60] (at least 10 tokens) finds the basin; a bounded
    Brent search between the grid neighbours refines it (the loss has kinks where N = N_opt(U),
    so no derivative is used). Returns params, tokens, epochs (D/U) and loss (nats/token).
    """
    from scipy.optimize import minimize_scalar

    c = _positive("flops", flops)
    u = _positive("unique_tokens", unique_tokens)
    hi = math.log(c / 60.0)
    if hi <= 0:
        raise ValueError(f"flops = {flops!r}: too small to train anything (needs > 60)")
    log_n = np.linspace(0.0, hi, 400)

    def loss(x):
        n = np.exp(x)
        return predicted_loss(law, n, c / (6.0 * n), u)

    i = int(np.argmin(loss(log_n)))
    lo_x, hi_x = log_n[max(i - 1, 0)], log_n[min(i + 1, len(log_n) - 1)]
    res = minimize_scalar(lambda x: float(loss(x)), bounds=(lo_x, hi_x), method="bounded",
                          options={"xatol": 1e-9})
    n = math.exp(res.x)
    d = c / (6.0 * n)
    return {"params": n, "tokens": d, "epochs": d / u, "loss": float(res.fun)}


def loss_gap(laws: Mapping, flops: float, unique_tokens: float) -> float:
    """dL(C, U) = L_diffusion* - L_AR* at each objective's loss-optimal allocation (nats/token);
    negative where diffusion is ahead."""
    ar, diffusion = _pair(laws)
    return optimal_allocation(diffusion, flops, unique_tokens)["loss"] \
        - optimal_allocation(ar, flops, unique_tokens)["loss"]


# Where critical_compute looks for C_crit (FLOPs): CPU-sized sweeps to far beyond the study.
FLOPS_RANGE = (1e6, 1e30)


def critical_compute(laws: Mapping, unique_tokens: float, *,
                     flops_range: tuple[float, float] = FLOPS_RANGE) -> float:
    """C_crit(U) in FLOPs: the smallest C in flops_range where dL(C, U) goes from > 0 (AR ahead)
    to <= 0 (diffusion ahead). Scanned at 4 points a decade, then solved with Brent's method in
    log C. nan when there is no such crossing in the range (one objective ahead throughout, or
    the two tie)."""
    from scipy.optimize import brentq

    u = _positive("unique_tokens", unique_tokens)
    lo, hi = (_positive("flops_range", v) for v in flops_range)
    ar, diffusion = _pair(laws)

    def gap(log_c: float) -> float:
        c = 10.0**log_c
        l_ar = optimal_allocation(ar, c, u)["loss"]
        l_diff = optimal_allocation(diffusion, c, u)["loss"]
        # A tie within rounding is not a crossing: it counts as "diffusion not ahead" (> 0) only
        # when AR is ahead by more than the tolerance.
        return l_diff - l_ar if abs(l_diff - l_ar) > _TIE * l_ar else 0.0

    grid = np.arange(math.log10(lo), math.log10(hi) + 1e-9, 0.25)
    gaps = [gap(x) for x in grid]
    for x0, x1, g0, g1 in zip(grid[:-1], grid[1:], gaps[:-1], gaps[1:], strict=True):
        if g0 > 0 and g1 < 0:
            return 10.0 ** brentq(gap, x0, x1, xtol=1e-10)
        if g0 > 0 and g1 == 0:
            return 10.0**x1
    return math.nan


def crossover_frontier(laws: Mapping, unique_tokens: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line log10(U / 1e6) = slope log10(C_crit(U)) +
    intercept through the laws' C_crit at each U (tokens): the study's form and units."""
    us = [_positive("unique_tokens", u) for u in unique_tokens]
    c_crit = np.array([critical_compute(laws, u) for u in us])
    ok = np.isfinite(c_crit)
    if ok.sum() < 2:
        raise ValueError(f"C_crit is defined at {int(ok.sum())} of the unique-token budgets "
                         f"{us}; a frontier needs at least 2")
    slope, intercept = np.polyfit(np.log10(c_crit[ok]), np.log10(np.asarray(us)[ok] / 1e6), 1)
    return float(slope), float(intercept)


def frontier_compute(frontier: Mapping, unique_tokens: float) -> float:
    """C (FLOPs) on a frontier log10(U / 1e6) = slope log10(C) + intercept at U tokens."""
    u = _positive("unique_tokens", unique_tokens)
    return 10.0 ** ((math.log10(u / 1e6) - frontier["intercept"]) / frontier["slope"])


# ----------------------------------------------------------------------------------------------
# Measured crossovers (from runs, no law).
# ----------------------------------------------------------------------------------------------

def pareto_frontier(records: Iterable[Mapping], objective: str, unique_tokens: float, *,
                    loss_key: str = "best_val_loss") -> tuple[np.ndarray, np.ndarray]:
    """(flops, loss) of the runs of `objective` at U (matched to 0.1%) on the loss-vs-compute
    Pareto frontier: sorted by FLOPs, keeping each run that beats every cheaper one."""
    pts = sorted((float(r["flops"]), float(r[loss_key])) for r in records
                 if r.get("objective") == objective
                 and abs(float(r["unique_tokens"]) / unique_tokens - 1) < 1e-3
                 and isinstance(r.get(loss_key), int | float) and math.isfinite(r[loss_key]))
    flops, losses, best = [], [], math.inf
    for c, loss in pts:
        if loss < best:
            flops.append(c)
            losses.append(loss)
            best = loss
    return np.asarray(flops), np.asarray(losses)


def measured_crossover(records: Sequence[Mapping], unique_tokens: float, *,
                       loss_key: str = "best_val_loss") -> float:
    """The compute where the measured diffusion frontier first drops below the AR one at U
    (FLOPs; log-linear interpolation of both step-shaped frontiers on a common grid within the
    FLOPs both span); nan when they do not cross there."""
    fronts = [pareto_frontier(records, obj, unique_tokens, loss_key=loss_key)
              for obj in OBJECTIVES]
    if any(len(f[0]) < 1 for f in fronts):
        return math.nan
    lo = max(f[0][0] for f in fronts)
    hi = max(max(f[0][-1] for f in fronts), lo)
    grid = np.geomspace(lo, hi, 200) if hi > lo else np.array([lo])

    def best_at(front: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        # The best loss reachable with at most C: a step function of C.
        idx = np.searchsorted(front[0], grid, side="right") - 1
        return front[1][np.clip(idx, 0, None)]

    gap = best_at(fronts[1]) - best_at(fronts[0])
    for i in range(1, len(grid)):
        if gap[i - 1] > 0 and gap[i] <= 0:
            return float(grid[i])
    return math.nan


# ----------------------------------------------------------------------------------------------
# Law sets and the plan.
# ----------------------------------------------------------------------------------------------

def load_laws(spec: str, **fit_kwargs) -> dict:
    """A law set: a LAW_SETS name, or a results JSONL path fitted with `fit_laws(**fit_kwargs)`
    (then its frontier is None)."""
    if spec in LAW_SETS:
        return {"name": spec, **LAW_SETS[spec]}
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"law set {spec!r}: a name from {sorted(LAW_SETS)} or the path of a "
                         "results JSONL file")
    from dvar_jax.results import read_records
    from dvar_jax.scaling.laws import fit_laws

    fits = fit_laws(read_records(path), **fit_kwargs)
    return {"name": str(path), "description": f"fitted on {path} ({', '.join(sorted(fits))})",
            "source": str(path), "laws": fits, "frontier": None}


def plan(laws: Mapping, unique_tokens: float, flops: float) -> dict:
    """Which objective reaches the lower predicted loss with `flops` FLOPs (C = 6 N D) on
    `unique_tokens` unique tokens, each at its loss-optimal N and epochs; plus C_crit(U) from the
    laws and, for a law set with a published frontier, from that frontier."""
    u = _positive("unique_tokens", unique_tokens)
    c = _positive("flops", flops)
    ar, diffusion = _pair(laws)
    alloc = {"ar": optimal_allocation(ar, c, u), "diffusion": optimal_allocation(diffusion, c, u)}
    gap = alloc["diffusion"]["loss"] - alloc["ar"]["loss"]
    tie = abs(gap) <= _TIE * alloc["ar"]["loss"]
    frontier = laws.get("frontier") if "laws" in laws else None
    return {
        "law_set": laws.get("name", "custom") if "laws" in laws else "custom",
        "description": laws.get("description", "") if "laws" in laws else "",
        "unique_tokens": u, "flops": c, "flops_convention": FLOPS_CONVENTION,
        # On a tie AR is named: it reaches the same loss and samples in one pass per token.
        "recommended": "diffusion" if gap < 0 and not tie else "ar", "tie": tie,
        "loss_gap": gap, "objectives": alloc,
        "c_crit": critical_compute(laws, u), "c_crit_range": FLOPS_RANGE,
        "c_crit_published": frontier_compute(frontier, u) if frontier else None,
    }


def format_tokens(x: float) -> str:
    """A count with a unit: 25M, 1.5B, 20k (also used in file names)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_plan(p: Mapping) -> str:
    """The plan as text: the recommendation, each objective's allocation and loss, C_crit."""
    u, c = p["unique_tokens"], p["flops"]
    lines = [f"law set: {p['law_set']}"]
    if p["description"]:
        lines += textwrap.wrap(p["description"], 96, initial_indent="  ",
                               subsequent_indent="  ")
    lines += [f"budget: {c:.3g} FLOPs ({p['flops_convention']}) on {format_tokens(u)} unique "
              "tokens", ""]
    lines.append(f"{'objective':<11}{'params':>10}{'tokens':>10}{'epochs':>10}"
                 f"{'predicted loss':>16}")
    for obj, a in p["objectives"].items():
        lines.append(f"{obj:<11}{format_tokens(a['params']):>10}"
                     f"{format_tokens(a['tokens']):>10}{a['epochs']:>10.3g}{a['loss']:>16.4f}")
    lines.append("")
    rec = p["recommended"]
    if p["tie"]:
        lines.append(f"-> {rec}: the two predicted losses tie (dL = {p['loss_gap']:.2e})")
    else:
        lines.append(f"-> {rec}: predicted loss lower by {abs(p['loss_gap']):.4f} nats/token")
    c_crit = p["c_crit"]
    if math.isfinite(c_crit):
        side = "above" if c > c_crit else "below"
        lines.append(f"C_crit({format_tokens(u)}) = {c_crit:.3g} FLOPs from these laws "
                     f"(this budget is {side} it)")
    else:
        lo, hi = p["c_crit_range"]
        lines.append(f"C_crit({format_tokens(u)}): none in {lo:.0e}..{hi:.0e} FLOPs from these "
                     "laws (one objective is ahead, or they tie, throughout)")
    if p.get("c_crit_published"):
        lines.append(f"C_crit({format_tokens(u)}) = {p['c_crit_published']:.3g} FLOPs from the "
                     "study's published frontier log10(U[M]) = 0.460 log10(C) - 7.052")
    return "\n".join(lines)
