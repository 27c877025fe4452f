"""What several test files share: the libtpu marker and loading a benchmark script."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# libtpu (the `tpu` extra) compiles for TPU topologies on a CPU-only machine. `make` installs it
# wherever a wheel exists (x86-64 Linux, CI's platform), so these tests run there; elsewhere
# there is nothing to compile with.
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs the `tpu` extra (libtpu), which has wheels for x86-64 Linux "
    "only; `make` installs it there")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
