"""Validation loss of a trained run, as the study reports it (PAPER.md §5.1).

Exact objectives (AR): the mean next-token NLL. Others (diffusion): the negative ELBO estimated
with K draws per sequence (the objective's validation_draws: for diffusion, stratified masked
counts, docs/diffusion_validation.md; the study: K = 32 of its 1/p form), with the
Monte-Carlo standard error of the estimate (the spread of the draws within each sequence; the
validation set itself is fixed, so its sequence-to-sequence spread is not estimation error).
Also in bits per token and bits per UTF-8 byte, the latter comparable across tokenizers.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvar_jax.data.pipeline import validation_windows
from dvar_jax.eval.loading import LoadedRun


def validation_draws(eval_fn, windows: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """eval_fn(tokens [batch, seq + 1], rng) -> [batch, K] over all windows [n, seq + 1]:
    returns [n, K]. Batch j uses the key fold_in(key(seed), j), as the training-time evaluation
    does, so the same seed and batch size draw the same masks."""
    key = jax.random.key(seed)
    out = []
    for j, start in enumerate(range(0, len(windows), batch_size)):
        chunk = windows[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:  # pad with repeats: one compiled shape for every batch
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        out.append(np.asarray(eval_fn(jnp.asarray(chunk), jax.random.fold_in(key, j)))[:real])
    return np.concatenate(out).astype(np.float64)


def summarize_draws(draws: np.ndarray, tokens_per_sequence: int) -> tuple[float, float]:
    """(mean per-token loss, its Monte-Carlo standard error) from per-sequence draws [n, K].

    The estimate is mean_i mean_k x_ik / L; its variance given the sequences is
    sum_i var_k(x_i.) / K / (n L)^2. With K = 1 the error cannot be estimated (nan); exact
    objectives (AR) have zero spread, hence error 0.
    """
    n, k = draws.shape
    estimate = draws.mean(axis=1).sum() / (n * tokens_per_sequence)
    if k == 1:
        return float(estimate), float("nan")
    variance = draws.var(axis=1, ddof=1).sum() / k / (n * tokens_per_sequence) ** 2
    return float(estimate), float(math.sqrt(variance))


def token_byte_lengths(tokenizer) -> np.ndarray:
    """int64 [vocab]: UTF-8 bytes each id stands for (control ids 0, byte-fallback ids 1, "▁"
    counted as the space it encodes). The one space SentencePiece prepends to each encoded text
    is counted too: at most one byte per document, a relative error of 1 / document bytes."""
    return np.asarray(tokenizer.token_byte_lengths(), np.int64)


@partial(jax.jit, static_argnums=(0, 1), static_argnames=("mask_id", "num_mc"))
def _draws(graphdef, draws_fn, params, tokens, rng, *, mask_id: int, num_mc: int):
    # Module level, the model structure static and the parameters an argument: one compile per
    # model shape and setting, reused across calls, seeds and checkpoints.
    return draws_fn(nnx.merge(graphdef, params), tokens, rng, mask_id, num_mc)


def evaluate_validation(run: LoadedRun, *, num_mc: int, batch_size: int, seed: int,
                        validation_tokens: int) -> dict:
    """Validation loss of `run` on its validation stream's first `validation_tokens` tokens
    (0 = all): per token (nats and bits), per byte, and the Monte-Carlo standard error."""
    seq = run.cfg.data.seq_len
    windows = validation_windows(run.data.validation, seq, validation_tokens)
    graphdef, params = nnx.split(run.model)
    num_draws = 1 if run.objective.exact else num_mc
    eval_fn = partial(_draws, graphdef, run.objective.validation_draws, params,
                      mask_id=run.mask_id, num_mc=num_draws)
    draws = validation_draws(eval_fn, windows, batch_size, seed)
    loss, stderr = summarize_draws(draws, seq)
    if run.objective.exact:
        stderr = 0.0
    scored = run.objective.scored_tokens(windows)
    num_bytes = int(token_byte_lengths(run.tokenizer)[scored].sum())
    nats = loss * scored.size
    return {
        "val_loss": loss, "val_loss_stderr": stderr,
        "bits_per_token": loss / math.log(2),
        "bits_per_byte": nats / math.log(2) / num_bytes,
        "num_mc": num_draws, "sequences": len(windows), "tokens": int(scored.size),
        "bytes": num_bytes,
    }
