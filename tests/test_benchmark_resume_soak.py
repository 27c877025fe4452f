"""The resume soak benchmark runs: a tiny run killed with SIGKILL and SIGTERM and restarted ends
with exactly the uninterrupted run's parameters, train state and logged losses.

Wall-clock numbers are printed by the script, never asserted here.
"""

import random

import pytest
from support import load_benchmark


@pytest.mark.slow
def test_quick_soak_restarts_and_ends_bitwise_equal(capsys):
    rows = load_benchmark("resume_soak").main(["--quick"])
    out = capsys.readouterr().out
    reference, killed = rows
    assert reference["run"] == "uninterrupted" and reference["attempts"] == 1
    # Planned kills are delivered while the run is going (one may, rarely, find it finished).
    assert 1 <= killed["sigkill"] + killed["sigterm"] <= 3
    assert killed["attempts"] >= 2  # restarted at least once
    assert killed["steps_trained"] >= killed["steps"] == reference["steps"]
    assert killed["steps_recomputed"] == killed["steps_trained"] - killed["steps"]
    assert killed["params_equal"] and killed["state_equal"] and killed["losses_equal"]
    assert killed["params_sha256"] == reference["params_sha256"]
    assert "EQUAL the uninterrupted run's" in out and "steps_recomputed" in out


def test_kill_plans_leave_room_for_the_kills_after_them():
    soak = load_benchmark("resume_soak")
    rng = random.Random(0)
    last = 46 - 1 - soak.OVERSHOOT_STEPS  # the latest step a kill may be planned at
    for kills_left in (1, 2, 3):
        for logged in range(last):
            kill = soak.plan_kill(rng, 9, logged, num_steps=46, kills_left=kills_left,
                                  startup_s=10.0)
            if kill.steps_ahead:
                assert logged + kill.steps_ahead * kills_left <= last or kill.steps_ahead == 1
            else:
                assert 0.2 <= kill.delay_s <= 9.5  # within start-up


def test_soak_rejects_a_negative_kill_count():
    with pytest.raises(SystemExit):
        load_benchmark("resume_soak").main(["--kills", "-1"])
