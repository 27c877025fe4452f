"""Token streams and the training batches drawn from them.

A split's stream is its documents encoded in corpus order, each followed by the
end-of-document id. Training sees only the first U (`data.unique_tokens`) tokens of the
train stream, cut into windows of `seq_len + 1` tokens with stride `seq_len`, so
consecutive windows share one token and every token after the first (save a tail shorter
than `seq_len`) is a next-token target exactly once per epoch, as in Megatron. Window order
is a fresh seeded permutation each epoch (grain), and batch i is a pure function of the
config and i: resuming, changing the number of hosts, or re-running a sweep never changes
what a step sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from dvar_jax.data.corpus import Document, cache_dir, load_corpus
from dvar_jax.data.tokenizer import Tokenizer, load_tokenizer
from dvar_jax.files import write_atomically

# Documents are encoded in groups of about this many characters, so the intermediate Python
# lists stay small next to the int32 result.
_ENCODE_GROUP_CHARS = 1 << 24
_TOKENS_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    """int32 token streams `[n_tokens]` of each split (read-only memmaps when cached)."""

    train: np.ndarray
    validation: np.ndarray
    tokenizer: Tokenizer


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def encode_documents(tokenizer: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    """int32 `[n_tokens]`: each document's ids followed by `tokenizer.eod_id`, in order."""
    parts: list[np.ndarray] = []
    group: list[str] = []
    size = 0

    def flush() -> None:
        for ids in tokenizer.encode_batch(group):
            parts.append(np.asarray(ids, dtype=np.int32))
            parts.append(np.array([tokenizer.eod_id], dtype=np.int32))
        group.clear()

    for doc in docs:
        group.append(doc.text)
        size += len(doc.text)
        if size >= _ENCODE_GROUP_CHARS:
            flush()
            size = 0
    flush()
    if not parts:
        return np.zeros((0,), dtype=np.int32)
    return np.concatenate(parts)


def _cached_stream(path: Path, tokenizer: Tokenizer, docs: Sequence[Document]) -> np.ndarray:
    if not path.exists():
        tokens = encode_documents(tokenizer, docs)
        write_atomically(path, lambda f: np.save(f, tokens, allow_pickle=False))
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_token_streams(data_cfg: Any) -> TokenStreams:
    """Corpus -> tokenizer -> token streams, each step cached under the cache folder.

    Streams live at `<cache>/tokens/<key>.<split>.npy`, the key covering the corpus and the
    tokenizer file's bytes.
    """
    corpus = load_corpus(data_cfg)
    tokenizer = load_tokenizer(data_cfg, corpus)
    key = hashlib.sha256(
        f"{_TOKENS_FORMAT_VERSION}:{corpus.fingerprint}:{_file_sha256(tokenizer.path)}".encode()
    ).hexdigest()[:32]
    folder = cache_dir(data_cfg) / "tokens"
    return TokenStreams(
        train=_cached_stream(folder / f"{key}.train.npy", tokenizer, corpus.train),
        validation=_cached_stream(folder / f"{key}.validation.npy", tokenizer, corpus.validation),
        tokenizer=tokenizer,
    )


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """int32 `[len(window_ids), seq_len + 1]`: window w is tokens[w*seq_len : (w+1)*seq_len + 1]."""
    starts = np.asarray(window_ids, dtype=np.int64)[:, None] * seq_len
    return np.asarray(tokens[starts + np.arange(seq_len + 1)], dtype=np.int32)


def validation_windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """int32 `[n, seq_len + 1]`: the fixed validation windows, stride `seq_len`, in order.

    Only the first `max_tokens` tokens are used (0 = all); n = (tokens used - 1) // seq_len.
    """
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
    return gather_windows(tokens, np.arange(n), seq_len)


class TrainBatches:
    """Batches of training windows: `batch(i)` is int32 `[local_batch, seq_len + 1]`.

    The global batch i is rows i*B .. i*B+B-1 of the concatenated per-epoch permutations of
    the window indices, for `num_steps` = floor(epochs * num_windows / B) steps; the last,
    incomplete batch of the whole run is dropped, so a batch may straddle two epochs. Host
    p of P takes rows [p*B/P, (p+1)*B/P) of every global batch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        unique_tokens: int,
        epochs: float,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
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
        self._tokens = tokens[:unique_tokens]
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
        train_tokens: np.ndarray,
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
            unique_tokens=cfg.data.unique_tokens,
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
        return gather_windows(self._tokens, ids, self.seq_len)

    def iterate(self, start_step: int = 0) -> Iterator[np.ndarray]:
        """`batch(i)` for i = start_step, ..., num_steps - 1."""
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step={start_step} is outside [0, num_steps={self.num_steps}]")
        for step in range(start_step, self.num_steps):
            yield self.batch(step)
