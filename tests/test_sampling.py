"""Samplers: AR (temperature, top-k, top-p) and masked diffusion (ancestral, confidence)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.eval import sampling
from dvar_jax.eval.sampling import generate, sample_ar, sample_diffusion, top_p_filter
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import get_objective

VOCAB = 64  # embedding rows
LIMIT = 60  # the tokenizer's ids; MASK = 60, rows 61..63 padding
MASK = LIMIT
SEQ = 32


def tiny(causal: bool) -> Transformer:
    # init_std 0.3: peaked logits, so greedy choices are not near-ties that float noise decides
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, head_dim=16,
                            causal=causal, init_std=0.3)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ar_model():
    return tiny(causal=True)


@pytest.fixture(scope="module")
def diff_model():
    return tiny(causal=False)


class FixedLogits(nnx.Module):
    """Input-independent fake: logits[b, s] = table (shape [vocab]) or table[s] ([seq, vocab])."""

    def __init__(self, table):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, tokens):
        table = self.table[...]
        if table.ndim == 2:
            table = table[:tokens.shape[1]]
        return jnp.broadcast_to(table, (*tokens.shape, table.shape[-1]))


class PromptSum(nnx.Module):
    """Fake whose every prediction is (tokens[:, 0] + tokens[:, 1]) mod LIMIT, peaked."""

    def __init__(self):
        self.scale = nnx.Param(jnp.float32(20.0))

    def __call__(self, tokens):
        target = (tokens[:, 0] + tokens[:, 1]) % LIMIT
        logits = self.scale[...] * jax.nn.one_hot(target, VOCAB)
        return jnp.broadcast_to(logits[:, None], (*tokens.shape, VOCAB))


class PositionId(nnx.Module):
    """Fake whose prediction at position s is token s (mod LIMIT), peaked."""

    def __init__(self):
        self.scale = nnx.Param(jnp.float32(20.0))

    def __call__(self, tokens):
        target = jnp.arange(tokens.shape[1]) % LIMIT
        return jnp.broadcast_to(self.scale[...] * jax.nn.one_hot(target, VOCAB),
                                (*tokens.shape, VOCAB))


def known_logits(seed=0):
    """A fixed [VOCAB] logit vector over the real ids, with huge logits on MASK and padding."""
    logits = np.random.default_rng(seed).normal(0, 1.5, VOCAB).astype(np.float32)
    logits[LIMIT:] = 50.0  # would dominate if the samplers did not exclude them
    return logits


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def assert_frequencies(samples, probs):
    """Empirical frequencies of `samples` match `probs` within 5 standard errors per id."""
    n = samples.size
    freq = np.bincount(samples.ravel(), minlength=probs.size)[:probs.size] / n
    tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3
    assert np.all(np.abs(freq - probs) <= tol), np.abs(freq - probs) - tol


PROMPTS = np.array([[1, 5, 9, 4], [1, 7, 0, 0]], np.int32)
LENGTHS = np.array([4, 2], np.int32)


# --- AR ---------------------------------------------------------------------------------------

def test_ar_seed_gives_same_text_another_seed_differs_one_compile(ar_model):
    run = lambda seed: np.asarray(sample_ar(ar_model, PROMPTS, 12, key=jax.random.key(seed),
                                            vocab_limit=LIMIT, prompt_lengths=LENGTHS))
    a = run(0)
    traces = sampling.TRACE_COUNTS["ar"]
    b, c = run(0), run(1)
    assert traces >= 1 and sampling.TRACE_COUNTS["ar"] == traces  # same shapes: no retrace
    assert a.shape == (2, 12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def greedy_loop(model, prompt, n_new, width):
    """Independent reference: one argmax at a time in plain Python. The sequence sits in a
    zero-padded buffer of a fixed `width` (the causal model ignores what follows), so the
    jitted forward is compiled once rather than once per length."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    seq = np.zeros((1, width), np.int32)
    seq[0, :len(prompt)] = prompt
    for pos in range(len(prompt), len(prompt) + n_new):
        logits = np.asarray(forward(state, jnp.asarray(seq))[0, pos - 1, :LIMIT])
        seq[0, pos] = logits.argmax()
    return seq[0, len(prompt):len(prompt) + n_new].tolist()


