"""README.md and docs/ against the code.

- Every command in a ```bash block of README.md is tested, as `COMMANDS` says: run with tiny
  settings, run as is (when cheap), parse-checked, dry-run, or `make -n`. A README command that no
  row of `COMMANDS` covers fails, and so does a row no README command uses.
- `dvar --help` lists every subcommand; `dvar SUB --help`, for every subcommand cli.py
  registers, lists every flag with a description and a default, and every config key with the
  description docs/config.md gives it.
- Every relative link (and #anchor) in README.md and docs/*.md resolves.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dvar_jax import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


@dataclasses.dataclass(frozen=True)
class How:
    """How a README command is tested.

    kind:
      "run"     `dvar ...` in-process, with `extra` appended (tiny settings; later flags win) and
                every `runs/...` path moved into a temporary folder, where runs/demo/{ar,diffusion}
                are copies of the tiny trained runs of tests/conftest.py;
      "parse"   `dvar ...` with the subcommand's action replaced by a check: the command line and
                every config override parse, the config validates, a --grid loads, --tasks
                names tasks (for commands that train for hours or need data we do not have);
      "help"    `dvar SUB --help`;
      "dry-run" launch/tpu_vm.sh with --dry-run (inserted before `--` if absent): every line
                printed is a command it would run;
      "make-n"  `make -n TARGET`, each `dvar` command in the recipe parse-checked;
      "venv"    the venv's activate script exists.
    expect: substrings the output must contain.
    """

    kind: str
    extra: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()


# The tiny settings of configs/tiny.py for `dvar train`, on the synthetic corpus of conftest.py.
TINY_TRAIN = (
    "--config.data.source=text", "--config.data.path={corpus}", "--config.data.cache_dir={cache}",
    "--config.data.vocab_size=400", "--config.data.validation_fraction=0.2",
    "--config.model.name=cpu-xs", "--config.data.unique_tokens=4000", "--config.data.epochs=1",
    "--config.data.seq_len=32", "--config.data.validation_tokens=1000",
    "--config.train.batch_size=8", "--config.eval.batch_size=8", "--config.eval.num_mc=2",
    "--progress=false",
)

# README command (or prefix; the longest matching prefix wins) -> how it is tested.
COMMANDS: dict[str, How] = {
    "make demo": How("make-n", expect=("dvar demo --workdir=runs/demo",)),
    "make test": How("make-n", expect=("ruff check .", "-m pytest")),
    "make grid-demo": How("make-n", expect=("dvar sweep run --grid=small", "dvar fit")),
    ". .venv/bin/activate": How("venv"),
    "dvar train --help": How("help"),
    # The demo config, made tiny: one epoch of cpu-xs on 4k tokens (about 10 s).
    "dvar train --config=configs/demo.py": How("run", TINY_TRAIN,
                                               expect=("diffusion: best validation loss",)),
    # The 140M model and the sharded run: the study's scale.
    "dvar train --config=dvar_jax/configs/base.py": How("parse"),
    "dvar eval --workdir=runs/demo/diffusion": How(
        "run", ("--num_mc=2", "--validation_tokens=256"), expect=("appended to",)),
    # Needs the 9 tasks' files (tests/test_downstream.py scores every task end to end).
    "dvar eval --workdir=runs/demo/ar --tasks=all": How("parse"),
    "dvar sample --workdir=runs/demo/ar": How("run", ("--num_samples=1", "--n_new=8"),
                                              expect=("--- sample 0 (ar",)),
    "dvar sample --workdir=runs/demo/diffusion": How(
        "run", ("--num_samples=1", "--n_new=8", "--steps=4"), expect=("--- sample 0 (diffusion",)),
    # The numbers the README quotes from it.
    "dvar plan --unique_tokens=100M --flops=1e20": How("run", expect=(
        "diffusion       1.01B     16.5B       165", "ar              1.19B       14B       140",
        "-> diffusion: predicted loss lower by 0.1088", "C_crit(100M) = 4.79e+19")),
    # AOT compilation of the 140M model for a TPU topology takes minutes
    # (tests/test_memory_plan.py compiles a small one).
    "dvar plan-memory": How("parse"),
    "dvar sweep list --grid=small": How("run", expect=("72 runs",)),
    # The totals the README's cost table quotes.
    "dvar sweep list --grid=paper --only=": How("run", expect=(
        "total: 55B tokens, 1.29e+20 FLOPs by 6ND (1.59e+20 with attention)",)),
    "dvar sweep list --grid=paper": How("run", expect=(
        "750 runs", "total: 8285B tokens, 2.24e+22 FLOPs by 6ND (2.65e+22 with attention)")),
    "dvar sweep list --grid=ablations/": How("run", expect=("runs",)),
    "dvar sweep run": How("parse"),  # trains a grid: an hour on CPU, months at the study's scale
    # Needs C4 and GPT-2's files (tests/test_prepare_cli.py and test_sources.py run prepare).
    "dvar prepare": How("parse"),
    "dvar fit": How("parse"),  # needs a sweep's results (tests/test_laws.py fits synthetic ones)
    "dvar curves": How("parse"),  # needs a sweep's runs
    "launch/tpu_vm.sh": How("dry-run"),
}


# ------------------------------------------------------------------------------------------
# Extracting the commands


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash fenced blocks of a markdown text."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def commands_of(block: str) -> list[list[str]]:
    """Shell words of each command in a bash block: backslash continuations joined, comments
    and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def readme_commands() -> list[str]:
    """Every README command, once each, in order, as its words joined by single spaces."""
    seen: dict[str, None] = {}
    for block in bash_blocks(README.read_text()):
        for words in commands_of(block):
            seen[" ".join(words)] = None
    return list(seen)


