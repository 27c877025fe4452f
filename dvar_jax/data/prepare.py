"""`dvar prepare`: one split of a source, tokenized by parallel workers into a token store.

The source is read once, in order, by this process and cut into shards of about
`shard_chars` characters of whole documents. Workers tokenize shards and write them; at most
`workers + 1` shards are in flight, so memory does not grow with the corpus. A shard is done
when its .json is written (after its .bin and .idx), and records the hash of the text it came
from, so a rerun skips finished shards that still hold the same documents and redoes the rest
(missing, truncated, or from other text). The manifest is written last.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dvar_jax.data.corpus import Document, SourceSpec, check_source, iter_documents, source_identity
from dvar_jax.data.store import (
    HEADER_FILE,
    MANIFEST_FILE,
    SHARD_DIR,
    STORE_FORMAT,
    TOKENIZER_DIR,
    StoreError,
    is_remote,
    read_json,
    shard_name,
    token_dtype,
    write_index,
    write_json,
)
from dvar_jax.data.tokenizer import Tokenizer, load_saved_tokenizer
from dvar_jax.files import write_atomically

# About 4M tokens of English per shard: 8 MB as uint16, and one worker's unit of work.
DEFAULT_SHARD_CHARS = 1 << 24
# Texts handed to the tokenizer at once inside a worker: bounds its Python lists of ids.
_ENCODE_GROUP_CHARS = 1 << 20


def _text_hash(docs: Iterable[Document]) -> str:
    """sha256 over the documents' texts, length-prefixed (names are not part of the store)."""
    h = hashlib.sha256()
    for doc in docs:
        data = doc.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _shards(docs: Iterator[Document], shard_chars: int) -> Iterator[list[Document]]:
    """Consecutive runs of whole documents of at least `shard_chars` characters (the last
    may be shorter): a function of the source alone, so a resumed run cuts the same shards."""
    shard, size = [], 0
    for doc in docs:
        shard.append(doc)
        size += len(doc.text)
        if size >= shard_chars:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def encode_shard(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype,
                 num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens `[n]` of `dtype`: each text's ids then end-of-document; lengths int64
    `[len(texts)]`: tokens per document, end-of-document included)."""
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    group: list[str] = []
    size = 0

    def flush() -> None:
        for ids in tokenizer.encode_batch(group, num_threads=num_threads):
            parts.append(np.asarray([*ids, tokenizer.eod_id], dtype=dtype))
            lengths.append(len(ids) + 1)
        group.clear()

    for text in texts:
        group.append(text)
        size += len(text)
        if size >= _ENCODE_GROUP_CHARS:
            flush()
            size = 0
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, np.asarray(lengths, dtype=np.int64)


def _shard_paths(out: Path, index: int) -> tuple[Path, Path, Path]:
    stem = out / SHARD_DIR / shard_name(index)
    return stem.with_suffix(".bin"), stem.with_suffix(".idx"), stem.with_suffix(".json")


def _finished_shard(out: Path, index: int, text_hash: str, dtype: np.dtype) -> dict | None:
    """The shard's record if it is whole and was made from text with `text_hash`."""
    bin_path, idx_path, json_path = _shard_paths(out, index)
    record = read_json(json_path)
    if record is None or record.get("text_sha256") != text_hash:
        return None
    if not (bin_path.exists() and idx_path.exists()):
        return None
    if bin_path.stat().st_size != record["tokens"] * dtype.itemsize:
        return None
    return record


