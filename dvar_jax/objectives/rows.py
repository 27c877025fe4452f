"""Which rows of the global batch one loss call sees, so that gradient accumulation draws the
same noise as one big batch.

A training loss draws its randomness (diffusion's noise levels and masks, AR's order choice and
token mask) for the whole global batch from the step's key and keeps the rows it was given:
with `train.microbatches` = m, microbatch i holds global rows i, m + i, 2m + i, ... and sees
exactly the draws those rows get in one step of the whole batch. Drawing the whole batch's
[batch, seq] (randmask: [batch, seq, seq]) numbers m times costs a few random bits per token,
nothing next to the model. Dropout is the exception: its masks have the activations' shapes, so
each microbatch folds its number into the dropout key (same distribution, other bits).
"""

import dataclasses
from functools import partial

import jax


@partial(jax.tree_util.register_dataclass, data_fields=["index", "part"], meta_fields=["total"])
@dataclasses.dataclass(frozen=True)
class BatchRows:
    """index: [rows] int32 global row numbers of the call's tokens; total: rows of the global
    batch (static: draws are shaped by it); part: int32 scalar, the microbatch number."""

    index: jax.Array
    total: int
    part: jax.Array


def batch_size(rows: BatchRows | None, batch: int) -> int:
    """Rows of the global batch the draws are made for: the call's own batch without rows."""
    return batch if rows is None else rows.total


def take(rows: BatchRows | None, drawn: jax.Array) -> jax.Array:
    """This call's rows of a whole-batch draw [total, ...] (all of it without rows)."""
    return drawn if rows is None else drawn[rows.index]


def dropout_key(rows: BatchRows | None, key: jax.Array) -> jax.Array:
    """The dropout key of this call: the step's own for a whole batch, else folded with the
    microbatch number."""
    return key if rows is None else jax.random.fold_in(key, rows.part)
