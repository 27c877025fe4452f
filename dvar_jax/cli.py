"""The `dvar` command: `dvar SUBCOMMAND [--flags]`.

Each subcommand has its own flag set (absl flags + ml-collections config overrides), so
`dvar train --help` lists exactly what `train` accepts, and a wrong flag, config key or config
value is a clear error (exit status 2) before anything runs.
"""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict, config_flags

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class UsageError(Exception):
    """A bad command line: printed with the subcommand's name, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Subcommand:
    summary: str
    default_config: str
    workdir_default: str | None
    workdir_help: str
    run: Callable[[flags.FlagValues], int]


def _flag_values(argv: list[str], sub: Subcommand) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=str(CONFIGS_DIR / sub.default_config), flag_values=fv,
        lock_config=True, sys_argv=argv,
        help_string="Config file with get_config(); override fields with --config.KEY=VALUE.")
    flags.DEFINE_string("workdir", sub.workdir_default, sub.workdir_help, flag_values=fv)
    flags.DEFINE_boolean("progress", None, "Progress bar with ETA (default: only on a terminal).",
                         flag_values=fv)
    return fv


def _parse(argv: list[str], sub: Subcommand) -> flags.FlagValues:
    """The parsed flags of one subcommand, or UsageError naming the bad flag or config key."""
    try:
        fv = _flag_values(argv, sub)  # loading the config applies the --config.KEY overrides
        fv(argv)
        fv.config.keys()  # a config file that failed to load only says so when first touched
    except flags.Error as e:
        raise UsageError(str(e)) from e
    except (AttributeError, KeyError) as e:  # config_flags' way of saying "no such config key"
        key = str(e).strip("'\"")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        raise UsageError(f"unknown config key {bad[0] if bad else key!r} (no field {key!r}); "
                         "every key is listed by --help and in configs/base.py") from e
    except OSError as e:  # the config file could not be loaded
        raise UsageError(str(e).replace("config_config", "--config")) from e
    if not fv.workdir:
        raise UsageError("--workdir is required (the folder the run writes to)")
    return fv


def _config_lines(cfg: ConfigDict, prefix: str = "") -> list[str]:
    lines = []
    for key, value in cfg.items():
        if isinstance(value, ConfigDict):
            lines += _config_lines(value, f"{prefix}{key}.")
        else:
            lines.append(f"  --config.{prefix}{key}={value!r}")
    return lines


def _help(name: str, sub: Subcommand) -> str:
    fv = _flag_values([f"dvar {name}"], sub)
    fv([f"dvar {name}"])
    text = [f"usage: dvar {name} [--flags]", "", sub.summary, "", "flags:"]
    for flag in (fv["config"], fv["workdir"], fv["progress"]):
        default = flag.default if flag.name != "config" else f"configs/{sub.default_config}"
        text.append(f"  --{flag.name}: {flag.help} (default: {default})")
    text += ["", f"config keys and their defaults in configs/{sub.default_config}:"]
    return "\n".join(text + _config_lines(fv.config))


def _run_train(fv: flags.FlagValues) -> int:
    from dvar_jax.train import train  # heavy imports only once the command line is valid

    s = train(fv.config, fv.workdir, progress=fv.progress)
    print(f"{s.objective}: best validation loss {s.best_val_loss:.4f} at epoch "
          f"{s.best_epoch:.1f}; final {s.final_val_loss:.4f} ({s.steps} steps, "
          f"{s.tokens:,} tokens) -> {fv.workdir}")
    return 0


def _run_demo(fv: flags.FlagValues) -> int:
    from dvar_jax.demo import run_demo

    print(run_demo(fv.config, fv.workdir, progress=fv.progress))
    return 0


SUBCOMMANDS = {
    "train": Subcommand(
        "Train one model (objective ar or diffusion) as the config says.", "base.py", None,
        "Run folder for config.json, metrics.jsonl, summary.json and tb/ (required).",
        _run_train),
    "demo": Subcommand(
        "Train AR and diffusion models of one size on the same small unique-token budget for "
        "many epochs; write report.md and curves.png.", "demo.py", "runs/demo",
        "Folder for both runs, report.md and curves.png.", _run_demo),
}


def _usage() -> str:
    lines = ["usage: dvar SUBCOMMAND [--flags]    (dvar SUBCOMMAND --help lists its flags)", "",
             "subcommands:"]
    return "\n".join(lines + [f"  {n:<7} {s.summary}" for n, s in SUBCOMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name = argv[1]
    if name not in SUBCOMMANDS:
        print(f"dvar: unknown subcommand {name!r}; choose one of: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    sub = SUBCOMMANDS[name]
    sub_argv = [f"dvar {name}", *argv[2:]]
    if any(a in ("-h", "--help", "--helpfull") for a in sub_argv[1:]):
        print(_help(name, sub))
        return 0
    try:
        return sub.run(_parse(sub_argv, sub))
    except (UsageError, ValueError, OSError) as e:  # bad flags or config values, missing files
        print(f"dvar {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