def test_ar_greedy_matches_python_loop_and_top_k_1(ar_model):
    n_new = 10
    greedy = np.asarray(sample_ar(ar_model, PROMPTS, n_new, key=jax.random.key(0),
                                  vocab_limit=LIMIT, temperature=0.0, prompt_lengths=LENGTHS))
    for row, length, out in zip(PROMPTS, LENGTHS, greedy, strict=True):
        assert out.tolist() == greedy_loop(ar_model, row[:length].tolist(), n_new, SEQ)
    top1 = sample_ar(ar_model, PROMPTS, n_new, key=jax.random.key(3), vocab_limit=LIMIT,
                     top_k=1, prompt_lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(top1), greedy)


def test_ar_stops_rows_at_eod():
    logits = np.full(VOCAB, -10.0, np.float32)
    logits[1], logits[2] = np.log(0.1), np.log(0.9)  # eod (1) with probability 0.1, else 2
    out = np.asarray(sample_ar(FixedLogits(logits), np.ones((64, 1), np.int32), 8,
                               key=jax.random.key(0), vocab_limit=LIMIT, eod_id=1))
    for row in out:
        ended = np.flatnonzero(row == 1)
        if ended.size:  # everything after the first eod is eod
            assert np.all(row[ended[0]:] == 1)
    assert 0 < (out == 1).any(axis=1).sum() < 64


def test_top_k_samples_only_the_k_most_likely_at_their_renormalised_rates():
    logits = known_logits()
    top = np.argsort(-logits[:LIMIT])[:3]
    out = np.asarray(sample_ar(FixedLogits(logits), np.ones((256, 1), np.int32), 8,
                               key=jax.random.key(0), vocab_limit=LIMIT, top_k=3))
    assert set(np.unique(out)) <= set(top.tolist())
    probs = np.zeros(LIMIT)
    probs[top] = softmax(logits[top])
    assert_frequencies(out, probs)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)  # sorted: ids 1, 3, 2, 0
    logits = jnp.log(jnp.asarray(probs))
    kept = lambda p: set(np.flatnonzero(np.isfinite(np.asarray(top_p_filter(logits, p)))))
    assert kept(0.4) == {1}  # 0.5 >= 0.4
    assert kept(0.75) == {1, 3}  # 0.5 < 0.75 <= 0.8
    assert kept(0.85) == {1, 3, 2}  # 0.8 < 0.85 <= 0.95
    assert kept(0.97) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # Sampled: only ids 1 and 3, at 0.5 / 0.8 and 0.3 / 0.8.
    table = np.full(VOCAB, -np.inf, np.float32)
    table[:4] = np.log(probs)
    out = np.asarray(sample_ar(FixedLogits(table), np.zeros((256, 1), np.int32), 8,
                               key=jax.random.key(1), vocab_limit=LIMIT, top_p=0.75))
    expected = np.zeros(4)
    expected[[1, 3]] = [0.625, 0.375]
    assert_frequencies(out, expected)


def test_ar_temperature_one_matches_the_softmax_and_never_samples_mask_or_padding():
    logits = known_logits(1)
    out = np.asarray(sample_ar(FixedLogits(logits), np.ones((256, 1), np.int32), 8,
                               key=jax.random.key(2), vocab_limit=LIMIT))
    assert out.max() < LIMIT
    assert_frequencies(out, softmax(logits[:LIMIT]))
    greedy = np.asarray(sample_ar(FixedLogits(logits), np.ones((2, 1), np.int32), 4,
                                  key=jax.random.key(2), vocab_limit=LIMIT, temperature=0.0))
    assert np.all(greedy == logits[:LIMIT].argmax())


