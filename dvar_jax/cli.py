"""The `dvar` command: `dvar SUBCOMMAND [--flags]`.

Each subcommand has its own flag set (absl flags + ml-collections config overrides), so
`dvar train --help` lists exactly what `train` accepts, and a wrong flag, config key or config
value is a clear error (exit status 2) before anything runs.
"""

import contextlib
import dataclasses
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict, config_flags

from dvar_jax import storage
from dvar_jax.scaling.planner import DEFAULT_LAW_SET

# The packaged defaults (dvar_jax/configs/): a command's default config file.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


class UsageError(Exception):
    """A bad command line: printed with the subcommand's name, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Subcommand:
    summary: str
    # The config file a run starts from; None for commands that read a trained run's own.
    default_config: str | None
    run: Callable[[flags.FlagValues], int]
    # (name, default, help) of the subcommand's own flags, typed by the default (str, bool,
    # int, float); a None default is a required string.
    options: tuple[tuple[str, str | bool | int | float | None, str], ...] = ()
    progress_flag: bool = True
    # Set for commands whose runs come from elsewhere (a grid): --config.KEY=VALUE overrides
    # are parsed against default_config and applied to every run; this is their help text.
    overrides_help: str | None = None
    # Also accept --flag-name for --flag_name (the spelling the issue and launcher use).
    dashed_flags: bool = False


_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string, type(None): flags.DEFINE_string}


def _flag_values(argv: list[str], sub: Subcommand) -> flags.FlagValues:
    fv = flags.FlagValues()
    if sub.default_config is not None:
        config_flags.DEFINE_config_file(
            "config", default=str(CONFIGS_DIR / sub.default_config), flag_values=fv,
            lock_config=True, sys_argv=argv,
            help_string="Config file with get_config(); override fields with "
                        "--config.KEY=VALUE.")
    for name, default, text in sub.options:
        _DEFINE[type(default)](name, default, text, flag_values=fv)
    if sub.progress_flag:
        flags.DEFINE_boolean("progress", None,
                             "Progress bar with ETA (default: only on a terminal).",
                             flag_values=fv)
    return fv


def _parse(argv: list[str], sub: Subcommand) -> flags.FlagValues:
    """The parsed flags of one subcommand, or UsageError naming the bad flag or config key."""
    try:
        fv = _flag_values(argv, sub)  # loading the config applies the --config.KEY overrides
        fv(argv)
        if sub.default_config is not None:
            fv.config.keys()  # a config file that failed to load only says so when touched
    except flags.Error as e:
        raise UsageError(_flag_error_message(str(e), argv, sub)) from e
    except (AttributeError, KeyError) as e:  # config_flags' way of saying "no such config key"
        key = str(e).strip("'\"")
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        raise UsageError(f"unknown config key {bad[0] if bad else key!r} (no field {key!r}); "
                         "every key is listed by --help and in dvar_jax/configs/base.py") from e
    except OSError as e:  # the config file could not be loaded; absl says so over lines
        given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                     f"dvar_jax/configs/{sub.default_config}")
        reason = str(e).strip().splitlines()[-1].strip()
        raise UsageError(f"--config={given!r} could not be loaded ({reason}); allowed: a "
                         "Python file defining get_config(), e.g. configs/tiny.py") from e
    for name, default, text in sub.options:
        if default is None and not fv[name].value:
            raise UsageError(f"--{name} is required ({text})")
    return fv


def _default_field(argv: list[str], sub: Subcommand, key: str) -> tuple[type, object]:
    """(type, default value) of config `key` (dotted) in the config file argv names."""
    bare = [argv[0], *(a for a in argv[1:] if a.startswith("--config="))]
    fv = _flag_values(bare, sub)
    fv(bare)
    *parents, leaf = key.split(".")
    node = fv.config
    for part in parents:
        node = node[part]
    # A placeholder (default None) still knows its type through its field reference.
    return node.get_ref(leaf).get_type(), node[leaf]


def _flag_error_message(message: str, argv: list[str], sub: Subcommand) -> str:
    """absl's message, with what is allowed: the flags listing for an unknown flag, the
    expected type and default for a config value that does not parse."""
    name = argv[0].split(" ", 1)[-1]
    if message.startswith("Unknown command line flag"):
        return f"{message}; `dvar {name} --help` lists the flags {name} accepts"
    bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", message, re.DOTALL)
    if bad_value:
        key, value, reason = bad_value.groups()
        try:
            kind, default = _default_field(argv, sub, key)
        except Exception:  # the message is still worth showing without the default
            return message
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        return (f"--config.{key}={value!r} is not {article} {kind.__name__} "
                f"({' '.join(reason.split())}); allowed: {article} {kind.__name__} "
                f"(default: {default!r})")
    return message


def _config_lines(cfg: ConfigDict) -> list[str]:
    """One line per config key: `--config.KEY=DEFAULT: description`, in configs/base.py's order,
    the descriptions from base.py's comments (the same as docs/config.md)."""
    from dvar_jax.config_reference import descriptions

    def leaves(node: ConfigDict, prefix: str = "") -> dict[str, object]:
        out = {}
        for key, value in node.items():
            if isinstance(value, ConfigDict):
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    values = leaves(cfg)
    about = descriptions()
    order = [k for k in about if k in values] + [k for k in values if k not in about]
    return [f"  --config.{k}={values[k]!r}: {about.get(k) or '(no description in base.py)'}"
            for k in order]


