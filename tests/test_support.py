"""The test helpers themselves (tests/support.py)."""

import sys
import time

from support import run_together


def test_run_together_stops_the_peers_of_a_failed_process():
    """A process that exits 3 leaves its peer (blocked forever, as in a collective) killed after
    the grace period, not the timeout; each output comes back, pipes never fill."""
    chatty = "import sys; sys.stderr.write('x' * 200_000); sys.exit(3)"
    start = time.monotonic()
    (rc0, _, err0), (rc1, out1, _) = run_together(
        [[sys.executable, "-c", chatty],
         [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]],
        timeout=120, grace=1.0)
    assert time.monotonic() - start < 60
    assert rc0 == 3 and len(err0) == 200_000
    assert rc1 is not None and rc1 < 0 and out1 == "up\n"


def test_run_together_returns_every_output_of_a_clean_run():
    results = run_together([[sys.executable, "-c", f"print({i})"] for i in range(3)], timeout=60)
    assert results == [(0, f"{i}\n", "") for i in range(3)]
