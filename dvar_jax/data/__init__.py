"""Data layer: source -> tokenizer -> token store -> windows -> training batches."""

from dvar_jax.data.corpus import Document, SourceSpec, cache_dir, iter_documents
from dvar_jax.data.pipeline import (
    RunData,
    TrainBatches,
    open_run_data,
    validation_windows,
)
from dvar_jax.data.prepare import prepare_store
from dvar_jax.data.store import StoreError, TokenStore
from dvar_jax.data.tokenizer import Tokenizer, open_tokenizer

__all__ = [
    "Document",
    "RunData",
    "SourceSpec",
    "StoreError",
    "TokenStore",
    "Tokenizer",
    "TrainBatches",
    "cache_dir",
    "iter_documents",
    "open_run_data",
    "open_tokenizer",
    "prepare_store",
    "validation_windows",
]