def _help(name: str, sub: Subcommand) -> str:
    """`dvar NAME --help`: every flag the subcommand registers with its help and default, then
    (for commands that start from a config file) every config key with its default and its
    description."""
    fv = _flag_values([f"dvar {name}"], sub)
    fv([f"dvar {name}"])
    text = [f"usage: dvar {name} [--flags]", "", sub.summary, "", "flags:"]
    for flag in (fv[n] for n in fv):  # every registered flag, in definition order
        if flag.name == "config" and sub.overrides_help:
            text.append(f"  --config.KEY=VALUE: {sub.overrides_help} (default: none)")
            continue
        help_text = flag.help.rstrip(".")
        if "(default:" in help_text:  # the help says what the default means (e.g. --progress)
            text.append(f"  --{flag.name}: {help_text}")
            continue
        default = (flag.default if flag.name != "config"
                   else f"dvar_jax/configs/{sub.default_config}")
        default = "required" if default is None else default
        text.append(f"  --{flag.name}: {help_text} (default: {default})")
    if sub.default_config is None:
        return "\n".join(text)
    text += ["", f"config keys (--config.KEY=VALUE), their defaults in "
                 f"dvar_jax/configs/{sub.default_config} and what they do (docs/config.md):"]
    return "\n".join(text + _config_lines(fv.config))


def _run_train(fv: flags.FlagValues) -> int:
    from dvar_jax.train import (
        NonFiniteError,
        train,  # heavy imports only once the command line is valid
    )

    try:
        s = train(fv.config, fv.workdir, progress=fv.progress, override=fv.override)
    except NonFiniteError as e:
        print(f"dvar train: {e}", file=sys.stderr)
        return 1
    if not s.completed:
        return 0  # preempted: the checkpoint is saved and the message printed
    print(f"{s.objective}: best validation loss {s.best_val_loss:.4f} at epoch "
          f"{s.best_epoch:.1f}; final {s.final_val_loss:.4f} ({s.steps} steps, "
          f"{s.tokens:,} tokens) -> {fv.workdir}")
    return 0


# Where each source's documents come from when --split is not given.
_DEFAULT_SPLIT = {"shakespeare": "train", "tfds": "train"}


