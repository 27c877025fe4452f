"""The layers of dvar_jax: `.importlinter` holds the contract, import-linter checks it.

- The package keeps the contract: no import runs up a layer, every module directly under
  dvar_jax is in a layer, and nothing in dvar_jax imports the examples of the top-level
  configs/. A failure prints import-linter's report, with each offending import chain.
- The contract catches a violation: a copy of the package with one planted upward import fails,
  and the report names that import.
- docs/architecture.md's layer table lists the contract's layers, in the same order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# The `lint-imports` command, run by this interpreter.
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports on the dvar_jax found in `cwd` (import-linter puts cwd first on the path)."""
    return subprocess.run([*LINT_IMPORTS, "--no-cache", "--no-logo", str(CONFIG)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _contract_layers() -> list[set[str]]:
    """The layers contract's layers, top first, as sets of module names under dvar_jax."""
    contracts = read_configuration(str(CONFIG))["contracts_options"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    # `:` separates siblings that may import each other, `|` independent ones; `(name)` marks a
    # module that need not exist.
    return [{name.strip().strip("()") for name in re.split(r"[:|]", layer)} for layer in layers]


def _documented_layers() -> list[set[str]]:
    """The modules column of docs/architecture.md's table under `## Layers`, top row first."""
    section = ARCHITECTURE.read_text().split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header, ---
    return [set(re.findall(r"`(\w+)`", row.split("|")[2])) for row in rows]


def test_imports_follow_the_layers():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}  # planted\n")


def test_the_contract_catches_an_upward_import(tmp_path):
    """A copy of today's package, plus a kernel importing the cli and the loop importing an
    example config: both contracts break, and the report shows each planted import."""
    package = tmp_path / "dvar_jax"
    shutil.copytree(ROOT / "dvar_jax", package, ignore=shutil.ignore_patterns("__pycache__"))
    _plant(package / "kernels" / "common.py", "from dvar_jax import cli")
    _plant(package / "train.py", "import configs.tiny")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    for expected in ("dvar_jax.kernels is not allowed to import dvar_jax.cli",
                     "dvar_jax.kernels.common -> dvar_jax.cli",
                     "dvar_jax is not allowed to import configs",
                     "dvar_jax.train -> configs"):
        assert expected in result.stdout, result.stdout


def test_architecture_doc_lists_the_contract_layers():
    documented, contract = _documented_layers(), _contract_layers()
    assert documented == contract, (
        "docs/architecture.md's layer table and .importlinter disagree:\n"
        f"doc:      {documented}\ncontract: {contract}")
