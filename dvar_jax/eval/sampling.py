"""Samplers for `dvar sample`: AR and masked-diffusion generation, each one jitted lax loop.

Layout shared by every sampler. Prompts are a right-padded int array [batch, prompt_len] plus
optional `prompt_lengths` [batch] (None: every row uses all prompt_len tokens). Row b's prompt
sits at positions [0, len_b) of one fixed-shape buffer and its n_new new tokens fill
[len_b, len_b + n_new); the samplers return just those, [batch, n_new]. A row with a shorter
prompt thus generates at earlier positions, so no row ever has padding inside its context (left
padding would put it there, and our model has no attention mask to hide it).

- AR: the buffer is prompt_len + n_new long; what lies after a row's fill point is never seen
  by the causal model.
- Diffusion: positions after a row's generated region, up to the buffer's end, are MASK
  padding, visible but never revealed, as the study's evaluation right-pads to 2048 with MASK
  (PAPER.md §6). The buffer is `seq_len` long when given (the model's training window: the
  model then sees the length it was trained on, the padding looking like high-t noise), else
  prompt_len + n_new.

Ids >= vocab_limit (MASK, then the padding rows of the embedding table) get -inf logits and
are never sampled. Each sampler is one `jax.jit` of a `lax` loop, compiled once per shapes and
settings: the model's structure and the sampler settings (n_new, temperature, top_k, steps, ...)
are static, the parameters, tokens and key are traced. `TRACE_COUNTS` counts traces per
sampler ("ar", "diffusion-ancestral", "diffusion-confidence").
"""

import collections
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvar_jax.objectives import Decoding, Objective, decoded_objective_names

METHODS = ("ancestral", "confidence")

# Incremented each time a sampler's Python body is traced (i.e. compiled); tests read it to
# check that a repeated call with the same shapes and settings does not retrace.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


# --- logits -> tokens: small pure functions ---------------------------------------------------