def _run_prepare(fv: flags.FlagValues) -> int:
    from dvar_jax.data.corpus import SOURCE_KINDS, SourceSpec, check_source
    from dvar_jax.data.prepare import check_arguments

    if fv.source == "megatron":
        return _import_megatron(fv)
    if fv.source not in SOURCE_KINDS:
        raise UsageError(f"--source={fv.source!r}; allowed: {', '.join(SOURCE_KINDS)}, "
                         "megatron")
    split = fv.split or _DEFAULT_SPLIT.get(fv.source) or (
        "all" if fv.validation_fraction == 0 else "")
    if not split:
        raise UsageError(f"--validation_fraction={fv.validation_fraction} splits the text by "
                         "document: choose --split=train or --split=validation")
    source = SourceSpec(fv.source, split, path=fv.path, text_field=fv.text_field,
                        validation_fraction=fv.validation_fraction, tfds_name=fv.tfds_name,
                        tfds_data_dir=fv.tfds_data_dir)
    # Everything that can be refused is, before a tokenizer is trained or loaded.
    check_arguments(fv.out, fv.workers, fv.shard_chars)
    check_source(source)
    with contextlib.ExitStack() as stack:
        return _prepare_with(fv, source, stack)


def _prepare_command(fv: flags.FlagValues) -> str:
    """The `dvar prepare` line as given, recorded in the store so damage can name its repair."""
    given = [name for name, _, _ in SUBCOMMANDS["prepare"].options if fv[name].present]
    return shlex.join(["dvar", "prepare", *(f"--{n}={fv[n].value}" for n in given)])


def _import_megatron(fv: flags.FlagValues) -> int:
    from dvar_jax.data.megatron import import_megatron
    from dvar_jax.data.prepare import check_arguments
    from dvar_jax.data.tokenizer import open_tokenizer

    if not (fv.path and fv.tokenizer):
        raise UsageError("--source=megatron needs --path=PREFIX (of PREFIX.bin + PREFIX.idx) and "
                         "--tokenizer (the one the data was made with)")
    check_arguments(fv.out, fv.workers, fv.shard_chars)
    manifest = import_megatron(fv.path, open_tokenizer(fv.tokenizer, fv.eod_id), fv.out,
                               command=_prepare_command(fv))
    print(f"{fv.out}: {manifest['tokens']:,} tokens in {manifest['documents']:,} documents "
          f"(from {fv.path})")
    return 0


def _prepare_with(fv: flags.FlagValues, source, stack: contextlib.ExitStack) -> int:
    from dvar_jax.data.corpus import iter_documents
    from dvar_jax.data.prepare import prepare_store
    from dvar_jax.data.tokenizer import open_tokenizer, train_sentencepiece

    own = Path(fv.out).expanduser() / "tokenizer"
    if fv.tokenizer:
        tokenizer = open_tokenizer(fv.tokenizer, fv.eod_id)
    elif (own / "dvar_tokenizer.json").exists():  # a resumed prepare keeps its trained model
        tokenizer = open_tokenizer(str(own))
    else:
        print(f"training a SentencePiece {fv.tokenizer_type} tokenizer of {fv.vocab_size} ids "
              "on this split (give --tokenizer to use your own)", file=sys.stderr)
        # seqio reads the model file lazily: it lives until the store holds its own copy.
        scratch = stack.enter_context(tempfile.TemporaryDirectory())
        model = Path(scratch) / "trained.model"
        model.write_bytes(train_sentencepiece(iter_documents(source), fv.vocab_size,
                                              fv.tokenizer_type))
        tokenizer = open_tokenizer(str(model))
    manifest = prepare_store(source, tokenizer, fv.out, workers=fv.workers,
                             shard_chars=fv.shard_chars, command=_prepare_command(fv))
    print(f"{fv.out}: {manifest['tokens']:,} tokens in {manifest['documents']:,} documents, "
          f"{len(manifest['shards'])} shards; {tokenizer.description}")
    return 0


def _run_demo(fv: flags.FlagValues) -> int:
    from dvar_jax.demo import run_demo

    print(run_demo(fv.config, fv.workdir, progress=fv.progress))
    return 0