def write_shard(out: Path, index: int, tokenizer: Tokenizer, texts: list[str], text_hash: str,
                dtype: np.dtype, num_threads: int = 1) -> dict:
    """Tokenizes one shard and writes its .bin, .idx and (last) .json; returns the record."""
    tokens, lengths = encode_shard(tokenizer, texts, dtype, num_threads)
    bin_path, idx_path, json_path = _shard_paths(out, index)
    write_atomically(bin_path, tokens.tobytes())
    write_index(idx_path, lengths, dtype)
    record = {"name": shard_name(index), "documents": len(texts), "tokens": len(tokens),
              "text_sha256": text_hash,
              "bin_sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    write_json(json_path, record)
    return record


# Worker processes load the store's tokenizer once (spawned: no inherited JAX/TF threads).
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_saved_tokenizer(tokenizer_dir)


def _worker_write(out: str, index: int, texts: list[str], text_hash: str, dtype: str) -> dict:
    return write_shard(Path(out), index, _worker_tokenizer, texts, text_hash, np.dtype(dtype))


def _header(source: SourceSpec, tokenizer: Tokenizer, shard_chars: int) -> dict[str, Any]:
    return store_header(source_identity(source), tokenizer, shard_chars)


def store_header(source: dict[str, Any], tokenizer: Tokenizer, shard_chars: int) -> dict[str, Any]:
    """store.json: what a store holds (its source's identity, its tokenizer, token dtype)."""
    return {
        "format": STORE_FORMAT,
        "source": source,
        "tokenizer": {"fingerprint": tokenizer.fingerprint,
                      "description": tokenizer.description,
                      "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "shard_chars": shard_chars,
    }


def check_out(out: Path, header: dict[str, Any]) -> None:
    """Refuses an --out that holds something other than this store (never overwrites it)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"--out={out} is a file, not a store folder")
    existing = read_json(out / HEADER_FILE)
    if existing is None:
        if any(out.iterdir()):
            raise StoreError(f"--out={out} is a non-empty folder that is not a token store "
                             f"(no {HEADER_FILE}); choose an empty or new folder")
        return
    for key, what in (("source", "source"), ("tokenizer", "tokenizer"),
                      ("format", "store format"), ("shard_chars", "shard size")):
        if existing.get(key) != header[key]:
            raise StoreError(
                f"--out={out} holds a store of another {what}: it has {_brief(existing[key])}, "
                f"this prepare has {_brief(header[key])}; choose another --out, or delete "
                f"{out} to replace it")


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        keys = ("kind", "split", "path", "pattern", "tfds_name", "description")
        shown = {k: value[k] for k in keys if k in value}
        return str(shown or value)[:300]
    return repr(value)


def check_arguments(out: str | os.PathLike, workers: int, shard_chars: int) -> tuple[Path, int]:
    """(the local store folder, the worker count) of `prepare_store`'s arguments, or a
    ValueError naming the bad one."""
    if is_remote(out):
        raise StoreError(
            f"--out={out}: `dvar prepare` writes a local folder; copy it to the bucket "
            "afterwards (e.g. `gcloud storage cp -r STORE gs://BUCKET/STORE`), and read it "
            "from there")
    if shard_chars < 1:
        raise ValueError(f"--shard_chars={shard_chars}: must be >= 1")
    if workers < 0:
        raise ValueError(f"--workers={workers}: must be >= 1 (0 = all cores)")
    return Path(out).expanduser(), workers or os.cpu_count() or 1


def prepare_store(source: SourceSpec, tokenizer: Tokenizer, out: str | os.PathLike, *,
                  workers: int = 0, shard_chars: int = DEFAULT_SHARD_CHARS,
                  command: str = "", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Makes (or finishes, or checks) the store of `source` at `out`; returns its manifest.

    workers: processes that tokenize (0 = all cores; 1 = in this process). `command` is
    recorded so that a damaged store can say how to repair it.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out, workers = check_arguments(out, workers, shard_chars)
    check_source(source)
    header = _header(source, tokenizer, shard_chars)
    check_out(out, header)
    manifest = read_json(out / MANIFEST_FILE)
    dtype = np.dtype(header["dtype"])
    if manifest is not None and all(
            _finished_shard(out, i, s["text_sha256"], dtype) for i, s in
            enumerate(manifest["shards"])):
        log(f"store {out} is complete ({manifest['tokens']:,} tokens, "
            f"{manifest['documents']:,} documents): nothing to do")
        return manifest
    created = not out.exists()
    try:
        return _write_store(source, tokenizer, out, header, workers, shard_chars, command, log)
    except BaseException:
        # A source that fails before any shard is finished (a bad first file) leaves nothing.
        if created and not any((out / SHARD_DIR).glob("*.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_store(source: SourceSpec, tokenizer: Tokenizer, out: Path, header: dict[str, Any],
                 workers: int, shard_chars: int, command: str,
                 log: Callable[[str], None]) -> dict[str, Any]:
    dtype = np.dtype(header["dtype"])
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    _remove_partial_writes(out)
    write_json(out / HEADER_FILE, header)
    tokenizer.save(out / TOKENIZER_DIR)

    started = time.monotonic()
    records: dict[int, dict] = {}
    skipped = 0
    pool = None
    if workers > 1:
        # spawn, not fork: the parent may hold JAX's or TensorFlow's threads.
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=_init_worker, initargs=(str(out / TOKENIZER_DIR),))
    pending: collections.deque = collections.deque()
    try:
        for index, docs in enumerate(_shards(iter_documents(source), shard_chars)):
            text_hash = _text_hash(docs)
            done = _finished_shard(out, index, text_hash, dtype)
            if done is not None:
                records[index] = done
                skipped += 1
                continue
            texts = [d.text for d in docs]
            if pool is None:
                records[index] = write_shard(out, index, tokenizer, texts, text_hash, dtype)
            else:
                pending.append((index, pool.apply_async(
                    _worker_write, (str(out), index, texts, text_hash, dtype.name))))
                while len(pending) > workers:
                    i, result = pending.popleft()
                    records[i] = result.get()
            del docs
        while pending:
            i, result = pending.popleft()
            records[i] = result.get()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if not records:
        raise StoreError(f"source {_brief(header['source'])} yielded no documents")
    _remove_stale_shards(out, len(records))
    manifest = build_manifest(header, [records[i] for i in range(len(records))], command)
    write_json(out / MANIFEST_FILE, manifest)
    seconds = time.monotonic() - started
    log(f"store {out}: {manifest['tokens']:,} tokens, {manifest['documents']:,} documents in "
        f"{len(records)} shards ({skipped} already done) in {seconds:.1f} s")
    return manifest


def _remove_partial_writes(out: Path) -> None:
    """Deletes the temporary files of writes that a killed run left behind."""
    folder = out / SHARD_DIR
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, count: int) -> None:
    """Deletes shards numbered `count` and up (left by a run over a longer source)."""
    for path in (out / SHARD_DIR).iterdir():
        stem = path.name.split(".")[0]
        if stem.isdigit() and int(stem) >= count:
            path.unlink()


def build_manifest(header: dict[str, Any], records: list[dict], command: str) -> dict[str, Any]:
    """manifest.json: the header, every shard's record with cumulative offsets, the totals and
    the content fingerprint (the shards' bytes and the tokenizer)."""
    h = hashlib.sha256()
    for record in records:
        h.update(bytes.fromhex(record["bin_sha256"]))
    h.update(header["tokenizer"]["fingerprint"].encode())
    shards, tokens, documents = [], 0, 0
    for record in records:
        shards.append({**record, "first_token": tokens, "first_document": documents})
        tokens += record["tokens"]
        documents += record["documents"]
    return {**header, "shards": shards, "tokens": tokens, "documents": documents,
            "fingerprint": h.hexdigest(), "command": command}
