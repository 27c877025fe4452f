"""The byte-level BPE of `bpe.ByteLevelBPE` behind seqio's `Vocabulary` interface, which
training, evaluation, sampling and the lm-eval adapter use. Imports TensorFlow (through
seqio), so only code that needs the seqio interface imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dvar_jax import import_quietly
from dvar_jax.data.bpe import ByteLevelBPE

seqio = import_quietly("seqio")  # and TensorFlow, whose start-up lines say nothing of ours
tf = import_quietly("tensorflow")


class ByteLevelBPEVocabulary(seqio.Vocabulary):
    """A `ByteLevelBPE` as a seqio vocabulary: `eos_id` is its end-of-document id; there is no
    unknown id (every byte has a token) and no extra ids. seqio's `pad_id` stays 0, which is an
    ordinary token here ("!" in GPT-2): this vocabulary never pads. Ids at or beyond
    `vocab_size` (MASK, a padded embedding table) decode to nothing.
    """

    def __init__(self, bpe: ByteLevelBPE):
        self.bpe = bpe
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self.bpe.eod_id

    @property
    def unk_id(self) -> None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.bpe.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self.bpe._encode(s)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.bpe.encode_batch(texts)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.bpe._decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """Scalar string tensor -> int32 ids `[n]`."""

        def encode(text: np.ndarray) -> np.ndarray:  # a 0-d array holding bytes
            return np.asarray(self._encode(text.item().decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Int ids `[..., n]` -> strings `[...]`, each row up to its first end-of-document.

        seqio's `decode_tf` overwrites what follows the end-of-document with pad id 0, an
        ordinary token here, so the cut is made again per row in `_decode`."""

        def decode(rows: np.ndarray) -> np.ndarray:
            flat = rows.reshape(int(np.prod(rows.shape[:-1])), rows.shape[-1])
            texts = [self._decode(row.tolist()).encode("utf-8") for row in flat]
            return np.asarray(texts, dtype=object).reshape(rows.shape[:-1])

        texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        texts.set_shape(ids.shape[:-1])
        return texts

    def token_byte_lengths(self) -> list[int]:
        return self.bpe.token_byte_lengths()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByteLevelBPEVocabulary):
            return NotImplemented
        return self.bpe == other.bpe

    def __hash__(self) -> int:
        return hash(self.bpe)

    def __repr__(self) -> str:
        return f"ByteLevelBPEVocabulary({self.bpe!r})"