def _run_plan_memory(fv: flags.FlagValues) -> int:
    from dvar_jax.memory_plan import format_plan, plan_memory, tpu_devices
    from dvar_jax.run_dir import RunDir

    cfg = fv.config
    if fv.workdir:  # a trained run's own config, with this command line's --config.KEY changes
        if fv["config"].present:
            raise UsageError("--config=FILE and --workdir both name the config; give one")
        cfg = RunDir(fv.workdir).saved_config()
        cfg.update_from_flattened_dict(dict(config_flags.get_override_values(fv["config"])))
    if fv.mesh:
        try:
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in fv.mesh.split(","))
        except ValueError as e:
            raise UsageError(f"--mesh={fv.mesh!r}: expected DATA,FSDP,TENSOR, e.g. 1,4,1 "
                             "(one may be -1 = the remaining devices)") from e
    print(format_plan(plan_memory(cfg, tpu_devices(fv.topology)), cfg, fv.topology))
    return 0


def _run_eval(fv: flags.FlagValues) -> int:
    from dvar_jax.eval.evaluate import format_evaluation, parse_tasks, run_evaluation
    from dvar_jax.run_dir import RunDir

    record = run_evaluation(
        fv.workdir, checkpoint=fv.checkpoint, num_mc=fv.num_mc, batch_size=fv.batch_size,
        seed=fv.seed, validation_tokens=None if fv.validation_tokens < 0 else fv.validation_tokens,
        tasks=parse_tasks(fv.tasks), tasks_dir=fv.tasks_dir or None, source=fv.source,
        limit=fv.limit or None, diffusion_method=fv.diffusion_method)
    print(format_evaluation(record))
    print(f"appended to {RunDir(fv.workdir).evals_path}")
    return 0


def _run_sample(fv: flags.FlagValues) -> int:
    from dvar_jax.eval.loading import load_run
    from dvar_jax.eval.sampling import generate

    for name, low in (("num_samples", 1), ("n_new", 1), ("steps", 0), ("tokens_per_step", 0)):
        if fv[name].value < low:
            raise UsageError(f"--{name}={fv[name].value}: must be >= {low}")
    run = load_run(fv.workdir, fv.checkpoint)
    texts = generate(run.model, run.tokenizer, [fv.prompt] * fv.num_samples,
                     objective=run.objective, n_new=fv.n_new, seed=fv.seed,
                     seq_len=run.cfg.data.seq_len, temperature=fv.temperature, top_k=fv.top_k,
                     top_p=fv.top_p, steps=fv.steps or None, method=fv.method,
                     tokens_per_step=fv.tokens_per_step or None)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({run.objective.name}, step {run.step}, seed {fv.seed})")
        print(fv.prompt + text)
    return 0


def _grid_overrides(fv: flags.FlagValues) -> dict:
    """The --config.KEY=VALUE overrides of a grid command (typed as configs/base.py types
    them); --config=FILE itself means nothing there, runs come from --grid."""
    if fv["config"].present:
        raise UsageError("--config=FILE does not apply here: the runs' configs come from --grid; "
                         "change their keys with --config.KEY=VALUE")
    return dict(config_flags.get_override_values(fv["config"]))


def _run_sweep_list(fv: flags.FlagValues) -> int:
    from dvar_jax.sweep import format_runs, load_grid, select, with_overrides

    grid = load_grid(fv.grid)
    print(format_runs(grid, with_overrides(select(grid, fv.only), _grid_overrides(fv))))
    return 0