# --- diffusion --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ancestral", "confidence"])
def test_diffusion_reveals_everything_reproducibly_one_compile(diff_model, method):
    run = lambda seed: sample_diffusion(diff_model, PROMPTS, 10, key=jax.random.key(seed),
                                        steps=4, mask_id=MASK, vocab_limit=LIMIT, method=method,
                                        prompt_lengths=LENGTHS, seq_len=SEQ,
                                        return_reveal_step=True)
    a, steps_a = run(0)
    name = f"diffusion-{method}"
    traces = sampling.TRACE_COUNTS[name]
    (b, _), (c, _) = run(0), run(1)
    assert traces >= 1 and sampling.TRACE_COUNTS[name] == traces  # same shapes: no retrace
    a, steps_a = np.asarray(a), np.asarray(steps_a)
    assert a.shape == steps_a.shape == (2, 10)
    assert a.max() < LIMIT and np.all((steps_a >= 0) & (steps_a < 4))
    np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(a, np.asarray(c))


@pytest.mark.parametrize("method", ["ancestral", "confidence"])
def test_diffusion_prompt_stays_fixed_and_visible(method):
    # Every prediction is prompt[0] + prompt[1]: a sampler that overwrote the prompt after
    # the first step would reveal other tokens in later steps.
    prompts = np.array([[3, 4], [10, 20]], np.int32)
    out, steps = sample_diffusion(PromptSum(), prompts, 8, key=jax.random.key(0), steps=4,
                                  mask_id=MASK, vocab_limit=LIMIT, method=method,
                                  seq_len=16, return_reveal_step=True)
    np.testing.assert_array_equal(np.asarray(out), [[7] * 8, [30] * 8])
    assert len(np.unique(np.asarray(steps))) > 1  # revealed over several steps


def test_diffusion_generates_right_after_each_rows_prompt():
    out = sample_diffusion(PositionId(), PROMPTS, 5, key=jax.random.key(0), steps=2,
                           mask_id=MASK, vocab_limit=LIMIT, method="confidence",
                           temperature=0.0, prompt_lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(out), [[4, 5, 6, 7, 8], [2, 3, 4, 5, 6]])


