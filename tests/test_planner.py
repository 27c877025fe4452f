"""C_crit, the crossover frontier and the AR-or-diffusion planner (PAPER.md §7.4)."""

import json
import math

import numpy as np
import pytest

from dvar_jax.scaling.laws import MUENNIGHOFF_C4, make_law, n_opt, predicted_loss
from dvar_jax.scaling.planner import (
    LAW_SETS,
    PUBLISHED_FRONTIER,
    critical_compute,
    crossover_frontier,
    format_plan,
    frontier_compute,
    load_laws,
    loss_gap,
    measured_crossover,
    optimal_allocation,
    pareto_frontier,
    plan,
)

C4 = make_law(**MUENNIGHOFF_C4)
STUDY = load_laws("prabhudesai2025")


def test_published_frontier_reproduces_paper_7_4_table():
    """log10(U[M]) = 0.460 log10(C) - 7.052 gives PAPER.md §7.4's C_crit row (2 significant
    digits), and C_crit ~ U^(1/0.460) = U^2.174."""
    table = {25: 2.3e18, 50: 1.1e19, 100: 4.8e19, 200: 2.2e20, 500: 1.6e21, 1000: 7.1e21}
    for u_millions, c in table.items():
        assert float(f"{frontier_compute(PUBLISHED_FRONTIER, u_millions * 1e6):.1e}") == c
    ratio = frontier_compute(PUBLISHED_FRONTIER, 200e6) / frontier_compute(PUBLISHED_FRONTIER,
                                                                           100e6)
    assert math.log2(ratio) == pytest.approx(2.174, abs=1e-3)
    # PAPER.md's sanity check at 100M: best AR 4.3e18 < C_crit < best MDM 1.24e20 (Table 4).
    assert 4.32e18 < frontier_compute(PUBLISHED_FRONTIER, 100e6) < 1.24e20


def test_study_law_set_is_labelled_and_reproduces_the_frontier():
    """The "prabhudesai2025" set carries Table 1(b)'s R_D*, R_N*, says that its step-1 constants
    are borrowed/calibrated, and its laws' C_crit(U) follows the published frontier (within 3% at
    25M..100M; fitted slope 0.460, intercept -7.05)."""
    laws = STUDY["laws"]
    assert (laws["diffusion"]["rd_star"], laws["diffusion"]["rn_star"]) == (493.89, 1265.65)
    assert (laws["ar"]["rd_star"], laws["ar"]["rn_star"]) == (31.19, 55.16)
    assert "BORROWED" in STUDY["description"] and "calibrated" in STUDY["description"]
    assert laws["ar"]["a"] == MUENNIGHOFF_C4["a"]
    for u in (25e6, 50e6, 100e6):
        assert critical_compute(STUDY, u) == pytest.approx(
            frontier_compute(PUBLISHED_FRONTIER, u), rel=0.03)
    slope, intercept = crossover_frontier(STUDY, [25e6, 50e6, 100e6])
    assert slope == pytest.approx(0.460, abs=0.002)
    assert intercept == pytest.approx(-7.052, abs=0.02)


@pytest.mark.parametrize("u", [25e6, 100e6])
def test_planner_on_study_set_picks_ar_below_and_diffusion_above_c_crit(u):
    """Found: AR at C_crit/10 (by ~0.2-0.3 nats), diffusion at 10 x C_crit (by ~0.3 nats); at
    100M the study's best AR budget (4.34e18) plans AR and its best MDM budget (1.25e20) plans
    diffusion."""
    c_crit = critical_compute(STUDY, u)
    below, above = plan(STUDY, u, c_crit / 10), plan(STUDY, u, c_crit * 10)
    assert below["recommended"] == "ar" and below["loss_gap"] > 0.1
    assert above["recommended"] == "diffusion" and above["loss_gap"] < -0.1
    assert loss_gap(STUDY, c_crit * 0.9, u) > 0 > loss_gap(STUDY, c_crit * 1.1, u)
    if u == 100e6:
        assert plan(STUDY, u, 4.34e18)["recommended"] == "ar"
        assert plan(STUDY, u, 1.25e20)["recommended"] == "diffusion"


def test_shared_step1_constants_give_no_crossover():
    """With the same step-1 constants, diffusion's larger R_D*, R_N* make it never worse: no
    C_crit; a tie on fresh data (AR named), diffusion once data repeats."""
    shared = load_laws("prabhudesai2025-shared")
    assert math.isnan(critical_compute(shared, 100e6))
    low = plan(shared, 100e6, 1e15)  # ~0.1 epochs: fresh data, identical laws
    assert low["tie"] and low["recommended"] == "ar"
    assert plan(shared, 100e6, 1e20)["recommended"] == "diffusion"


def test_irreducible_shift_hands_ar_every_budget_by_exactly_the_shift():
    """Diffusion = AR with E x1.1: the same allocation at every C and a gap of exactly 0.1 E;
    AR everywhere and no C_crit."""
    worse = make_law(**{**MUENNIGHOFF_C4, "e": MUENNIGHOFF_C4["e"] + math.log(1.1)})
    laws = {"ar": C4, "diffusion": worse}
    for c in (1e17, 1e19, 1e21):
        p = plan(laws, 50e6, c)
        assert p["recommended"] == "ar" and not p["tie"]
        assert p["loss_gap"] == pytest.approx(0.1 * C4["E"], rel=1e-6)
        assert p["objectives"]["ar"]["params"] == pytest.approx(
            p["objectives"]["diffusion"]["params"], rel=1e-4)
    assert math.isnan(critical_compute(laws, 50e6))