def _run_sweep_run(fv: flags.FlagValues) -> int:
    from dvar_jax.sweep import load_grid, run_sweep

    grid = load_grid(fv.grid)
    result = run_sweep(grid, fv.workdir, results=fv.results or None,
                       emit_commands=fv.emit_commands, only=fv.only or None,
                       override_config=_grid_overrides(fv), progress=fv.progress,
                       log=lambda line: print(line, flush=True))
    if result.commands is not None:
        print("\n".join(result.commands))
        return 0
    print(f"sweep {grid.label}: {len(result.trained)} trained, {len(result.skipped)} already "
          f"done, {len(result.recorded)} records appended, {len(result.failed)} failed"
          + (f" ({', '.join(result.failed)})" if result.failed else "")
          + (f", {len(result.busy)} held by other workers" if result.busy else ""))
    return 1 if result.failed else 0


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def _amount(name: str, text: str) -> float:
    """A positive number from a flag: 1e20, 100_000_000, or with a suffix k, M, B, T (100M)."""
    value = text.strip().replace("_", "")
    scale = _SUFFIXES.get(value[-1:].lower(), 1.0) if value else 1.0
    try:
        number = float(value[:-1] if scale != 1.0 else value) * scale
    except ValueError:
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise UsageError(f"--{name}={text!r} is not a positive number; allowed: e.g. 100M, 1e8, "
                         "100_000_000 (suffixes k, M, B, T)")
    return number


def _results_file(text: str) -> Path:
    path = storage.path(text)
    if not path.is_file():
        raise UsageError(f"--results={text!r}: no such file; allowed: a results file written by "
                         "dvar sweep run (WORKDIR/results.jsonl)")
    return path


_LOSS_KEYS = ("best_val_loss", "final_val_loss")


def _run_fit(fv: flags.FlagValues) -> int:
    if fv.bootstrap < 0:
        raise UsageError(f"--bootstrap={fv.bootstrap}: must be >= 0 (0 = no intervals)")
    if fv.loss_key not in _LOSS_KEYS:
        raise UsageError(f"--loss_key={fv.loss_key!r}: allowed {', '.join(_LOSS_KEYS)}")
    from dvar_jax.results import read_records

    path = _results_file(fv.results)
    records = read_records(path)
    if not records:
        raise UsageError(f"--results={fv.results!r} holds no records; run dvar sweep run first")
    from dvar_jax.scaling.laws import fit_laws, format_fits

    fits = fit_laws(records, loss_key=fv.loss_key, tie_alpha_beta=fv.tie_alpha_beta,
                    bootstrap=fv.bootstrap, seed=fv.seed)
    print(format_fits(fits))
    if fv.plots:
        from dvar_jax.scaling.plots import write_plots

        for plot in write_plots(records, fits, Path(fv.plots)):
            print(f"wrote {plot}")
    return 0


def _run_curves(fv: flags.FlagValues) -> int:
    from dvar_jax.curves import format_curves, plot_curves, read_curves

    try:
        curves = read_curves(fv.workdir, fv.only)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(format_curves(curves))
    out = storage.path(fv.out) if fv.out else storage.path(fv.workdir) / "curves.png"
    print(f"wrote {plot_curves(curves, out, title=storage.path(fv.workdir).name)}")
    return 0


def _run_plan(fv: flags.FlagValues) -> int:
    unique_tokens = _amount("unique_tokens", fv.unique_tokens)
    flops = _amount("flops", fv.flops)
    if fv.results and fv["laws"].present:
        raise UsageError(f"--laws={fv.laws!r} and --results={fv.results!r} exclude each other: "
                         "give a published law set or your own results, not both")
    from dvar_jax.scaling.planner import LAW_SETS, format_plan, load_laws, plan

    if fv.results:
        spec = str(_results_file(fv.results))
    elif fv.laws in LAW_SETS or Path(fv.laws).is_file():
        spec = fv.laws
    else:
        raise UsageError(f"--laws={fv.laws!r} is not a known law set; allowed: "
                         f"{', '.join(LAW_SETS)}, or --results=PATH to fit your own")
    print(format_plan(plan(load_laws(spec), unique_tokens, flops)))
    return 0


