"""A token store: one split of a corpus, tokenized once, in shards read by memory map.

Layout (this module is its one home)::

    STORE/
      store.json          what the store holds: source identity, tokenizer, token dtype
                          (written first, so an interrupted `dvar prepare` can resume)
      tokenizer/          the tokenizer's own files (`Tokenizer.save`)
      shards/NNNNN.bin    tokens of consecutive documents, each followed by end-of-document
      shards/NNNNN.idx    Megatron's indexed-dataset index for the .bin (one sequence per
                          document), so Megatron tools read our shards and we read theirs
      shards/NNNNN.json   the shard's counts and the hash of the source text it came from
      manifest.json       every shard's documents, tokens and cumulative offsets, and the
                          content fingerprint (written last: a store without it is unfinished)

The store's token stream is the shards' tokens in order: the source's documents in source
order, each followed by the end-of-document id, so "the first U tokens" and "the first K
documents" are prefixes of it. Why this format rather than ArrayRecord: see docs/data.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from dvar_jax.files import write_atomically

STORE_FORMAT = 1
HEADER_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SHARD_DIR = "shards"

# Megatron's MMapIndexedDataset index: magic, version, dtype code, counts, then the arrays.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_VERSION = 1
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in _DTYPE_CODES.items()}


class StoreError(ValueError):
    """A store that cannot be used as it is; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron's index has no uint32 code)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def shard_name(index: int) -> str:
    return f"{index:05d}"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (gs://, s3://, ...) rather than a local file."""
    return "://" in os.fspath(path)


def store_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an etils.epath.Path: local paths expanded, gs:// left to epath's backend."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


# --- Megatron .bin/.idx -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexedFile:
    """A Megatron .idx read into memory: per-sequence lengths and byte offsets into the .bin,
    and the document boundaries as sequence indices (`[documents + 1]`)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [sequences]
    sequence_pointers: np.ndarray  # int64 [sequences], bytes
    document_indices: np.ndarray  # int64 [documents + 1]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_token_ends(self) -> np.ndarray:
        """int64 `[documents]`: the token offset just past each document, within this file."""
        ends = np.cumsum(self.sequence_lengths, dtype=np.int64)
        return ends[self.document_indices[1:] - 1] if len(ends) else np.zeros(0, np.int64)


def write_index(path: Path, document_lengths: np.ndarray, dtype: np.dtype) -> None:
    """Writes a Megatron .idx for a .bin of documents of `document_lengths` tokens (int64
    `[documents]`), one sequence per document."""
    lengths = np.asarray(document_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    documents = np.arange(len(lengths) + 1, dtype=np.int64)

    def write(f) -> None:
        f.write(_IDX_MAGIC)
        f.write(struct.pack("<Q", _IDX_VERSION))
        f.write(struct.pack("<B", _CODE_OF_DTYPE[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))

    write_atomically(path, write)


def read_index(data: bytes, name: str) -> IndexedFile:
    """Parses a Megatron .idx (`name` is for messages)."""
    head = len(_IDX_MAGIC) + 8 + 1 + 8 + 8
    if len(data) < head or not data.startswith(_IDX_MAGIC):
        raise StoreError(f"{name} is not a Megatron indexed-dataset index (no MMIDIDX header)")
    version, code, sequences, documents = struct.unpack_from("<QBQQ", data, len(_IDX_MAGIC))
    if version != _IDX_VERSION:
        raise StoreError(f"{name} has index version {version}; only {_IDX_VERSION} is known")
    if code not in _DTYPE_CODES:
        raise StoreError(f"{name} has token dtype code {code}; known: {sorted(_DTYPE_CODES)}")
    need = head + sequences * 12 + documents * 8
    if len(data) < need:
        raise StoreError(f"{name} is truncated: {len(data)} bytes, its header promises {need}")
    lengths = np.frombuffer(data, np.int32, sequences, head)
    pointers = np.frombuffer(data, np.int64, sequences, head + 4 * sequences)
    doc_idx = np.frombuffer(data, np.int64, documents, head + 12 * sequences)
    return IndexedFile(np.dtype(_DTYPE_CODES[code]), lengths, pointers, doc_idx)


# --- Header and manifest ------------------------------------------------------------------


def read_json(path: epath.Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None if there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def write_json(path: Path, value: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


# --- Reading a store ----------------------------------------------------------------------


def _default_shard_cache() -> Path:
    root = os.environ.get("DVAR_CACHE") or "~/.cache/dvar_jax"
    return Path(root).expanduser() / "store_shards"


class TokenStore:
    """A finished store, opened for reading: `read(start, stop)` is int32 tokens of the
    store's token stream, cut from memory-mapped shards, so memory does not grow with the
    store. A remote store (gs://) copies each shard to a local cache on first read.

    Opening reads only the header and the manifest; a shard is checked (present, whole)
    when first read, or for a prefix by `check_shards`.
    """

    def __init__(self, path: str | os.PathLike, shard_cache: str | os.PathLike | None = None):
        self.path = store_path(path)
        self.name = os.fspath(path)
        manifest = read_json(self.path / MANIFEST_FILE)
        header = read_json(self.path / HEADER_FILE)
        if manifest is None:
            if header is not None:
                raise StoreError(
                    f"store {self.name} is unfinished (no {MANIFEST_FILE}): `dvar prepare` was "
                    f"interrupted; run it again with the same arguments to finish it")
            raise StoreError(
                f"{self.name} is not a token store (no {MANIFEST_FILE}); make one with "
                "`dvar prepare --source=... --out=STORE`")
        if manifest.get("format") != STORE_FORMAT:
            raise StoreError(f"store {self.name} has format {manifest.get('format')!r}; this "
                             f"version reads format {STORE_FORMAT}: prepare it again")
        self.manifest = manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.token_starts = np.array([0] + [s["tokens"] for s in self.shards],
                                     dtype=np.int64).cumsum()
        self.document_starts = np.array([0] + [s["documents"] for s in self.shards],
                                        dtype=np.int64).cumsum()
        self.num_tokens = int(self.token_starts[-1])
        self.num_documents = int(self.document_starts[-1])
        self.fingerprint: str = manifest["fingerprint"]
        self.tokenizer_fingerprint: str = manifest["tokenizer"]["fingerprint"]
        self.tokenizer_description: str = manifest["tokenizer"]["description"]
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.source: dict[str, Any] = manifest["source"]
        self.prepare_command: str = manifest.get("command", "")
        self._shard_cache = Path(shard_cache) if shard_cache else _default_shard_cache()
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenStore({self.name!r}, {self.num_tokens:,} tokens, "
                f"{self.num_documents:,} documents, {len(self.shards)} shards)")

    @functools.cached_property
    def tokenizer(self):
        """The store's tokenizer (its saved files)."""
        from dvar_jax.data.tokenizer import load_saved_tokenizer

        return load_saved_tokenizer(self._local_copy(TOKENIZER_DIR, directory=True))

    def _repair_hint(self) -> str:
        command = f"`{self.prepare_command}`" if self.prepare_command else "`dvar prepare`"
        return f"run {command} again (same arguments) to repair it"

    def _local_copy(self, relative: str, directory: bool = False, size: int = -1) -> Path:
        """A local path for `relative` inside the store: itself if local, else a cached copy
        (keyed by the store's fingerprint, so a changed store is never served stale)."""
        source = self.path / relative
        if not is_remote(self.name):
            return Path(os.fspath(source))
        target = self._shard_cache / self.fingerprint / relative
        if directory:
            for child in source.iterdir():
                self._local_copy(f"{relative}/{child.name}")
            return target
        if not (target.exists() and (size < 0 or target.stat().st_size == size)):
            write_atomically(target, source.read_bytes())
        return target

    def shard_problem(self, index: int) -> str | None:
        """Why shard `index` cannot be read (missing, or not the size the manifest says)."""
        shard = self.shards[index]
        want = shard["tokens"] * self.dtype.itemsize
        path = self.path / SHARD_DIR / f"{shard['name']}.bin"
        try:
            have = path.stat().length if is_remote(self.name) else os.path.getsize(path)
        except (FileNotFoundError, OSError):
            return f"shard {path} of store {self.name} is missing; {self._repair_hint()}"
        if have != want:
            return (f"shard {path} of store {self.name} is truncated or damaged: {have} bytes, "
                    f"the manifest says {want}; {self._repair_hint()}")
        return None

    def check_shards(self, num_tokens: int | None = None) -> None:
        """Raises StoreError naming the first shard holding any of the first `num_tokens`
        tokens (default all) that is missing or truncated."""
        last = len(self.shards) if num_tokens is None else int(
            np.searchsorted(self.token_starts, num_tokens, side="left"))
        for index in range(min(last, len(self.shards))):
            problem = self.shard_problem(index)
            if problem:
                raise StoreError(problem)

    def _shard_tokens(self, index: int) -> np.ndarray:
        tokens = self._maps.get(index)
        if tokens is None:
            problem = self.shard_problem(index)
            if problem:
                raise StoreError(problem)
            shard = self.shards[index]
            nbytes = shard["tokens"] * self.dtype.itemsize
            local = self._local_copy(f"{SHARD_DIR}/{shard['name']}.bin", size=nbytes)
            if shard["tokens"] == 0:
                tokens = np.zeros(0, self.dtype)
            else:
                tokens = np.memmap(local, dtype=self.dtype, mode="r", shape=(shard["tokens"],))
                # Windows are read in random order: without this the kernel reads ahead and
                # maps pages around each one, so resident memory and I/O grow with the store.
                if hasattr(mmap, "MADV_RANDOM"):
                    tokens._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[index] = tokens
        return tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 `[stop - start]`: tokens start..stop-1 of the store's stream."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) are outside the store's "
                             f"[0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int32)
        index = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        done = 0
        while done < len(out):
            base = int(self.token_starts[index])
            lo = start + done - base
            piece = self._shard_tokens(index)[lo: lo + len(out) - done]
            out[done: done + len(piece)] = piece
            done += len(piece)
            index += 1
        return out

    def document_token_ends(self, index: int) -> np.ndarray:
        """int64 `[documents of shard index]`: store-wide token offsets just past each
        document of shard `index` (from its .idx)."""
        shard = self.shards[index]
        data = self._local_copy(f"{SHARD_DIR}/{shard['name']}.idx").read_bytes()
        ends = read_index(data, f"{self.name}/{SHARD_DIR}/{shard['name']}.idx")
        return ends.document_token_ends() + self.token_starts[index]

    def tokens_in_documents(self, num_documents: int) -> int:
        """Tokens in the first `num_documents` documents (each with its end-of-document)."""
        if not 0 <= num_documents <= self.num_documents:
            raise StoreError(
                f"store {self.name} holds {self.num_documents:,} documents, fewer than the "
                f"{num_documents:,} asked for")
        if num_documents == 0:
            return 0
        index = int(np.searchsorted(self.document_starts, num_documents, side="left")) - 1
        within = num_documents - int(self.document_starts[index])
        return int(self.document_token_ends(index)[within - 1])

    def documents(self, start: int = 0, stop: int | None = None) -> Sequence[np.ndarray]:
        """Token arrays of documents start..stop-1 (each ending with end-of-document), for
        decoding and inspection; reads their shards' indexes."""
        stop = self.num_documents if stop is None else stop
        out = []
        for index in range(len(self.shards)):
            first, last = int(self.document_starts[index]), int(self.document_starts[index + 1])
            if last <= start or first >= stop:
                continue
            ends = self.document_token_ends(index)
            begins = np.concatenate([[self.token_starts[index]], ends[:-1]])
            for d in range(max(start, first), min(stop, last)):
                out.append(self.read(int(begins[d - first]), int(ends[d - first])))
        return out