def test_fresh_data_allocation_is_chinchillas_closed_form():
    """With U far above D the loss-optimal N is G (C/6)^(beta/(alpha+beta)) = G sqrt(C/6)
    (alpha = beta), and epochs < 1."""
    for c in (1e18, 1e20, 1e22):
        a = optimal_allocation(C4, c, 1e30)
        assert a["params"] == pytest.approx(C4["G"] * math.sqrt(c / 6), rel=1e-4)
        assert a["params"] * a["tokens"] * 6 == pytest.approx(c)
        assert a["loss"] == pytest.approx(float(predicted_loss(C4, a["params"], a["tokens"],
                                                               1e30)))
        assert a["epochs"] < 1


def test_format_plan_names_the_choice_and_c_crit():
    text = format_plan(plan(STUDY, 100e6, 1e21))
    assert "-> diffusion" in text and "C_crit(100M)" in text and "C = 6 N D" in text
    assert "BORROWED" in text and "0.460 log10(C) - 7.052" in text


def test_measured_crossover_by_hand():
    """AR frontier (1, 3), (10, 2), (100, 1.9); diffusion (1, 4), (10, 2.5), (100, 1.5), (1000,
    1.6 dominated): diffusion's best drops below AR's first at C = 100."""
    rows = [("ar", 1, 3.0), ("ar", 10, 2.0), ("ar", 100, 1.9), ("diffusion", 1, 4.0),
            ("diffusion", 10, 2.5), ("diffusion", 100, 1.5), ("diffusion", 1000, 1.6)]
    records = [{"objective": o, "unique_tokens": 1e6, "flops": c, "best_val_loss": loss}
               for o, c, loss in rows]
    flops, losses = pareto_frontier(records, "diffusion", 1e6)
    assert list(flops) == [1, 10, 100] and list(losses) == [4.0, 2.5, 1.5]
    assert measured_crossover(records, 1e6) == pytest.approx(100.0)
    assert math.isnan(measured_crossover(records[:3] + records[3:5], 1e6))
    assert math.isnan(measured_crossover(records, 5e6))  # no runs at that U


def test_load_laws_from_results_file(tmp_path):
    """A results JSONL is fitted per objective and plans like a named set."""
    rng_laws = STUDY["laws"]
    path = tmp_path / "results.jsonl"
    with path.open("w") as f:
        for obj, law in rng_laws.items():
            for c in (1e18, 1e19, 1e20):
                for n in np.geomspace(1e7, 1e9, 8):
                    d = c / (6 * n)
                    if n > n_opt(law, d):  # where the form is no longer plain Chinchilla
                        continue
                    f.write(json.dumps({"name": f"{obj}-{c}-{n}", "objective": obj,
                                        "params": n, "unique_tokens": d, "epochs": 1,
                                        "tokens": d, "flops": c,
                                        "best_val_loss": float(predicted_loss(law, n, d, d))})
                            + "\n")
            for u in (25e6, 100e6):
                for n in (2e7, 1e8, 4e8):
                    for e in (2, 8, 32, 128, 512):
                        loss = float(predicted_loss(law, n, u * e, u))
                        f.write(json.dumps({"name": f"{obj}-{u}-{n}-{e}", "objective": obj,
                                            "params": n, "unique_tokens": u, "epochs": e,
                                            "tokens": u * e, "flops": 6 * n * u * e,
                                            "best_val_loss": loss}) + "\n")
    fitted = load_laws(str(path), tie_alpha_beta=True, init_grid="coarse")
    assert fitted["name"] == str(path) and fitted["frontier"] is None
    assert fitted["laws"]["diffusion"]["rd_star"] == pytest.approx(493.89, rel=1e-3)
    p = plan(fitted, 100e6, 1e21)
    assert p["recommended"] == "diffusion" and p["c_crit_published"] is None
    assert p["c_crit"] == pytest.approx(critical_compute(STUDY, 100e6), rel=0.01)


def test_bad_inputs():
    for u in (0, -5e6, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"unique_tokens = .*finite number > 0"):
            plan(STUDY, u, 1e20)
    with pytest.raises(ValueError, match=r"flops = -1.*finite number > 0"):
        plan(STUDY, 100e6, -1)
    with pytest.raises(ValueError, match=r"unique_tokens = 0"):
        critical_compute(STUDY, 0)
    with pytest.raises(ValueError, match=r"'nope'.*\['prabhudesai2025', "
                                         r"'prabhudesai2025-shared'\].*results JSONL"):
        load_laws("nope")
    with pytest.raises(ValueError, match=r"\['diffusion'\] are missing"):
        plan({"ar": C4}, 100e6, 1e20)
    with pytest.raises(ValueError, match="at least 2"):
        crossover_frontier({"ar": C4, "diffusion": C4}, [25e6, 50e6])
    assert sorted(LAW_SETS) == ["prabhudesai2025", "prabhudesai2025-shared"]