_GRID_FLAG = ("grid", None, "a grid: small, paper, ablations/NAME or ablations/NAME-cpu "
                            "(NAME: attention_dropout, token_masking, orderings, "
                            "block_diffusion), or a path to a .py file defining get_grid()")
_ONLY_FLAG = ("only", "", "comma-separated run names or shell patterns, e.g. 'ar-*-U100M-*' "
                          "(empty = every run)")
_OVERRIDES_HELP = ("override a config key of every run, e.g. --config.data.path=DIR (keys and "
                   "types as configs/base.py)")

_CHECKPOINT_FLAG = ("checkpoint", "best", "best (lowest validation loss), latest, or a step")

SUBCOMMANDS = {
    "train": Subcommand(
        "Train one model (objective ar, diffusion or block_diffusion; AR ablations via ar.*) "
        "as the config says.", "base.py",
        _run_train, (("workdir", None,
                      "run folder for config.json, metrics.jsonl, summary.json, tb/ and "
                      "checkpoints/; an existing one is resumed"),
                     ("override", False, "continue a workdir whose saved config differs in "
                                         "run-defining keys"))),
    "prepare": Subcommand(
        "Tokenize one split of a corpus (the embedded Shakespeare, your text or C4's JSON files, "
        "or a prepared TFDS dataset) into a sharded token store that training reads.", None,
        _run_prepare,
        (("source", None, "shakespeare, text (a folder, file or glob of .txt / .jsonl / "
                          ".jsonl.gz / .json.gz), tfds (a prepared TFDS dataset), or megatron "
                          "(an already tokenized PREFIX.bin + PREFIX.idx, e.g. the study's)"),
         ("out", None, "the store's folder (local); an unfinished one is resumed"),
         ("split", "", "shakespeare: train|validation; text: all|train|validation (the hash "
                       "split by --validation_fraction); tfds: a split, e.g. validation"),
         ("path", "", "text: folder, file or glob, e.g. 'c4/en/c4-train.*-of-01024.json.gz'; "
                      "megatron: PREFIX"),
         ("text_field", "text", "the JSON / TFDS field holding the text"),
         ("validation_fraction", 0.0, "text: share of documents (by name hash) in validation"),
         ("tfds_name", "", "tfds: the dataset, e.g. c4/en:3.1.0 (never downloaded)"),
         ("tfds_data_dir", "", "tfds: its data_dir, local or gs://"),
         ("tokenizer", "", "a SentencePiece .model, a tokenizer.json, a folder with GPT-2's "
                           "vocab.json + merges.txt, or another store's tokenizer/ folder; "
                           "empty = train a SentencePiece model on this split"),
         ("eod_id", -1, "end-of-document id of a BPE tokenizer (-1 = its <|endoftext|>)"),
         ("vocab_size", 4096, "ids of the SentencePiece model trained when --tokenizer is empty"),
         ("tokenizer_type", "unigram", "unigram or bpe: the SentencePiece model trained"),
         ("workers", 0, "tokenizing processes (0 = all cores)"),
         ("shard_chars", 1 << 24, "characters of whole documents per shard")),
        progress_flag=False, dashed_flags=True),
    "demo": Subcommand(
        "Train AR and diffusion models of one size on the same small unique-token budget for "
        "many epochs; write report.md and curves.png.", "demo.py", _run_demo,
        (("workdir", "runs/demo", "folder for both runs, report.md and curves.png"),)),
    "plan-memory": Subcommand(
        "Compile the train step ahead of time for a TPU topology (no TPU needed; extra `tpu`) "
        "and print per-device memory, compiled cost and a roofline step time.", "base.py",
        _run_plan_memory,
        (("topology", None, "TPU topology name, e.g. v5p:2x2x1, v5e:2x4, v4:2x2x1"),
         ("mesh", "", "DATA,FSDP,TENSOR mesh over the topology's devices (default: "
                      "config.mesh)"),
         ("workdir", "", "a trained run's folder: plan its saved config instead of --config")),
        progress_flag=False),
    "eval": Subcommand(
        "Evaluate a trained run's checkpoint: validation loss (diffusion: ELBO with num_mc "
        "draws and its standard error), bits per byte, downstream tasks; appended to "
        "WORKDIR/eval.jsonl.", None, _run_eval,
        (("workdir", None, "a trained run's folder"), _CHECKPOINT_FLAG,
         ("num_mc", 32, "diffusion: mask draws per sequence / per choice (the study: 32)"),
         ("batch_size", 16, "sequences per model call"),
         ("seed", 0, "seed of the mask draws (the same seed draws the same masks)"),
         ("validation_tokens", -1, "validation tokens used: -1 = the run's own setting, "
                                   "0 = the whole validation stream"),
         ("tasks", "none", "downstream tasks: none, all, or a comma-separated list of "
                           "arc_easy, boolq, copa, hellaswag, piqa, race, winogrande, sciq, "
                           "lambada_standard"),
         ("tasks_dir", "", "folder of <task>.jsonl files (Hugging Face fields), or TFDS "
                           "data_dir with --source=tfds"),
         ("source", "jsonl", "where tasks come from: jsonl or tfds (already prepared only)"),
         ("limit", 0, "documents per task (0 = all)"),
         ("diffusion_method", "mc", "diffusion likelihood: mc (the study's estimator) or "
                                    "chain_rule")), progress_flag=False),
    "sample": Subcommand(
        "Generate text from a trained run: AR (temperature, top-k, top-p) or diffusion "
        "(ancestral over S steps, or confidence-ordered unmasking).", None, _run_sample,
        (("workdir", None, "a trained run's folder"), _CHECKPOINT_FLAG,
         ("prompt", "", "text to continue (empty = a document start)"),
         ("num_samples", 4, "samples generated in one batch"),
         ("n_new", 64, "tokens to generate (prompt + n_new <= the run's data.seq_len)"),
         ("seed", 0, "random seed: the same seed gives the same text"),
         ("temperature", 1.0, "softmax temperature; 0 = greedy"),
         ("top_k", 0, "AR: sample among the k most likely tokens (0 = all)"),
         ("top_p", 1.0, "AR: nucleus sampling mass in (0, 1] (1 = all)"),
         ("method", "ancestral", "diffusion: ancestral or confidence"),
         ("steps", 0, "diffusion: denoising steps (0 = n_new)"),
         ("tokens_per_step", 0, "diffusion confidence: tokens committed per step "
                                "(0 = n_new / steps)")), progress_flag=False),
    "sweep list": Subcommand(
        "Print a grid's runs: objective, N, unique tokens, epochs, steps, tokens, FLOPs (6ND and "
        "with attention), totals, and a CPU time estimate for CPU-sized grids.", "base.py",
        _run_sweep_list, (_GRID_FLAG, _ONLY_FLAG), progress_flag=False,
        overrides_help=_OVERRIDES_HELP, dashed_flags=True),
    "sweep run": Subcommand(
        "Train a grid's runs one after another in WORKDIR/NAME: skip finished ones, resume "
        "interrupted ones, append one record per finished run to the results file.", "base.py",
        _run_sweep_run,
        (_GRID_FLAG, ("workdir", None, "folder holding one run folder per run name"),
         _ONLY_FLAG,
         ("results", "", "results file the records are appended to; empty = "
                         "WORKDIR/results.jsonl"),
         ("emit_commands", False, "train nothing: print one `dvar sweep run --only=NAME` line "
                                  "per run not done yet, for a launcher (launch/tpu_vm.sh sweep)")),
        overrides_help=_OVERRIDES_HELP, dashed_flags=True),
    "fit": Subcommand(
        "Fit the data-constrained scaling laws (PAPER.md §7) per objective to a results file; "
        "print the constants, R^2 and Huber loss; optionally write the plots.", None, _run_fit,
        (("results", None, "results file written by dvar sweep run"),
         ("plots", "", "folder to write the PNG plots into (empty = no plots)"),
         ("bootstrap", 0, "bootstrap resamples over runs for 95% intervals (0 = none)"),
         ("tie_alpha_beta", False, "fit one exponent for N and D (alpha = beta), as Muennighoff"),
         ("loss_key", "best_val_loss", "the loss fitted: best_val_loss or final_val_loss"),
         ("seed", 0, "seed of the bootstrap resamples")), progress_flag=False, dashed_flags=True),
    "curves": Subcommand(
        "Plot validation loss against epochs for every run of a sweep folder (the study's "
        "ablation figures) and print each run's best and last validation loss.", None,
        _run_curves,
        (("workdir", None, "a sweep folder of run folders (dvar sweep run --workdir=...)"),
         ("out", "", "PNG to write (empty = WORKDIR/curves.png)"),
         _ONLY_FLAG), progress_flag=False, dashed_flags=True),
    "plan": Subcommand(
        "AR or diffusion? For U unique tokens and C FLOPs: the objective with the lower predicted "
        "loss, its model size and epochs, both predicted losses, and C_crit(U).", None, _run_plan,
        (("unique_tokens", None, "unique tokens U you have, e.g. 100M or 1e8"),
         ("flops", None, "training compute C in FLOPs, e.g. 1e20"),
         ("laws", DEFAULT_LAW_SET, "a named law set (the study's published constants)"),
         ("results", "", "fit the laws to this results file instead of --laws")),
        progress_flag=False, dashed_flags=True),
}


