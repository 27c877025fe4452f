"""Bad input, one case at a time: each is a clear one-line error naming the bad value and what is
allowed, and nothing is written or lost (issue #5, point 6). This file is the checklist; some
cases are also tested closer to their code (test_cli, test_config, test_corpus, test_pipeline,
test_tokenizer, test_checkpoint).

Most cases go through the command line (`dvar_jax.cli.main`, exit status 2, the message on
stderr) with a fresh workdir that must not exist afterwards. The cases about an existing run
(a changed config, another model size, a damaged metrics log, a read-only workdir) copy one
finished tiny run and check that every file of the copy is byte for byte what it was.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from dvar_jax.cli import main
from dvar_jax.run_dir import RunDir, read_metrics

# A tiny run on the synthetic text corpus: 7 steps of cpu-xs.
TINY = ["--config.data.source=text", "--config.data.vocab_size=400",
        "--config.model.name=cpu-xs", "--config.model.attention_dropout=0.0",
        "--config.model.hidden_dropout=0.0", "--config.data.unique_tokens=2000",
        "--config.data.seq_len=32", "--config.data.epochs=1",
        "--config.data.validation_tokens=500", "--config.train.batch_size=8",
        "--config.eval.batch_size=8", "--progress=false"]


def _digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root, but run.lock: a refused run may hold
    the folder for a moment, which writes its host and pid there."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.lock"}


def _error_line(argv: list[str], capsys) -> str:
    """Runs `dvar ARGV`, asserts exit status 2 and returns its one error line."""
    capsys.readouterr()
    assert main(["dvar", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dvar")]
    assert len(lines) == 1, err
    # One line: nothing of the message continues below it.
    assert err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, text_corpus_dir) -> dict[str, Path]:
    """Corpus folders (good, empty, only empty files, one non-UTF-8 file), a shared cache."""
    root = tmp_path_factory.mktemp("bad_input")
    out = {"corpus": text_corpus_dir, "cache": root / "cache", "empty": root / "empty",
           "blank": root / "blank", "latin1": root / "latin1", "afile": root / "a_file.txt"}
    out["empty"].mkdir()
    out["blank"].mkdir()
    (out["blank"] / "a.txt").write_text("")
    (out["blank"] / "b.txt").write_text("")
    shutil.copytree(text_corpus_dir, out["latin1"])
    (out["latin1"] / "bad.txt").write_bytes(b"good start\nthen caf\xe9 in Latin-1\n")
    out["afile"].write_text("not a folder")
    return out


def _text(paths, corpus="corpus") -> list[str]:
    return [f"--config.data.path={paths[corpus]}", f"--config.data.cache_dir={paths['cache']}",
            *TINY]


# (id, argv (W = a fresh workdir; other {names} from `paths`), what the message must say)
CASES = [
    ("dvar --bogus", ["--bogus"],
     ["unknown subcommand '--bogus'", "choose one of: train, prepare, demo, plan-memory"]),
    ("train --bogus", ["train", "--workdir=W", "--bogus=1"],
     ["Unknown command line flag 'bogus'", "`dvar train --help` lists the flags"]),
    ("demo --bogus", ["demo", "--workdir=W", "--bogus"],
     ["Unknown command line flag 'bogus'", "`dvar demo --help` lists the flags"]),
    ("plan-memory --bogus", ["plan-memory", "--topology=v5p:2x2x1", "--bogus"],
     ["Unknown command line flag 'bogus'", "`dvar plan-memory --help` lists the flags"]),
    ("unknown config key", ["train", "--workdir=W", "--config.data.nosuch=1"],
     ["unknown config key '--config.data.nosuch'", "every key is listed by --help"]),
    ("wrong type int", ["train", "--workdir=W", "--config.data.seq_len=long"],
     ["--config.data.seq_len='long' is not an int", "allowed: an int (default: 128)"]),
    ("wrong type float", ["train", "--workdir=W", "--config.train.peak_lr=fast"],
     ["--config.train.peak_lr='fast' is not a float", "allowed: a float (default: 0.0002)"]),
    ("wrong type bool", ["train", "--workdir=W", "--config.train.skip_nonfinite=maybe"],
     ["--config.train.skip_nonfinite='maybe' is not a bool", "allowed: a bool"]),
    ("unknown objective", ["train", "--workdir=W", "--config.objective=gan"],
     ["objective='gan': allowed ar, diffusion"]),
    ("unknown model size", ["train", "--workdir=W", "--config.model.name=999M"],
     ["model.name='999M' is not a known size", "choose one of 7M", "'custom'"]),
    ("zero batch size", ["train", "--workdir=W", "--config.train.batch_size=0"],
     ["train.batch_size=0: must be >= 1"]),
    ("negative seq_len", ["train", "--workdir=W", "--config.data.seq_len=-4"],
     ["data.seq_len=-4: must be >= 2"]),
    ("negative unique_tokens", ["train", "--workdir=W", "--config.data.unique_tokens=-1"],
     ["data.unique_tokens=-1: must be >= 2"]),
    ("zero eval batch", ["train", "--workdir=W", "--config.eval.batch_size=0"],
     ["eval.batch_size=0: must be >= 1"]),
    ("zero d_model", ["train", "--workdir=W", "--config.model.name=custom",
                      "--config.model.d_model=0", "--config.model.n_layers=2",
                      "--config.model.n_heads=2"],
     ["model.d_model=0: must be >= 1"]),
    ("heads not dividing d_model", ["train", "--workdir=W", "--config.model.name=custom",
                                    "--config.model.d_model=64", "--config.model.n_layers=2",
                                    "--config.model.n_heads=3"],
     ["model.n_heads=3 does not divide model.d_model=64",
      "allowed n_heads dividing d_model (e.g. 2, 4)", "model.head_dim"]),
    ("zero epochs", ["train", "--workdir=W", "--config.data.epochs=0"],
     ["data.epochs=0.0: must be > 0"]),
    ("negative epochs", ["train", "--workdir=W", "--config.data.epochs=-2"],
     ["data.epochs=-2.0: must be > 0"]),
    ("mesh not matching the devices", ["train", "--workdir=W", "--config.mesh.data=3",
                                       "--config.mesh.fsdp=5"],
     ["mesh.data=3, mesh.fsdp=5, mesh.tensor=1: the product 15 does not match the",
      "use -1 on one axis to fill"]),
    ("missing --workdir", ["train", "--config.objective=ar"], ["--workdir is required"]),
    ("missing config file", ["train", "--workdir=W", "--config=no/such/config.py"],
     ["--config='no/such/config.py' could not be loaded (", "No such file or directory",
      "allowed: a Python file defining get_config()"]),
    ("workdir is a file", ["train", "--workdir={afile}", "--config.model.name=cpu-xs"],
     ["a_file.txt' is a file, not a folder", "give a folder"]),
    ("data.path missing", ["train", "--workdir=W", "--config.data.source=text",
                           "--config.data.path=/no/such/dir"],
     ["data.path='/no/such/dir' does not exist"]),
    ("empty corpus folder", ["train", "--workdir=W", "TEXT:empty"],
     ["empty' holds no .txt or .jsonl files"]),
    ("only empty documents", ["train", "--workdir=W", "TEXT:blank"],
     ["holds no documents that are not empty"]),
    ("non-UTF-8 file", ["train", "--workdir=W", "TEXT:latin1"],
     ["bad.txt is not UTF-8 text: byte 0xe9 at offset 19 (line 2)",
      "data.path may only hold UTF-8 text files"]),
    ("missing tokenizer file", ["train", "--workdir=W", "TEXT:corpus",
                                "--config.data.tokenizer_path=/no/such/sp.model"],
     ["data.tokenizer_path='/no/such/sp.model': tokenizer '/no/such/sp.model' does not exist",
      "allowed: a SentencePiece .model file"]),
    ("vocabulary the tokenizer cannot reach", ["train", "--workdir=W", "TEXT:corpus",
                                               "--config.data.vocab_size=100000"],
     ["data.vocab_size=100000 on ", "is more than a unigram tokenizer can reach: allowed at "
      "most "]),
    ("seq_len beyond the corpus", ["train", "--workdir=W", "TEXT:corpus",
                                   "--config.data.seq_len=10000000"],
     ["data.seq_len=10000000 needs windows of 10000001 tokens, but the train stream has only",
      "allowed: data.seq_len <= "]),
    ("U beyond the corpus", ["train", "--workdir=W", "TEXT:corpus",
                             "--config.data.unique_tokens=10000000"],
     ["data.unique_tokens=10,000,000 exceeds the", "allowed: at most"]),
    ("U below one window", ["train", "--workdir=W", "TEXT:corpus",
                            "--config.data.unique_tokens=20"],
     ["data.unique_tokens=20 is less than one window of data.seq_len + 1 = 33 tokens",
      "allowed: at least 33"]),
    ("plan-memory bad --mesh", ["plan-memory", "--topology=v5p:2x2x1", "--mesh=1,x"],
     ["--mesh='1,x': expected DATA,FSDP,TENSOR"]),
    ("curves --bogus", ["curves", "--workdir=W", "--bogus=1"],
     ["Unknown command line flag 'bogus'", "`dvar curves --help` lists the flags"]),
    ("curves on a missing folder", ["curves", "--workdir=/no/such/sweep"],
     ["--workdir='/no/such/sweep' is not a folder; allowed: a sweep folder"]),
    ("curves on a folder without runs", ["curves", "--workdir={empty}"],
     ["no run folder with a validation loss in its metrics.jsonl yet"]),
    ("unknown ablation grid", ["sweep", "list", "--grid=ablations/nosuch"],
     ["--grid='ablations/nosuch' is not a known grid; allowed: ", "ablations/orderings-cpu"]),
    ("token-masking ratio above 1", ["train", "--workdir=W", "--config.ar.randmask_ratio=2"],
     ["ar.randmask_ratio=2.0: must be in [0, 1]"]),
    ("zero orders", ["train", "--workdir=W", "--config.ar.num_orders=0"],
     ["ar.num_orders=0: must be >= 1 (1 = left to right)"]),
    ("unknown order kind", ["train", "--workdir=W", "--config.ar.order_kind=zigzag"],
     ["ar.order_kind='zigzag': allowed local, random"]),
    ("AR option on diffusion", ["train", "--workdir=W", "--config.objective=diffusion",
                                "--config.ar.num_orders=4"],
     ["ar.num_orders set with objective='diffusion'"]),
    ("block not dividing seq_len", ["train", "--workdir=W", "--config.objective=block_diffusion",
                                    "--config.block_diffusion.block_size=5"],
     ["block_diffusion.block_size=5: must be >= 1 and divide data.seq_len=128"]),
]


def _expand(argv: list[str], paths, workdir: Path) -> list[str]:
    out = []
    for arg in argv:
        if arg.startswith("TEXT:"):  # the tiny text-corpus settings on one of the corpora
            out += _text(paths, arg.split(":", 1)[1])
        else:
            out.append(arg.replace("=W", f"={workdir}").format(**paths))
    # The flags after TEXT: override its defaults (absl: the last value wins).
    return out


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(argv, expected, paths, tmp_path,
                                                        capsys):
    workdir = tmp_path / "run"
    corpus_before = _digest(paths["corpus"])
    line = _error_line(_expand(argv, paths, workdir), capsys)
    for text in expected:
        assert text in line, line
    assert not workdir.exists()  # not even created
    assert _digest(paths["corpus"]) == corpus_before
    assert paths["afile"].read_text() == "not a folder"


# --- cases about an existing run -----------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, paths) -> Path:
    """A finished tiny run trained on the corpus plus one empty file: the empty document is
    skipped with a warning naming it, and the run proceeds."""
    corpus = tmp_path_factory.mktemp("with_empty")
    shutil.copytree(paths["corpus"], corpus, dirs_exist_ok=True)
    (corpus / "nothing.txt").write_text("")
    paths["with_empty"] = corpus
    run = tmp_path_factory.mktemp("finished") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["dvar", "train", f"--workdir={run}", *_text(paths, "with_empty")])
    assert rc == 0, err.getvalue()[-3000:]
    warnings = [line for line in err.getvalue().splitlines() if "empty document" in line]
    assert warnings == [f"warning: data.path={str(corpus)!r}: skipping 1 empty document: "
                        "nothing.txt"]
    assert (run / "summary.json").exists()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_empty_file_among_good_ones_is_skipped_with_a_warning(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["completed"]


def test_changed_config_is_refused_listing_the_keys(run_copy, paths, capsys):
    before = _digest(run_copy)
    line = _error_line(["train", f"--workdir={run_copy}", *_text(paths, "with_empty"),
                        "--config.seed=7", "--config.data.seq_len=16"], capsys)
    assert "holds a run with a different config: data.seq_len, seed differ" in line
    assert "pass --override to continue it anyway, or use another workdir" in line
    assert _digest(run_copy) == before


def test_checkpoint_of_another_model_size_is_an_error_and_kept(run_copy, paths, capsys):
    before = _digest(run_copy)
    line = _error_line(["train", f"--workdir={run_copy}", *_text(paths, "with_empty"),
                        "--config.model.name=cpu-s", "--override"], capsys)
    assert f"checkpoint {run_copy / 'checkpoints'}" in line and "holds another model: " in line
    # cpu-xs has d_model 64, cpu-s 128: the first parameter named shows both shapes.
    assert "is float32[64] in the checkpoint but float32[128] here" in line
    assert "it was left untouched" in line and "another workdir" in line
    assert _digest(run_copy) == before  # not set aside, config.json not replaced
    assert not [p for p in (run_copy / "checkpoints").iterdir() if "unreadable" in p.name]


def test_damaged_metrics_log_names_file_and_line_and_is_kept(run_copy, paths, capsys):
    log = run_copy / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[2] = '{"kind": "train", "step": 2, "loss": 5.1\n'  # a whole line, but not JSON
    log.write_text("".join(lines))
    before = _digest(run_copy)
    line = _error_line(["train", f"--workdir={run_copy}", *_text(paths, "with_empty")], capsys)
    assert f"{log} line 3 is not a metrics record (not JSON: " in line
    assert "allowed: one JSON object per line with kind (train, eval) and an integer step" in line
    assert "The file was not changed" in line
    assert _digest(run_copy) == before


def _honour_permission_bits(monkeypatch) -> None:
    """As root, permission bits stop no write, so a 0o555 folder is still writable. There the
    write probe is made to do what the kernel does for anyone else (EACCES without a write
    bit); everything downstream of the probe (the message, that nothing runs) is real."""
    if os.geteuid() != 0:
        return
    import dvar_jax.run_dir as run_dir_lib

    real = run_dir_lib._probe_write

    def probe(folder: Path) -> None:
        if not os.stat(folder).st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        real(folder)

    monkeypatch.setattr(run_dir_lib, "_probe_write", probe)


@contextlib.contextmanager
def _read_only(folder: Path):
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(mode)


def test_read_only_workdir_is_refused_before_any_work(run_copy, paths, capsys, monkeypatch):
    _honour_permission_bits(monkeypatch)
    before = _digest(run_copy)
    with _read_only(run_copy):
        line = _error_line(["train", f"--workdir={run_copy}", *_text(paths, "with_empty")],
                           capsys)
    assert f"--workdir={str(run_copy)!r} is not writable ({run_copy}: Permission denied)" in line
    assert "Make it writable, or give a folder you can write to" in line
    assert _digest(run_copy) == before


def test_new_workdir_under_a_read_only_folder_is_refused(tmp_path, paths, capsys, monkeypatch):
    _honour_permission_bits(monkeypatch)
    parent = tmp_path / "locked"
    parent.mkdir()
    with _read_only(parent):
        line = _error_line(["train", f"--workdir={parent / 'a' / 'run'}",
                            *_text(paths, "corpus")], capsys)
    assert f"is not writable ({parent}: Permission denied)" in line
    assert list(parent.iterdir()) == []


# --- the metrics reader: what is damage and what is a record cut short by a kill ------------


def _log(tmp_path: Path, text: str) -> Path:
    (tmp_path / "metrics.jsonl").write_text(text)
    return tmp_path


GOOD = '{"kind": "train", "step": 1, "loss": 5.0}\n{"kind": "eval", "step": 1, "val_loss": 5.5}\n'


def test_a_record_cut_short_by_a_kill_is_dropped(tmp_path):
    """A last line without its newline was being written when the process died: its step is
    redone on resume, so it is dropped rather than refused."""
    _log(tmp_path, GOOD + '{"kind": "train", "st')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 1]


@pytest.mark.parametrize("bad, why", [
    ('{"kind": "train", "st\n', "not JSON: "),  # written whole (newline and all): damage
    ('[1, 2]\n', "a JSON list, not an object"),
    ('{"kind": "test", "step": 3}\n', "kind='test', allowed train, eval"),
    ('{"kind": "train", "step": "3"}\n', "step='3', expected an integer"),
    (b'{"kind": "train", "step": 3, "x": "\xff"}\n', "byte 35 is not UTF-8"),
])
def test_a_bad_metrics_line_names_file_line_and_what_is_allowed(tmp_path, bad, why):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD.encode() + (bad if isinstance(bad, bytes) else bad.encode()))
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        read_metrics(tmp_path)
    assert f"{path} line 3 is not a metrics record ({why}" in str(err.value)
    with pytest.raises(ValueError):
        RunDir(tmp_path).keep_metrics_through(1)
    assert path.read_bytes() == before