def how_for(command: str) -> tuple[str, How] | None:
    """The COMMANDS row of a command: its longest matching prefix (at a word boundary)."""
    rows = [(k, h) for k, h in COMMANDS.items()
            if command == k or command.startswith(k if k.endswith(("=", "/")) else k + " ")]
    return max(rows, key=lambda r: len(r[0])) if rows else None


# ------------------------------------------------------------------------------------------
# The mapping itself


def test_the_two_commands_come_first():
    first = bash_blocks(README.read_text())[0]
    assert [" ".join(w) for w in commands_of(first)] == ["make demo", "make test"]


def test_every_readme_command_is_mapped_and_every_row_is_used():
    commands = readme_commands()
    unmapped = [c for c in commands if how_for(c) is None]
    assert not unmapped, ("README commands with no row in tests/test_docs.py COMMANDS (add one "
                          f"saying how each is tested): {unmapped}")
    used = {how_for(c)[0] for c in commands}
    assert not set(COMMANDS) - used, f"COMMANDS rows no README command uses: " \
                                     f"{sorted(set(COMMANDS) - used)}"


def test_every_subcommand_appears_in_the_readme():
    """Each subcommand cli.py registers has a README command (or, for `demo`, run by `make demo`,
    is named in the text)."""
    commands = readme_commands()
    text = README.read_text()
    missing = [name for name in cli.SUBCOMMANDS
               if not any(c == f"dvar {name}" or c.startswith(f"dvar {name} ") for c in commands)
               and f"`dvar {name}`" not in text]
    assert not missing, f"subcommands the README does not show: {missing}"


# ------------------------------------------------------------------------------------------
# Running the commands


@functools.cache
def _load_grid(spec: str):
    from dvar_jax.sweep import load_grid

    return load_grid(spec)


def _checked(fv) -> int:
    """Stands in for a subcommand's action: checks what the action would use first."""
    if "config" in fv and "grid" not in fv:
        from dvar_jax.config import validate_config

        validate_config(fv.config)
    if "grid" in fv:
        _load_grid(fv.grid)
    if "tasks" in fv:
        from dvar_jax.eval.evaluate import parse_tasks

        parse_tasks(fv.tasks)
    return 0


def _dvar(argv: list[str], capsys, monkeypatch, *, parse_only: bool) -> str:
    """Runs `dvar ARGS` in-process; asserts exit status 0; returns stdout + stderr."""
    if parse_only:
        try:
            name, _ = cli._subcommand_name(["dvar", *argv])
        except cli.UsageError:
            name = None
        if name in cli.SUBCOMMANDS:
            monkeypatch.setitem(cli.SUBCOMMANDS, name,
                                dataclasses.replace(cli.SUBCOMMANDS[name], run=_checked))
    capsys.readouterr()
    rc = cli.main(["dvar", *argv])
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == 0, f"`dvar {' '.join(argv)}` exited {rc}:\n{text}"
    return text


def _in_tmp(words: list[str], tmp: Path) -> list[str]:
    """Every `runs/...` path moved under tmp (as tmp/runs/...)."""
    return [re.sub(r"(?<![\w/.])runs/", f"{tmp}/runs/", w) for w in words]


