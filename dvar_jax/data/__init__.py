"""Data layer: corpus -> tokenizer -> token streams -> training batches."""

from dvar_jax.data.corpus import Corpus, Document, cache_dir, load_corpus
from dvar_jax.data.pipeline import (
    TokenStreams,
    TrainBatches,
    load_token_streams,
    validation_windows,
)
from dvar_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "Corpus",
    "Document",
    "TokenStreams",
    "Tokenizer",
    "TrainBatches",
    "cache_dir",
    "load_corpus",
    "load_token_streams",
    "load_tokenizer",
    "validation_windows",
]