@pytest.mark.parametrize("per_step", [1, 2])
def test_confidence_commits_in_decreasing_confidence_order(per_step):
    n_prompt, n_new = 2, 7
    rng = np.random.default_rng(0)
    table = rng.normal(0, 1, (SEQ, VOCAB)).astype(np.float32)
    # Position 2 + j gets a peak of height peaks[j]: a higher peak is a higher confidence.
    peaks = np.array([3.0, 9.0, 1.0, 6.0, 12.0, 4.5, 7.5])
    region = np.arange(n_prompt, n_prompt + n_new)
    best = rng.integers(0, LIMIT, n_new)
    table[region, best] = 4.0 + peaks  # above the noise: the argmax is `best`
    table[:, LIMIT:] = 50.0
    out, steps = sample_diffusion(FixedLogits(table), np.ones((1, n_prompt), np.int32), n_new,
                                  key=jax.random.key(0), steps=n_new, mask_id=MASK,
                                  vocab_limit=LIMIT, method="confidence",
                                  tokens_per_step=per_step, temperature=0.0, seq_len=SEQ,
                                  return_reveal_step=True)
    confidence = np.array([softmax(table[p, :LIMIT]).max() for p in region])
    rank = np.argsort(np.argsort(-confidence))
    np.testing.assert_array_equal(np.asarray(steps)[0], rank // per_step)
    np.testing.assert_array_equal(np.asarray(out)[0], best)  # not MASK, whose logit is 50


def test_ancestral_with_one_step_reveals_everything_at_once():
    out, steps = sample_diffusion(FixedLogits(known_logits()), PROMPTS, 9,
                                  key=jax.random.key(0), steps=1, mask_id=MASK,
                                  vocab_limit=LIMIT, return_reveal_step=True)
    assert np.all(np.asarray(steps) == 0) and np.asarray(out).max() < LIMIT


def test_ancestral_matches_the_softmax_and_reveals_uniformly_over_steps():
    logits = known_logits(2)
    n_steps = 4
    out, steps = sample_diffusion(FixedLogits(logits), np.ones((128, 1), np.int32), 16,
                                  key=jax.random.key(0), steps=n_steps, mask_id=MASK,
                                  vocab_limit=LIMIT, return_reveal_step=True)
    assert np.asarray(out).max() < LIMIT  # huge MASK and padding logits are ignored
    assert_frequencies(np.asarray(out), softmax(logits[:LIMIT]))
    # Linear schedule: a position is revealed at each of the S steps with probability 1/S.
    assert_frequencies(np.asarray(steps), np.full(n_steps, 1 / n_steps))


# --- errors and text ----------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_new": 30, "seq_len": SEQ}, r"prompt_len \+ n_new = 4 \+ 30 = 34 exceeds seq_len=32"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\].*got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\].*got 1.5"),
    ({"top_k": -1}, r"top_k must be >= 0.*got -1"),
    ({"temperature": -0.5}, r"temperature must be >= 0.*got -0.5"),
    ({"n_new": 0}, r"n_new must be >= 1, got 0"),
    ({"prompt_lengths": [0, 2]}, r"prompt_lengths must be in \[1, prompt_len=4\], got 0"),
    ({"vocab_limit": 65}, r"vocab_limit must be in \[1, 64\].*got 65"),
])
def test_ar_errors(ar_model, kwargs, match):
    args = {"n_new": 4, "vocab_limit": LIMIT, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_ar(ar_model, PROMPTS, key=jax.random.key(0), **args)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_new": 29, "seq_len": SEQ}, r"prompt_len \+ n_new = 4 \+ 29 = 33 exceeds seq_len=32"),
    ({"steps": 0}, r"steps must be >= 1, got 0"),
    ({"method": "remask"}, r"method must be one of \('ancestral', 'confidence'\), got 'remask'"),
    ({"method": "confidence", "steps": 2, "tokens_per_step": 1},
     r"steps \* tokens_per_step = 2 \* 1 must be >= n_new = 4"),
    ({"tokens_per_step": 0}, r"tokens_per_step must be >= 1.*got 0"),
    ({"mask_id": 3}, r"mask_id must be in \[vocab_limit=60, 64\), got 3"),
    ({"prompts": np.array([[1, MASK]])}, r"prompt token ids must be in \[0, vocab_limit=60\)"),
])
def test_diffusion_errors(diff_model, kwargs, match):
    args = {"prompts": PROMPTS, "n_new": 4, "steps": 4, "mask_id": MASK, "vocab_limit": LIMIT,
            **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_diffusion(diff_model, key=jax.random.key(0), **args)


class CharTokenizer:
    """Stand-in for dvar_jax.data.tokenizer.Tokenizer: ids 2..27 are the letters a..z."""

    eod_id = 1
    vocab_size = 28

    def encode(self, text):
        return [2 + ord(c) - ord("a") for c in text]

    def decode(self, ids):
        out = []
        for i in ids:
            if i == self.eod_id:
                break
            out.append("?" if i >= self.vocab_size else "_" if i < 2 else chr(ord("a") + i - 2))
        return "".join(out)


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_generate_text(ar_model, diff_model, objective):
    model = ar_model if objective == "ar" else diff_model
    prompts = ["abc", "", "hello"]
    run = lambda seed: generate(model, CharTokenizer(), prompts,
                                objective=get_objective(objective), n_new=6,
                                seed=seed, seq_len=SEQ, stop_at_eod=False)
    texts = run(0)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert all("?" not in t for t in texts)  # nothing beyond the tokenizer's ids
    assert run(0) == texts and run(1) != texts
    other = diff_model if objective == "ar" else ar_model
    with pytest.raises(ValueError, match=f"objective='{objective}' needs a model with causal="):
        generate(other, CharTokenizer(), prompts, objective=get_objective(objective), n_new=6,
                 seed=0)
