"""Markers several test files share."""

import importlib.util

import pytest

# libtpu (the `tpu` extra) compiles for TPU topologies on a CPU-only machine. `make` installs it
# wherever a wheel exists (x86-64 Linux, CI's platform), so these tests run there; elsewhere
# there is nothing to compile with.
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs the `tpu` extra (libtpu), which has wheels for x86-64 Linux "
    "only; `make` installs it there")