def restrict_vocab(logits: jax.Array, vocab_limit: int) -> jax.Array:
    """logits [..., vocab] with ids >= vocab_limit (MASK, embedding padding) set to -inf."""
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """logits [..., vocab] with all but the k largest set to -inf; k <= 0 or >= vocab: unchanged.

    Ids tied with the k-th largest logit are all kept.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: logits [..., vocab] outside the smallest most-likely set whose
    probability reaches p set to -inf; p >= 1: unchanged. Ids tied with the last kept one stay.
    """
    if p >= 1.0:
        return logits
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # An id is kept when the ids before it (more likely) still sum to less than p; the
    # exclusive cumulative sum is built by shifting, not by subtracting, to avoid rounding.
    cum = jnp.cumsum(probs, axis=-1)
    cum_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    threshold = jnp.min(jnp.where(cum_before < p, sorted_logits, jnp.inf), axis=-1,
                        keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Token ids [...] int32 from logits [..., vocab].

    temperature 0: argmax (lowest id among ties; top_k, top_p irrelevant). Otherwise a draw from
    softmax(logits / temperature) restricted to the top_k ids, then to the top_p nucleus of
    what is left (the order Hugging Face's samplers use).
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --- argument checks (one-line errors naming the value and what is allowed) -------------------

def _model_vocab(model: Any) -> int | None:
    """The model's embedding rows when it says (Transformer.cfg), else None."""
    return getattr(getattr(model, "cfg", None), "vocab_size", None)


def _check_vocab_limit(model: Any, vocab_limit: int) -> None:
    rows = _model_vocab(model)
    if vocab_limit < 1 or (rows is not None and vocab_limit > rows):
        raise ValueError(f"vocab_limit must be in [1, {rows or 'model vocab'}] (the tokenizer's "
                         f"vocab_size), got {vocab_limit}")


def _check_prompts(prompts: Any, prompt_lengths: Any, n_new: int, *, min_length: int,
                   vocab_limit: int, seq_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated (prompts [batch, prompt_len] int32, lengths [batch] int32) as numpy."""
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[0] < 1 or not np.issubdtype(prompts.dtype, np.integer):
        raise ValueError(f"prompts must be a [batch >= 1, prompt_len] integer array, got shape "
                         f"{prompts.shape} dtype {prompts.dtype}")
    batch, width = prompts.shape
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    if seq_len is not None and width + n_new > seq_len:
        raise ValueError(f"prompt_len + n_new = {width} + {n_new} = {width + n_new} exceeds "
                         f"seq_len={seq_len}, the model's training window; shorten either")
    if prompt_lengths is None:
        lengths = np.full((batch,), width, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be [batch={batch}] integers, got shape "
                             f"{lengths.shape} dtype {lengths.dtype}")
    bad = lengths[(lengths < min_length) | (lengths > width)]
    if bad.size:
        raise ValueError(f"prompt_lengths must be in [{min_length}, prompt_len={width}], got "
                         f"{int(bad[0])}")
    real = np.arange(width)[None, :] < lengths[:, None]
    bad = prompts[real & ((prompts < 0) | (prompts >= vocab_limit))]
    if bad.size:
        raise ValueError(f"prompt token ids must be in [0, vocab_limit={vocab_limit}) (MASK and "
                         f"padding rows are not text), got {int(bad[0])}")
    return prompts.astype(np.int32), lengths.astype(np.int32)


def _pad_to(prompts: np.ndarray, length: int) -> np.ndarray:
    """prompts [batch, prompt_len] right-padded with zeros to [batch, length]."""
    return np.pad(prompts, ((0, 0), (0, length - prompts.shape[1])))


def _region(tokens: jax.Array, lengths: jax.Array, n_new: int) -> jax.Array:
    """tokens [batch, buffer, ...] -> the generated region [batch, n_new, ...] of each row."""
    idx = lengths[:, None] + jnp.arange(n_new)
    return jnp.take_along_axis(tokens, idx.reshape(idx.shape + (1,) * (tokens.ndim - 2)), axis=1)


# --- AR ---------------------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("graphdef", "n_new", "temperature", "top_k", "top_p",
                                   "vocab_limit", "eod_id"))
def _sample_ar_jit(graphdef: nnx.GraphDef, state: nnx.State, buffer: jax.Array,
                   lengths: jax.Array, key: jax.Array, *, n_new: int, temperature: float,
                   top_k: int, top_p: float, vocab_limit: int, eod_id: int | None) -> jax.Array:
    TRACE_COUNTS["ar"] += 1
    model = nnx.merge(graphdef, state)
    rows = jnp.arange(buffer.shape[0])
    done = jnp.zeros(buffer.shape[:1], bool)

    def keep_going(carry):
        i, _, done = carry
        return (i < n_new) & ~jnp.all(done)  # stop early once every row has ended

    def step(carry):
        i, tokens, done = carry
        pos = lengths + i  # [batch]: the position each row fills now
        logits = restrict_vocab(model(tokens)[rows, pos - 1], vocab_limit)  # [batch, vocab]
        new = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature,
                            top_k=top_k, top_p=top_p)
        if eod_id is not None:  # an ended row keeps writing eod
            new = jnp.where(done, eod_id, new)
            done = done | (new == eod_id)
        return i + 1, tokens.at[rows, pos].set(new), done

    _, tokens, _ = jax.lax.while_loop(keep_going, step, (jnp.int32(0), buffer, done))
    return _region(tokens, lengths, n_new)


def sample_ar(model: nnx.Module, prompts: Any, n_new: int, *, key: jax.Array,
              vocab_limit: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              prompt_lengths: Any = None, seq_len: int | None = None,
              eod_id: int | None = None) -> jax.Array:
    """Left-to-right sampling from a causal model: n_new tokens per row -> [batch, n_new] int32.

    prompts: [batch, prompt_len] int, right-padded; prompt_lengths: [batch] real lengths, each
    >= 1 (the model needs a token to predict from; use eod for "no prompt"), None = all
    prompt_len. Row b is continued right after its own prompt (module docstring).
    temperature 0 is greedy; top_k 0 is off; top_p in (0, 1], 1 is off. Ids >= vocab_limit are
    never sampled. seq_len: the model's training window; prompt_len + n_new must fit in it.
    eod_id: once a row samples it, the rest of that row is eod (and the loop stops when every
    row has ended); None: always n_new tokens.

    One jitted `lax.while_loop` over a [batch, prompt_len + n_new] buffer; each step runs the
    full forward over the buffer and reads one position per row. There is no KV cache: at our
    sizes (seq_len of a few hundred) the recomputation is cheap and the model keeps one code path.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    _check_vocab_limit(model, vocab_limit)
    prompts, lengths = _check_prompts(prompts, prompt_lengths, n_new, min_length=1,
                                      vocab_limit=vocab_limit, seq_len=seq_len)
    buffer = _pad_to(prompts, prompts.shape[1] + n_new)
    if eod_id is not None:  # rows that end early leave their unwritten positions as eod
        real = np.arange(buffer.shape[1]) < lengths[:, None]
        buffer = np.where(real, buffer, eod_id).astype(np.int32)
    graphdef, state = nnx.split(model)
    return _sample_ar_jit(graphdef, state, jnp.asarray(buffer), jnp.asarray(lengths), key,
                          n_new=n_new, temperature=float(temperature), top_k=int(top_k),
                          top_p=float(top_p), vocab_limit=vocab_limit,
                          eod_id=None if eod_id is None else int(eod_id))


# --- masked diffusion -------------------------------------------------------------------------

def _ancestral_step(model, tokens, revealed_at, hidden, i, key, *, steps, temperature,
                    vocab_limit):
    """One step t -> s = t - 1/steps of the masked ancestral sampler (MDLM / SMDM).

    Each still-masked position is revealed with probability (t - s) / t (the reverse of the
    linear schedule alpha_t = 1 - t), its token drawn from the model's softmax there. The
    reveal coins do not depend on the model, so a step that reveals nothing skips the forward.
    """
    t = (steps - i) / steps
    s = (steps - i - 1) / steps
    reveal_key, token_key = jax.random.split(jax.random.fold_in(key, i))
    # At the last step t = 1/steps, s = 0: the probability is exactly 1, u < 1 always.
    reveal = hidden & (jax.random.uniform(reveal_key, hidden.shape) < (t - s) / t)

    def update(tokens, revealed_at):
        logits = restrict_vocab(model(tokens), vocab_limit)
        drawn = sample_logits(logits, token_key, temperature=temperature)
        return jnp.where(reveal, drawn, tokens), jnp.where(reveal, i, revealed_at)

    return jax.lax.cond(jnp.any(reveal), update, lambda *a: a, tokens, revealed_at)


def _confidence_step(model, tokens, revealed_at, hidden, i, key, *, tokens_per_step,
                     temperature, vocab_limit):
    """One step of confidence-ordered unmasking (the study's LAMBADA generation, PAPER.md §10).

    Predicts every masked position and commits the tokens_per_step with the highest confidence,
    the max softmax probability of the model's distribution there (leftmost first among ties).
    The committed token is the argmax at temperature 0, else drawn at that temperature.
    """
    logits = restrict_vocab(model(tokens), vocab_limit)
    confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)  # [batch, buffer]
    drawn = sample_logits(logits, jax.random.fold_in(key, i), temperature=temperature)
    score = jnp.where(hidden, confidence, -1.0)  # probabilities are >= 0: hidden ones first
    rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1)
    commit = hidden & (rank < tokens_per_step)
    return jnp.where(commit, drawn, tokens), jnp.where(commit, i, revealed_at)


@partial(jax.jit, static_argnames=("graphdef", "n_new", "steps", "method", "tokens_per_step",
                                   "temperature", "vocab_limit", "mask_id"))
def _sample_diffusion_jit(graphdef: nnx.GraphDef, state: nnx.State, buffer: jax.Array,
                          lengths: jax.Array, key: jax.Array, *, n_new: int, steps: int,
                          method: str, tokens_per_step: int, temperature: float,
                          vocab_limit: int, mask_id: int) -> tuple[jax.Array, jax.Array]:
    TRACE_COUNTS[f"diffusion-{method}"] += 1
    model = nnx.merge(graphdef, state)
    positions = jnp.arange(buffer.shape[1])[None, :]
    start = lengths[:, None]
    region = (positions >= start) & (positions < start + n_new)  # [batch, buffer]
    tokens = jnp.where(positions < start, buffer, mask_id)  # prompt, then MASK to the end
    revealed_at = jnp.full(buffer.shape, -1, jnp.int32)  # step that revealed it; -1: masked
    if method == "ancestral":
        step_fn = partial(_ancestral_step, steps=steps, temperature=temperature,
                          vocab_limit=vocab_limit)
    else:
        step_fn = partial(_confidence_step, tokens_per_step=tokens_per_step,
                          temperature=temperature, vocab_limit=vocab_limit)

    def keep_going(carry):
        i, _, revealed_at = carry
        return (i < steps) & jnp.any(region & (revealed_at < 0))

    def step(carry):
        i, tokens, revealed_at = carry
        hidden = region & (revealed_at < 0)
        return (i + 1, *step_fn(model, tokens, revealed_at, hidden, i, key))

    _, tokens, revealed_at = jax.lax.while_loop(keep_going, step,
                                                (jnp.int32(0), tokens, revealed_at))
    return _region(tokens, lengths, n_new), _region(revealed_at, lengths, n_new)


def sample_diffusion(model: nnx.Module, prompts: Any, n_new: int, *, key: jax.Array, steps: int,
                     mask_id: int, vocab_limit: int, method: str = "ancestral",
                     tokens_per_step: int | None = None, temperature: float = 1.0,
                     prompt_lengths: Any = None, seq_len: int | None = None,
                     return_reveal_step: bool = False
                     ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Masked-diffusion generation of n_new tokens per row -> [batch, n_new] int32.

    prompts: [batch, prompt_len] int, right-padded (prompt_len may be 0); prompt_lengths:
    [batch] real lengths >= 0, None = all prompt_len. Prompt tokens stay fixed and visible; the
    n_new positions after each row's prompt start as MASK; later positions up to the buffer's
    end (seq_len when given, else prompt_len + n_new) are MASK padding, never revealed.

    method "ancestral": the masked ancestral sampler over `steps` equal steps of t from 1 to 0;
    a masked position is revealed with probability (t - s) / t at each step, its token drawn
    from the model's softmax at `temperature` (0: argmax). All are revealed by the last step.
    method "confidence": each step commits the tokens_per_step (default ceil(n_new / steps))
    masked positions of highest confidence (max softmax probability); steps * tokens_per_step
    must reach n_new. Either loop stops once every position is revealed.

    return_reveal_step: also return [batch, n_new] int32, the step (0-based) at which each
    position was revealed.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
    if tokens_per_step is None:
        tokens_per_step = math.ceil(n_new / steps)
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1 (None = ceil(n_new / steps)), got "
                         f"{tokens_per_step}")
    if method == "confidence" and steps * tokens_per_step < n_new:
        raise ValueError(f"steps * tokens_per_step = {steps} * {tokens_per_step} must be >= "
                         f"n_new = {n_new}, or positions stay masked")
    _check_vocab_limit(model, vocab_limit)
    rows = _model_vocab(model)
    if mask_id < vocab_limit or (rows is not None and mask_id >= rows):
        raise ValueError(f"mask_id must be in [vocab_limit={vocab_limit}, "
                         f"{rows or 'model vocab'}), got {mask_id}")
    prompts, lengths = _check_prompts(prompts, prompt_lengths, n_new, min_length=0,
                                      vocab_limit=vocab_limit, seq_len=seq_len)
    buffer = _pad_to(prompts, prompts.shape[1] + n_new if seq_len is None else seq_len)
    graphdef, state = nnx.split(model)
    tokens, reveal_step = _sample_diffusion_jit(
        graphdef, state, jnp.asarray(buffer), jnp.asarray(lengths), key, n_new=n_new,
        steps=int(steps), method=method, tokens_per_step=int(tokens_per_step),
        temperature=float(temperature), vocab_limit=vocab_limit, mask_id=int(mask_id))
    return (tokens, reveal_step) if return_reveal_step else tokens


# --- text in, text out ------------------------------------------------------------------------

def generate(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], *, objective: Objective,
             n_new: int, seed: int, seq_len: int | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, steps: int | None = None,
             method: str = "ancestral", tokens_per_step: int | None = None,
             stop_at_eod: bool = True) -> list[str]:
    """Continuations of `prompts` as text (without the prompt), one per prompt, in one batch.

    Each prompt is encoded after an end-of-document id, since every document of the train
    stream follows one; an empty prompt is just that start token. MASK is the first id after
    the tokenizer's (`tokenizer.vocab_size`), which also bounds the sampled ids. A continuation
    is decoded up to its first eod. The objective's decoding picks the sampler: next-token
    (`sample_ar`; temperature, top_k, top_p, stop_at_eod apply) or unmasking
    (`sample_diffusion`; temperature, steps (default n_new), method, tokens_per_step apply).
    seq_len: the model's training window (diffusion pads its buffer to it with MASK). The same
    seed gives the same text.
    """
    if objective.decoding is None:
        raise ValueError(f"objective must be one of {decoded_objective_names()}, got "
                         f"{objective.name!r}")
    causal = getattr(getattr(model, "cfg", None), "causal", None)
    if causal is not None and causal != objective.causal:
        raise ValueError(f"objective={objective.name!r} needs a model with causal="
                         f"{objective.causal}, got causal={causal}")
    if len(prompts) == 0:
        return []
    ids = [[tokenizer.eod_id, *tokenizer.encode(p)] for p in prompts]
    lengths = np.array([len(x) for x in ids], np.int32)
    batch = np.zeros((len(ids), int(lengths.max())), np.int32)
    for row, x in zip(batch, ids, strict=True):
        row[:len(x)] = x
    key = jax.random.key(seed)
    vocab = tokenizer.vocab_size
    if objective.decoding is Decoding.NEXT_TOKEN:
        out = sample_ar(model, batch, n_new, key=key, vocab_limit=vocab, temperature=temperature,
                        top_k=top_k, top_p=top_p, prompt_lengths=lengths, seq_len=seq_len,
                        eod_id=tokenizer.eod_id if stop_at_eod else None)
    else:
        steps = n_new if steps is None else steps
        out = sample_diffusion(model, batch, n_new, key=key, steps=steps, mask_id=vocab,
                               vocab_limit=vocab, method=method, tokens_per_step=tokens_per_step,
                               temperature=temperature, prompt_lengths=lengths, seq_len=seq_len)
    return [tokenizer.decode(row) for row in np.asarray(out).tolist()]
