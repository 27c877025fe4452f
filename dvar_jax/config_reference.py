"""The configuration reference: every key of dvar_jax/configs/base.py, its type, its default and
its one-line description, read from base.py itself.

One source for `docs/config.md` and for the config-key lines of `dvar SUBCOMMAND --help`, so the
two never disagree. Defaults and types come from running `get_config()`; descriptions from the
comments of base.py's source:

- the comment lines directly above an assignment describe it, together with the comment at the
  end of its own line (if any);
- such a comment block also describes the keys assigned on the lines right after it (no blank
  line or comment line between) that have no end-of-line comment of their own: e.g. one comment
  above `c.mesh.data`, `c.mesh.fsdp` and `c.mesh.tensor` describes all three;
- a key with an end-of-line comment and no block above it is described by that comment alone.

Multi-line comments are joined into one line. A key that gets no description this way is
"undocumented": `undocumented_keys()` lists them and the tests require there be none.

    python -m dvar_jax.config_reference            # the markdown on stdout
    python -m dvar_jax.config_reference --write    # (re)write docs/config.md
    python -m dvar_jax.config_reference --check    # exit 1 if docs/config.md is not current
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "base.py"
DOC_PATH = ROOT / "docs" / "config.md"
GENERATOR = "python -m dvar_jax.config_reference --write"


@dataclasses.dataclass(frozen=True)
class ConfigKey:
    """One leaf of the config: dotted key, type name, default (as the config holds it), text."""

    key: str
    type_name: str
    default: Any
    description: str

    @property
    def section(self) -> str:
        """The key's top-level ConfigDict ("model", "data", ...), "" for top-level keys."""
        return self.key.rsplit(".", 1)[0] if "." in self.key else ""


