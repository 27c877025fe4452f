"""A Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`, e.g. the study's released data),
taken as a token store without re-tokenizing: `dvar prepare --source=megatron --path=PREFIX`.

The pair becomes the store's one shard (hard-linked when the filesystem allows, else copied);
Megatron's index is already the store's shard index. The tokenizer cannot be read from the
files, so the user names it, and the import checks what it can: every id below its vocabulary,
and whether documents end with its end-of-document id (Megatron's `--append-eod`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dvar_jax.data.prepare import build_manifest, check_out, store_header
from dvar_jax.data.store import (
    HEADER_FILE,
    MANIFEST_FILE,
    SHARD_DIR,
    TOKENIZER_DIR,
    StoreError,
    read_index,
    read_json,
    shard_name,
    write_json,
)
from dvar_jax.data.tokenizer import Tokenizer

# Tokens checked against the vocabulary at a time (bounds memory on a multi-GB .bin).
_CHUNK_TOKENS = 1 << 24


def _identity(bin_path: Path, idx_path: Path) -> dict[str, Any]:
    return {"kind": "megatron", "path": str(bin_path.with_suffix("").resolve()),
            "files": [[bin_path.name, bin_path.stat().st_size],
                      [idx_path.name, idx_path.stat().st_size]]}


def _place(source: Path, target: Path) -> None:
    """`target` as a hard link to `source`, or a copy across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def import_megatron(prefix: str | os.PathLike, tokenizer: Tokenizer, out: str | os.PathLike, *,
                    command: str = "", log: Callable[[str], None] | None = None
                    ) -> dict[str, Any]:
    """Makes the store at `out` from `prefix`.bin/.idx; returns its manifest. StoreError naming
    the file for a missing or damaged pair, or ids beyond the tokenizer's vocabulary."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    prefix = os.path.expanduser(os.fspath(prefix)).removesuffix(".bin").removesuffix(".idx")
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise StoreError(f"--path={prefix}: {path} does not exist; allowed: the prefix of a "
                             "Megatron indexed dataset (PREFIX.bin + PREFIX.idx)")
    index = read_index(idx_path.read_bytes(), str(idx_path))
    want = index.num_tokens * index.dtype.itemsize
    if bin_path.stat().st_size != want:
        raise StoreError(f"{bin_path} holds {bin_path.stat().st_size} bytes, its index "
                         f"{idx_path.name} promises {want}: the pair is damaged or mismatched")
    out = Path(out).expanduser()
    header = store_header(_identity(bin_path, idx_path), tokenizer, 0)
    header["dtype"] = index.dtype.name  # the file's own, which the reader maps as it is
    check_out(out, header)
    manifest = read_json(out / MANIFEST_FILE)
    if manifest is not None:
        log(f"store {out} is complete ({manifest['tokens']:,} tokens): nothing to do")
        return manifest

    tokens = np.memmap(bin_path, dtype=index.dtype, mode="r", shape=(index.num_tokens,))
    digest = hashlib.sha256()
    for start in range(0, len(tokens), _CHUNK_TOKENS):
        chunk = np.asarray(tokens[start:start + _CHUNK_TOKENS])
        digest.update(chunk.tobytes())
        top = int(chunk.max()) if len(chunk) else 0
        if top >= tokenizer.vocab_size:
            raise StoreError(
                f"{bin_path} holds id {top} (near token {start:,}), beyond the "
                f"{tokenizer.vocab_size} ids of {tokenizer.description}; give the tokenizer "
                "the data was made with (--tokenizer)")
    ends = index.document_token_ends()
    last = np.asarray(tokens[ends - 1]) if len(ends) else np.zeros(0)
    unterminated = int((last != tokenizer.eod_id).sum())
    if unterminated:
        log(f"warning: {unterminated:,} of {len(ends):,} documents of {bin_path} do not end "
            f"with the end-of-document id {tokenizer.eod_id} (made without --append-eod?): "
            "windows will run across their boundaries unmarked")

    write_json(out / HEADER_FILE, header)
    tokenizer.save(out / TOKENIZER_DIR)
    name = shard_name(0)
    _place(bin_path, out / SHARD_DIR / f"{name}.bin")
    _place(idx_path, out / SHARD_DIR / f"{name}.idx")
    record = {"name": name, "documents": index.num_documents, "tokens": index.num_tokens,
              "text_sha256": "", "bin_sha256": digest.hexdigest()}
    write_json(out / SHARD_DIR / f"{name}.json", record)
    manifest = build_manifest(header, [record], command)
    write_json(out / MANIFEST_FILE, manifest)
    log(f"store {out}: {index.num_tokens:,} tokens, {index.num_documents:,} documents from "
        f"{prefix} (Megatron)")
    return manifest
