"""Log-likelihood scoring of (context, continuation) token pairs with one AR or masked-diffusion
model, as the study scores its downstream tasks (PAPER.md §6).

Contract: `Scorer.loglikelihood` returns (log p(continuation | context), is_greedy) per
request, `loglikelihood_with_stderr` (log-likelihood, Monte-Carlo standard error), and
`greedy_continuations` the greedy fill of n tokens after each context. Next-token objectives
(AR) are scored exactly; unmasking objectives (masked diffusion) by `diffusion_method`: `mc`, the
study's Monte-Carlo ELBO estimate (a lower bound), or `chain_rule`, exact for left-to-right
order. A context too long for the window is left-truncated; a continuation that cannot fit is
an error. A result depends on the seed and the request's index in the call, never on
batch_size or on the other requests. Argmaxes range over the tokenizer's ids (< mask_id);
log-probabilities are normalised over the whole embedding table, as the training loss is.

The estimators, the packing into fixed [batch_size, seq_len] rows, the keys and the memory use
are derived in docs/evaluation.md ("Scoring in detail").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dvar_jax.objectives import Decoding, Objective, decoded_objective_names
from dvar_jax.objectives.diffusion import stratified_times

DIFFUSION_METHODS = ("mc", "chain_rule")
# The study's `--sampling_eps`: p = t, no floor (PAPER.md §6).
SAMPLING_EPS = 0.0

Request = tuple[Sequence[int], Sequence[int]]


def check_diffusion_method(method: str) -> None:
    """Raises ValueError unless `method` is one of DIFFUSION_METHODS."""
    if method not in DIFFUSION_METHODS:
        raise ValueError(f"diffusion_method={method!r} is not one of {DIFFUSION_METHODS}")


# ---------------------------------------------------------------- randomness


def request_key(seed: int | jax.Array, index: int | jax.Array) -> jax.Array:
    """The key of request `index` of a call: fold_in(key(seed), index)."""
    return jax.random.fold_in(jax.random.key(seed), index)


def mc_draws(key: jax.Array, num_mc: int, seq_len: int,
             eps: float = SAMPLING_EPS) -> tuple[jax.Array, jax.Array]:
    """One request's mask draws: (p [num_mc], candidate masks [num_mc, seq_len] bool).

    t_i = (u0 + i / num_mc) mod 1 (u0 from the key's first half), p_i = (1 - eps) t_i + eps;
    mask i is Bernoulli(p_i) at every position, later restricted to the continuation.
    """
    t_key, mask_key = jax.random.split(key)
    p = (1.0 - eps) * stratified_times(t_key, num_mc) + eps
    masks = jax.vmap(
        lambda i, p_i: jax.random.bernoulli(jax.random.fold_in(mask_key, i), p_i, (seq_len,))
    )(jnp.arange(num_mc), p)
    return p, masks


# ---------------------------------------------------------------- compiled kernels
# The model's structure (graphdef) is static and hashable, so every Scorer of the same model
# shape shares one compilation per batch shape.


@partial(jax.jit, static_argnames=("graphdef", "vocab_limit"))
def _target_logprobs(graphdef, state, tokens: jax.Array, targets: jax.Array, *,
                     vocab_limit: int) -> tuple[jax.Array, jax.Array]:
    """tokens, targets [B, L] -> (log p(targets) [B, L] float32, targets == argmax [B, L])."""
    logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = target_logits - jax.nn.logsumexp(logits, axis=-1)
    return logp, jnp.argmax(logits[..., :vocab_limit], axis=-1) == targets


@partial(jax.jit, static_argnames=("graphdef", "num_mc", "mask_id"))
def _mc_draw_logliks(graphdef, state, clean: jax.Array, scored: jax.Array, indices: jax.Array,
                     seed: jax.Array, *, num_mc: int, mask_id: int) -> jax.Array:
    """Per-draw estimates -sum_{masked} CE / p: [B, num_mc].

    clean: [B, L] ids (context, continuation, MASK padding); scored: [B, L] bool, the
    continuation's positions; indices: [B] request indices (keys).
    """
    model = nnx.merge(graphdef, state)
    keys = jax.vmap(lambda i: request_key(seed, i))(indices)
    p, masks = jax.vmap(lambda k: mc_draws(k, num_mc, clean.shape[1]))(keys)

    def one_draw(i):
        masked = masks[:, i] & scored
        p_i = p[:, i][:, None]
        # where, not a product: at p = 0 nothing is masked and 1/p = inf must not reach the sum.
        weights = jnp.where(masked, 1.0 / p_i, 0.0).astype(jnp.float32)
        return -model.sequence_losses(jnp.where(masked, mask_id, clean), clean, weights)

    return jax.lax.map(one_draw, jnp.arange(num_mc)).T


@partial(jax.jit, static_argnames=("graphdef", "autoregressive", "vocab_limit", "mask_id"))
def _greedy_fill(graphdef, state, buf: jax.Array, start: jax.Array, n: jax.Array,
                 steps: jax.Array, *, autoregressive: bool, vocab_limit: int,
                 mask_id: int) -> jax.Array:
    """Fills buf[b, start_b : start_b + n_b] greedily in `steps` (= max n) model calls.

    buf: [B, L] (AR: context then anything; diffusion: context then MASK to the end);
    start, n: [B]. Rows with n_b < steps stop changing after n_b steps. -> buf [B, L].
    """
    model = nnx.merge(graphdef, state)
    batch, seq_len = buf.shape
    rows = jnp.arange(batch)
    positions = jnp.arange(seq_len)

    def ar_step(s, buf):
        logits = model(buf)
        # Clipped: a finished row's indices may point past the window; it writes its own value.
        at = jnp.clip(start + s, 0, seq_len - 1)
        pred = jnp.argmax(logits[rows, jnp.clip(start + s - 1, 0, seq_len - 1), :vocab_limit],
                          axis=-1)
        return buf.at[rows, at].set(jnp.where(s < n, pred, buf[rows, at]))

    def diffusion_step(s, buf):
        logits = model(buf).astype(jnp.float32)
        real = logits[..., :vocab_limit]
        pred = jnp.argmax(real, axis=-1)  # [B, L]
        confidence = jnp.max(real, axis=-1) - jax.nn.logsumexp(logits, axis=-1)  # log max prob
        open_ = ((buf == mask_id) & (positions >= start[:, None])
                 & (positions < (start + n)[:, None]))
        at = jnp.argmax(jnp.where(open_, confidence, -jnp.inf), axis=-1)  # [B]
        return buf.at[rows, at].set(jnp.where(s < n, pred[rows, at], buf[rows, at]))

    return jax.lax.fori_loop(0, steps, ar_step if autoregressive else diffusion_step, buf)


# ---------------------------------------------------------------- packing (host side)


def fit_context(context: Sequence[int], n_continuation: int, room: int) -> list[int]:
    """The context's last room - n_continuation tokens (all of it when it fits)."""
    keep = room - n_continuation
    if keep < 0:
        raise ValueError(f"a continuation of {n_continuation} tokens does not fit the window; "
                         f"allowed: at most {room}")
    return list(context)[len(context) - keep:] if len(context) > keep else list(context)


def _run_batched(fn: Callable[..., tuple | jax.Array], arrays: Sequence[np.ndarray],
                 batch_size: int) -> list[np.ndarray]:
    """fn over [batch_size]-row slices of `arrays` (the last padded with its first row):
    outputs concatenated over all rows, padding dropped."""
    n = len(arrays[0])
    outs: list[list[np.ndarray]] = []
    for lo in range(0, n, batch_size):
        chunk = [a[lo:lo + batch_size] for a in arrays]
        short = batch_size - len(chunk[0])
        if short:
            chunk = [np.concatenate([c, np.repeat(c[:1], short, axis=0)]) for c in chunk]
        result = fn(*chunk)
        result = result if isinstance(result, tuple) else (result,)
        outs.append([np.asarray(r)[:batch_size - short] for r in result])
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


class Scorer:
    """Scores (context ids, continuation ids) requests with one AR or masked-diffusion model.

    model: `model(tokens [B, L]) -> logits [B, L, V]` (and, for diffusion `mc`,
    `model.sequence_losses(tokens, targets, weights) -> [B]`), an nnx Module; mask_id: the MASK
    id (= the tokenizer's vocab size; ids below it are the tokenizer's); seq_len: the window
    (the training sequence length); eod_id: the end-of-document id. The parameters are
    snapshotted (`nnx.split`) at construction: build a new Scorer after further training.
    """

    def __init__(self, model: nnx.Module, objective: Objective, mask_id: int, seq_len: int, *,
                 eod_id: int, batch_size: int = 16, num_mc: int = 32,
                 diffusion_method: str = "mc", seed: int = 0):
        if objective.decoding is None:
            raise ValueError(f"objective={objective.name!r} is not one of "
                             f"{decoded_objective_names()}")
        check_diffusion_method(diffusion_method)
        for name, value, least in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                                   ("num_mc", num_mc, 1), ("mask_id", mask_id, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r} must be an integer >= {least}")
        if not 0 <= eod_id < mask_id:
            raise ValueError(f"eod_id={eod_id!r} must be a tokenizer id in [0, {mask_id})")
        cfg = getattr(model, "cfg", None)
        if cfg is not None and not mask_id < getattr(cfg, "vocab_size", mask_id + 1):
            raise ValueError(f"mask_id={mask_id} must be below the model's vocab_size="
                             f"{cfg.vocab_size} (its embedding rows)")
        if cfg is not None and getattr(cfg, "causal", objective.causal) != objective.causal:
            raise ValueError(f"objective={objective.name!r} needs a "
                             f"{'causal' if objective.causal else 'bidirectional'} model, got "
                             f"causal={cfg.causal}")
        self.objective, self.diffusion_method = objective, diffusion_method
        self._next_token = objective.decoding is Decoding.NEXT_TOKEN
        self.mask_id, self.seq_len, self.eod_id = mask_id, seq_len, eod_id
        self.batch_size, self.num_mc, self.seed = batch_size, num_mc, seed
        self._graphdef, self._state = nnx.split(model)

    # ------------------------------------------------------------ public API

    @property
    def room(self) -> int:
        """Window positions a greedy fill can use for context + new tokens (a next-token model
        keeps one for the start token)."""
        return self.seq_len - 1 if self._next_token else self.seq_len

    def loglikelihood(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """Per request (log p(continuation | context), is_greedy), lm-eval's `loglikelihood`."""
        logliks, _, greedy = self._score(requests, want_greedy=True)
        return [(float(ll), bool(g)) for ll, g in zip(logliks, greedy, strict=True)]

    def loglikelihood_with_stderr(self, requests: Sequence[Request]) -> list[tuple[float, float]]:
        """Per request (log-likelihood, its Monte Carlo standard error): the error is 0 for the
        exact methods (AR, chain_rule) and NaN for mc with num_mc = 1. No greedy check."""
        logliks, stderrs, _ = self._score(requests, want_greedy=False)
        return [(float(ll), float(se)) for ll, se in zip(logliks, stderrs, strict=True)]

    def greedy_continuation(self, context: Sequence[int], n_tokens: int) -> list[int]:
        """The n_tokens greedy continuation of `context`: next-token models take the argmax token
        by token; unmasking models commit the most confident masked position per step
        (docs/evaluation.md)."""
        return self.greedy_continuations([(context, n_tokens)])[0]

    def greedy_continuations(self, prompts: Sequence[tuple[Sequence[int], int]]
                             ) -> list[list[int]]:
        """`greedy_continuation` of each (context, n_tokens), batched."""
        ar, room = self._next_token, self.room
        buf = np.full((len(prompts), self.seq_len), self.eod_id if ar else self.mask_id,
                      np.int32)
        start = np.zeros(len(prompts), np.int32)
        n = np.zeros(len(prompts), np.int32)
        for i, (context, n_tokens) in enumerate(prompts):
            if not isinstance(n_tokens, int | np.integer) or n_tokens < 0:
                raise ValueError(f"n_tokens={n_tokens!r} must be an integer >= 0")
            self._check_ids(i, context)
            ctx = fit_context(context, n_tokens, room)
            ctx = ctx if ctx or not ar else [self.eod_id]
            buf[i, :len(ctx)], start[i], n[i] = ctx, len(ctx), n_tokens
        out = np.zeros((0, self.seq_len), np.int32)
        if len(prompts):
            fill = partial(_greedy_fill, self._graphdef, self._state, autoregressive=ar,
                           vocab_limit=self.mask_id, mask_id=self.mask_id)
            out, = _run_batched(
                lambda b, s, k: fill(b, s, k, jnp.int32(k.max(initial=0))), (buf, start, n),
                self.batch_size)
        return [out[i, start[i]:start[i] + n[i]].tolist() for i in range(len(prompts))]

    # ------------------------------------------------------------ scoring paths

    def _check_ids(self, index: int, ids: Sequence[int]) -> None:
        """Token ids must be the tokenizer's: [0, mask_id)."""
        bad = [t for t in ids if not 0 <= t < self.mask_id]
        if bad:
            raise ValueError(f"request {index} has token id {bad[0]}; allowed: tokenizer ids in "
                             f"[0, {self.mask_id})")

    def _score(self, requests: Sequence[Request], want_greedy: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(log-likelihoods [R], standard errors [R], is_greedy [R] or None)."""
        requests = [(list(ctx), list(cont)) for ctx, cont in requests]
        for i, (ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation; allowed: >= 1 token")
            self._check_ids(i, ctx + cont)
        if not requests:
            return np.zeros(0), np.zeros(0), np.zeros(0, bool)
        if self._next_token:
            logliks, greedy = self._ar(requests)
            return logliks, np.zeros(len(requests)), greedy
        if self.diffusion_method == "mc":
            logliks, stderrs = self._mc(requests)
        else:
            logliks, stderrs = self._chain_rule(requests), np.zeros(len(requests))
        greedy = None
        if want_greedy:
            # The same truncated context the scoring used: fit_context is applied again inside.
            fills = self.greedy_continuations([(ctx, len(cont)) for ctx, cont in requests])
            greedy = np.array([f == cont for f, (_, cont) in zip(fills, requests, strict=True)])
        return logliks, stderrs, greedy

    def _ar(self, requests: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """Exact AR log-likelihoods and greedy flags."""
        L = self.seq_len
        inputs = np.full((len(requests), L), self.eod_id, np.int32)
        targets = np.full((len(requests), L), self.eod_id, np.int32)
        scored = np.zeros((len(requests), L), bool)
        for i, (ctx, cont) in enumerate(requests):
            # The first continuation token needs one context token before it: at most L.
            fit_context([], len(cont), L)
            full = fit_context(ctx or [self.eod_id], len(cont), L + 1) + cont
            m = len(full) - 1
            inputs[i, :m], targets[i, :m] = full[:-1], full[1:]
            scored[i, m - len(cont):m] = True
        logp, hit = _run_batched(
            partial(_target_logprobs, self._graphdef, self._state, vocab_limit=self.mask_id),
            (inputs, targets), self.batch_size)
        logliks = np.where(scored, logp.astype(np.float64), 0.0).sum(axis=1)
        return logliks, np.all(hit | ~scored, axis=1)

    def _diffusion_rows(self, requests: list[tuple[list[int], list[int]]]
                        ) -> tuple[np.ndarray, np.ndarray]:
        """(clean [R, L]: context, continuation, MASK padding; continuation positions [R, L])."""
        clean = np.full((len(requests), self.seq_len), self.mask_id, np.int32)
        scored = np.zeros((len(requests), self.seq_len), bool)
        for i, (ctx, cont) in enumerate(requests):
            ctx = fit_context(ctx, len(cont), self.seq_len)
            clean[i, :len(ctx) + len(cont)] = ctx + cont
            scored[i, len(ctx):len(ctx) + len(cont)] = True
        return clean, scored

    def _mc(self, requests: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """The study's Monte Carlo estimate and its standard error, per request."""
        clean, scored = self._diffusion_rows(requests)
        indices = np.arange(len(requests), dtype=np.int32)
        draws, = _run_batched(
            partial(_mc_draw_logliks, self._graphdef, self._state, seed=jnp.int32(self.seed),
                    num_mc=self.num_mc, mask_id=self.mask_id),
            (clean, scored, indices), self.batch_size)
        draws = draws.astype(np.float64)
        if self.num_mc == 1:
            return draws[:, 0], np.full(len(requests), np.nan)
        return draws.mean(axis=1), draws.std(axis=1, ddof=1) / np.sqrt(self.num_mc)

    def _chain_rule(self, requests: list[tuple[list[int], list[int]]]) -> np.ndarray:
        """Exact left-to-right log-likelihoods: one row per continuation token."""
        clean, scored = self._diffusion_rows(requests)
        owner, rows, targets, at = [], [], [], []
        for i in range(len(requests)):
            positions = np.flatnonzero(scored[i])
            for k in positions:
                row = clean[i].copy()
                row[k:positions[-1] + 1] = self.mask_id
                owner.append(i)
                rows.append(row)
                targets.append(clean[i])
                at.append(k)
        logp, _ = _run_batched(
            partial(_target_logprobs, self._graphdef, self._state, vocab_limit=self.mask_id),
            (np.stack(rows), np.stack(targets)), self.batch_size)
        token_logp = logp[np.arange(len(rows)), np.array(at)].astype(np.float64)
        return np.bincount(np.array(owner), weights=token_logp, minlength=len(requests))