def _comments(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """(full-line comments, end-of-line comments) of `source`, by 1-based line, without '#'."""
    full, inline = {}, {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (inline if line in code_lines else full)[line] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return full, inline


def _dotted(node: ast.expr) -> list[str] | None:
    """["c", "model", "name"] for the target `c.model.name`; None for other targets."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    return [node.id, *reversed(parts)]


def _targets(stmt: ast.stmt) -> list[ast.expr]:
    if isinstance(stmt, ast.Assign):
        targets = []
        for t in stmt.targets:
            targets += list(t.elts) if isinstance(t, ast.Tuple) else [t]
        return targets
    if isinstance(stmt, ast.AnnAssign):
        return [stmt.target]
    return []


def _is_configdict_call(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigDict"


def parse_descriptions(source: str, function: str = "get_config") -> dict[str, str]:
    """{dotted key: description} of every key assigned in `function` of a config file's source,
    in source order, by the rules of this module's docstring ("" where there is none).
    Assignments of `ConfigDict()` (sections) are not keys."""
    return _parse(source, function)[0]


def parse_sections(source: str, function: str = "get_config") -> dict[str, str]:
    """{section: description} of every `c.SECTION = ConfigDict()` in `function`: the comment
    lines directly above it and at the end of its line ("" where there are none)."""
    return _parse(source, function)[1]


def _parse(source: str, function: str) -> tuple[dict[str, str], dict[str, str]]:
    tree = ast.parse(source)
    body = next((n.body for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef) and n.name == function), None)
    if body is None:
        raise ValueError(f"no function {function}() in the config source")
    full, inline = _comments(source)
    keys: dict[str, str] = {}
    sections: dict[str, str] = {}
    group_block, prev_end = "", -1
    for stmt in body:
        targets = [p[1:] for p in map(_dotted, _targets(stmt)) if p is not None]
        if not targets:
            prev_end = -1  # other code ends a group
            continue
        block_lines = []
        line = stmt.lineno - 1
        while line in full:
            block_lines.insert(0, full[line])
            line -= 1
        block = " ".join(t for t in block_lines if t)
        own = " ".join(inline[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in inline)
        if _is_configdict_call(getattr(stmt, "value", None)):
            for target in targets:
                sections[".".join(target)] = " ".join(t for t in (block, own) if t)
            prev_end = -1  # a section header ends a group
            continue
        if block or stmt.lineno != prev_end + 1:  # a new group starts here
            group_block = block
            text = " ".join(t for t in (block, own) if t)
        else:  # the next line of a group: its own comment, else the group's block
            text = own or group_block
        for target in targets:
            keys[".".join(target)] = text
        prev_end = stmt.end_lineno
    return keys, sections


def _leaves(cfg: ConfigDict, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """{dotted key: (type name, value)} of every leaf, in the config's own order."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = (cfg.get_ref(key).get_type().__name__, value)
    return out


def config_keys(path: Path = BASE_CONFIG) -> list[ConfigKey]:
    """Every leaf key of the config file at `path` (default dvar_jax/configs/base.py), in source
    order (keys the source does not assign visibly come last, undocumented)."""
    descriptions = parse_descriptions(path.read_text())
    cfg = _load(path)
    leaves = _leaves(cfg)
    order = [k for k in descriptions if k in leaves] + [k for k in leaves if k not in descriptions]
    return [ConfigKey(k, leaves[k][0], leaves[k][1], descriptions.get(k, "")) for k in order]


def _load(path: Path) -> ConfigDict:
    """get_config() of the config file at `path` (the packaged module for
    dvar_jax/configs/base.py)."""
    if path.resolve() == BASE_CONFIG:
        from dvar_jax.configs.base import get_config

        return get_config()
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def descriptions() -> dict[str, str]:
    """{dotted key: one-line description} of dvar_jax/configs/base.py (for `dvar ... --help`)."""
    return {k.key: k.description for k in config_keys()}


def undocumented_keys() -> list[str]:
    """The keys of dvar_jax/configs/base.py with no description."""
    return [k.key for k in config_keys() if not k.description]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: Any) -> str:
    return f"`{_cell(repr(value))}`"


_SECTION_TITLES = {"": "Top level"}


def render_markdown(keys: list[ConfigKey] | None = None) -> str:
    """docs/config.md: one table per section (top level, model, data, ...), in base.py's order."""
    keys = config_keys() if keys is None else keys
    about = parse_sections(BASE_CONFIG.read_text())
    sections: dict[str, list[ConfigKey]] = {}
    for k in keys:
        sections.setdefault(k.section, []).append(k)
    lines = [
        f"<!-- Generated from dvar_jax/configs/base.py by `{GENERATOR}`; do not edit by hand. "
        "tests/test_config_reference.py checks that it is current. -->",
        "",
        "# Configuration reference",
        "",
        "Every key of [`dvar_jax/configs/base.py`](../dvar_jax/configs/base.py) with its type, "
        "its default and its description, taken from the comments in that file "
        "(`dvar train --help` prints the same descriptions). Override any key on the command "
        "line with `--config.KEY=VALUE`, "
        "e.g. `--config.data.epochs=50`; an unknown key, a value of the wrong type or an "
        "impossible value is an error before anything runs. Other config files "
        "(`configs/demo.py`, `configs/tiny.py`, the grids) start from these defaults and "
        "change some of them.",
        "",
        f"{len(keys)} keys in {len(sections)} sections: "
        + ", ".join(f"[{_SECTION_TITLES.get(s, s)}](#{_anchor(s)})" for s in sections) + ".",
    ]
    for section, members in sections.items():
        lines += ["", f"## {_SECTION_TITLES.get(section, f'`{section}`')}", ""]
        if about.get(section):
            lines += [about[section], ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in members:
            text = _cell(k.description) if k.description else "*(undocumented)*"
            lines.append(f"| `{k.key}` | {k.type_name} | {_default(k.default)} | {text} |")
    return "\n".join(lines) + "\n"


def _anchor(section: str) -> str:
    """GitHub's heading anchor of the section's heading."""
    return "top-level" if section == "" else section.replace(".", "")


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m dvar_jax.config_reference",
        description="Markdown reference of every key of dvar_jax/configs/base.py (docs/config.md).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC_PATH.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true",
                      help=f"exit 1 if {DOC_PATH.relative_to(ROOT)} differs from what would be "
                           "written")
    parser.add_argument("--output", type=Path, default=DOC_PATH,
                        help="file for --write/--check (default: docs/config.md)")
    args = parser.parse_args(argv)
    text = render_markdown()
    for key in undocumented_keys():
        print(f"warning: dvar_jax/configs/base.py: {key} has no comment describing it",
              file=sys.stderr)
    if args.write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        return 0
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is not current: run `{GENERATOR}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
