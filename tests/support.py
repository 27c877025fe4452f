"""What several test files share: the libtpu marker, loading a benchmark script and running the
processes of a loopback multi-process job."""

import contextlib
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# libtpu (the `tpu` extra) compiles for TPU topologies on a CPU-only machine. It has wheels for
# x86-64 Linux only (CI's platform), where `make` installs it: there these tests always run, and
# a missing libtpu fails them loudly rather than skipping. Elsewhere nothing can compile for a TPU.
LIBTPU_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"  # as the Makefile
needs_libtpu = pytest.mark.skipif(
    not LIBTPU_PLATFORM, reason=f"compiling for a TPU needs libtpu, which has wheels for x86-64 "
    f"Linux only; this machine is {sys.platform} {platform.machine()}")


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_together(commands: list[list[str]], *, timeout: float, grace: float = 60.0,
                 **popen) -> list[tuple[int | None, str, str]]:
    """(returncode, stdout, stderr) of each command, all started at once (the processes of one
    distributed job) and waited for together.

    Output goes to files, not pipes: a process whose unread pipe filled would block, and its
    peers would wait for it in a collective until the timeout. When one process fails, the
    others get `grace` seconds to finish (they are usually blocked on it) and are then killed;
    everything still running at `timeout` is killed too. A killed process's returncode is that
    of the kill (negative), and its output up to then is returned."""
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as files:
        streams = [tuple(files.enter_context(open(Path(folder, f"{i}.{kind}"), "w+"))
                         for kind in ("out", "err")) for i in range(len(commands))]
        procs = [subprocess.Popen(argv, stdout=out, stderr=err, text=True, **popen)
                 for argv, (out, err) in zip(commands, streams, strict=True)]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace)
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        results = []
        for p, (out, err) in zip(procs, streams, strict=True):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
        return results