def _make_dvar_commands(recipe: str) -> list[list[str]]:
    """The `dvar` commands of a `make -n` recipe, cut at the first shell operator."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", recipe).splitlines():
        words = shlex.split(line)
        if words and words[0].endswith("/dvar"):
            ops = [i for i, w in enumerate(words) if w in (">", ">>", "|", "&&", ";", "<")]
            out.append(words[1:ops[0] if ops else None])
    return out


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, request, tmp_path, capsys, monkeypatch):
    mapped = how_for(command)
    assert mapped is not None, f"{command!r} has no row in COMMANDS"
    how = mapped[1]
    words = shlex.split(command)
    if how.kind == "venv":
        assert Path(sys.prefix, "bin", "activate").is_file()
        return
    if how.kind == "make-n":
        result = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for text in how.expect:
            assert text in result.stdout, f"{text!r} not in `make -n` output:\n{result.stdout}"
        for argv in _make_dvar_commands(result.stdout):
            _dvar(argv, capsys, monkeypatch, parse_only=True)
        return
    if how.kind == "dry-run":
        if "--dry-run" not in words:
            at = words.index("--") if "--" in words else len(words)
            words = [*words[:at], "--dry-run", *words[at:]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
        result = subprocess.run(["bash", *words], cwd=ROOT, capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines and all(line.startswith("+ ") for line in lines), result.stdout
        return
    assert words[0] == "dvar", f"kind {how.kind!r} is for dvar commands: {command!r}"
    if how.kind == "help":
        out = _dvar(words[1:], capsys, monkeypatch, parse_only=False)
        assert out.startswith(f"usage: {' '.join(w for w in words if w != '--help')}")
        return
    if how.kind == "parse":
        _dvar(words[1:], capsys, monkeypatch, parse_only=True)
        return
    assert how.kind == "run", how.kind
    if "runs/demo/" in command:  # the demo's runs: copies of the tiny trained runs
        trained = request.getfixturevalue("trained_runs")
        for objective, workdir in trained.items():
            shutil.copytree(workdir, tmp_path / "runs" / "demo" / objective)
    data = request.getfixturevalue("text_data_cfg") if any("{" in e for e in how.extra) else None
    extra = [e.format(corpus=data.path, cache=data.cache_dir) if data else e for e in how.extra]
    out = _dvar([*_in_tmp(words[1:], tmp_path), *extra], capsys, monkeypatch, parse_only=False)
    for text in how.expect:
        assert text in out, f"{text!r} not in the output of {command!r}:\n{out}"


# ------------------------------------------------------------------------------------------
# --help


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["dvar", "--help"]) == 0
    out = capsys.readouterr().out
    for name, sub in cli.SUBCOMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.MULTILINE), name
        assert sub.summary in out
    assert cli.main(["dvar", "sweep", "--help"]) == 0
    out = capsys.readouterr().out
    for name in (n for n in cli.SUBCOMMANDS if n.startswith("sweep ")):
        assert re.search(rf"^  {name.split()[1]} +\S", out, re.MULTILINE), name


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_subcommand_help_lists_every_option_with_a_default_and_a_description(name, capsys):
    from dvar_jax.config_reference import config_keys

    sub = cli.SUBCOMMANDS[name]
    assert cli.main(["dvar", *name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dvar {name} [--flags]\n\n{sub.summary}\n")
    lines = out.splitlines()
    flags = list(cli._flag_values([f"dvar {name}"], sub))
    assert flags, name
    for flag in flags:
        if flag == "config" and sub.overrides_help:
            assert f"  --config.KEY=VALUE: {sub.overrides_help} (default: none)" in lines
            continue
        found = [re.fullmatch(rf"  --{flag}: (.+) \(default: (.*)\)", line) for line in lines]
        found = [m for m in found if m]
        assert len(found) == 1, f"dvar {name} --help: no single line for --{flag}"
        description, default = found[0].groups()
        assert description.strip() and "\n" not in description, flag
        if flag != "progress":  # None there means "only on a terminal", said in its help
            assert default != "None", f"--{flag} shows no default"
    config_lines = [line for line in lines if line.startswith("  --config.")
                    and not line.startswith("  --config.KEY=VALUE")]
    if sub.default_config is None:
        assert not config_lines
        return
    # Each config key once, with the description docs/config.md gives it.
    by_key = {}
    for line in config_lines:
        m = re.fullmatch(r"  --config\.([\w.]+)=(.*?): (.*)", line)
        assert m, line
        by_key[m.group(1)] = m.group(3)
    keys = config_keys()
    assert list(by_key) == [k.key for k in keys]
    for k in keys:
        assert by_key[k.key] == (k.description or "(no description in base.py)"), k.key


# ------------------------------------------------------------------------------------------
# Links


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{page.name}: {bad}"


def test_docs_describe_every_objective_and_ablation_key():
    from dvar_jax.config_reference import config_keys
    from dvar_jax.objectives import OBJECTIVE_NAMES

    objectives = (ROOT / "docs" / "objectives.md").read_text()
    readme = README.read_text()
    for name in OBJECTIVE_NAMES:
        assert f'objective="{name}"' in objectives and f"`{name}`" in readme, name
    for k in config_keys():
        if k.section in ("ar", "block_diffusion"):
            assert f"`{k.key}" in objectives and f"`{k.key}" in readme, k.key