def _usage() -> str:
    lines = ["usage: dvar SUBCOMMAND [--flags]    (dvar SUBCOMMAND --help lists its flags)", "",
             "subcommands:"]
    return "\n".join(lines + [f"  {n:<12} {s.summary}" for n, s in SUBCOMMANDS.items()])


def _subcommand_name(argv: list[str]) -> tuple[str, list[str]]:
    """("sweep run", rest) for `dvar sweep run ...`: absl has no sub-subcommands, so the
    action word is taken here. UsageError for `dvar sweep` without a known action."""
    if argv[1] != "sweep":
        return argv[1], argv[2:]
    actions = [n.split()[1] for n in SUBCOMMANDS if n.startswith("sweep ")]
    action = argv[2] if len(argv) > 2 else ""
    if not action or action.startswith("-"):
        raise UsageError(f"choose an action: {' or '.join(actions)} (`dvar sweep ACTION --help`)")
    if f"sweep {action}" not in SUBCOMMANDS:
        raise UsageError(f"unknown action {action!r}; choose one of: {', '.join(actions)}")
    return f"sweep {action}", argv[3:]


def _underscored(args: list[str]) -> list[str]:
    """--emit-commands -> --emit_commands (flag names only; values and --config.KEYs stay)."""
    out = []
    for a in args:
        if a.startswith("--") and not a.startswith("--config"):
            flag, sep, value = a.partition("=")
            a = "--" + flag[2:].replace("-", "_") + sep + value
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[1:3] in (["sweep", "-h"], ["sweep", "--help"], ["sweep", "help"]):
        print("\n".join(["usage: dvar sweep ACTION [--flags]    (dvar sweep ACTION --help lists "
                         "its flags)", "", "actions:"]
                        + [f"  {n[6:]:<6} {s.summary}" for n, s in SUBCOMMANDS.items()
                           if n.startswith("sweep ")]))
        return 0
    if argv[1] not in SUBCOMMANDS and argv[1] != "sweep":
        print(f"dvar: unknown subcommand {argv[1]!r}; choose one of: {', '.join(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    try:
        name, rest = _subcommand_name(argv)
    except UsageError as e:
        print(f"dvar sweep: {e}", file=sys.stderr)
        return 2
    sub = SUBCOMMANDS[name]
    sub_argv = [f"dvar {name}", *(_underscored(rest) if sub.dashed_flags else rest)]
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
