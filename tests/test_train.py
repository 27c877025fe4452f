"""Train loop pieces: schedule, optimizer, step, evaluation, and one end-to-end run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dvar_jax.configs.base import get_config
from dvar_jax.model.transformer import TransformerConfig
from dvar_jax.objectives import get_objective
from dvar_jax.objectives.ar import ar_sequence_losses
from dvar_jax.step import (
    create_train_state,
    evaluate,
    lr_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
)
from dvar_jax.train import train

TINY = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, head_dim=16)


def _tokens(batch=4, seq=9, seed=0):
    return np.random.RandomState(seed).randint(0, 100, (batch, seq)).astype(np.int32)


def test_schedule_is_linear_warmup_then_cosine_to_a_tenth():
    cfg = get_config().train
    cfg.peak_lr, cfg.min_lr_ratio, cfg.warmup_fraction = 1e-3, 0.1, 0.1
    n = 200
    sched = lr_schedule(cfg, n)
    warmup = 20

    def expected(step):  # Megatron's formula, written out
        if step < warmup:
            return 1e-3 * step / warmup
        progress = (step - warmup) / (n - warmup)
        return 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))

    for step in (0, 1, 10, 19, 20, 21, 100, 150, 199, 200):
        assert float(sched(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-9), step


def test_optimizer_matches_a_float64_adamw_with_clipping_and_decay_mask():
    cfg = get_config().train
    cfg.peak_lr, cfg.warmup_fraction, cfg.grad_clip, cfg.weight_decay = 1e-2, 0.0, 1.0, 0.1
    n = 10
    tx = make_optimizer(cfg, n)
    rng = np.random.RandomState(0)
    params = {"w": rng.randn(3, 4).astype(np.float32), "scale": rng.randn(4).astype(np.float32)}
    grads = [{"w": 3 * rng.randn(3, 4).astype(np.float32),
              "scale": rng.randn(4).astype(np.float32)} for _ in range(3)]
    state = tx.init(params)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)

    # Reference: clip by global norm, Adam moments with bias correction, decoupled decay on the
    # 2-D weight only, learning rate from the same warmup-free cosine schedule.
    ref = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in ref.items()}
    v2 = {k: np.zeros_like(v) for k, v in ref.items()}
    for t, g in enumerate(grads, start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        norm = math.sqrt(sum((x**2).sum() for x in g.values()))
        g = {k: x * min(1.0, 1.0 / norm) for k, x in g.items()}
        lr = float(lr_schedule(cfg, n)(t - 1))
        for k in ref:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v2[k] = 0.95 * v2[k] + 0.05 * g[k] ** 2
            update = (m[k] / (1 - 0.9**t)) / (np.sqrt(v2[k] / (1 - 0.95**t)) + 1e-8)
            if ref[k].ndim >= 2:
                update = update + 0.1 * ref[k]
            ref[k] = ref[k] - lr * update
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["ar", "diffusion"])
def test_train_step_is_deterministic_and_learns_a_fixed_batch(objective):
    cfg = get_config().train
    cfg.peak_lr, cfg.warmup_fraction = 3e-3, 0.0
    model_cfg = TransformerConfig(causal=objective == "ar", **TINY)
    tx = make_optimizer(cfg, 40)
    tokens = _tokens(8, 17)
    losses = []
    for _ in range(2):
        graphdef, state, _ = create_train_state(model_cfg, tx, seed=3)
        step = make_train_step(graphdef, get_objective(objective), tx, mask_id=100, seed=3)
        run = []
        for _ in range(40):
            state, metrics = step(state, tokens)
            run.append(float(metrics["loss"]))
        losses.append(run)
        assert int(state.step) == 40
    assert losses[0] == losses[1]  # bitwise: randomness comes from (seed, step) only
    assert np.mean(losses[0][-5:]) < np.mean(losses[0][:5]) - 0.5


def test_evaluate_averages_every_token_once_whatever_the_batch_size():
    model_cfg = TransformerConfig(causal=True, **TINY)
    tx = make_optimizer(get_config().train, 10)
    graphdef, state, _ = create_train_state(model_cfg, tx, seed=0)
    windows = _tokens(7, 9, seed=1)
    eval_step = make_eval_step(graphdef, get_objective("ar"), mask_id=100, num_mc=1)
    # Reference: float64 log-softmax CE of every position of every window, averaged.
    logits = np.asarray(nnx.merge(graphdef, state.params)(windows[:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1).mean()
    for batch_size in (1, 3, 7, 10):  # 3 and 10 need a padded last batch
        got = evaluate(eval_step, state.params, windows, batch_size, seed=0)
        assert got == pytest.approx(nll, rel=1e-5)
    per_seq = ar_sequence_losses(nnx.merge(graphdef, state.params), jnp.asarray(windows))
    assert float(per_seq.mean()) / (windows.shape[1] - 1) == pytest.approx(nll, rel=1e-5)


def test_diffusion_evaluation_is_fixed_by_its_seed():
    model_cfg = TransformerConfig(causal=False, **TINY)
    tx = make_optimizer(get_config().train, 10)
    graphdef, state, _ = create_train_state(model_cfg, tx, seed=0)
    windows = _tokens(6, 9, seed=2)
    eval_step = make_eval_step(graphdef, get_objective("diffusion"), mask_id=100, num_mc=4)
    a = evaluate(eval_step, state.params, windows, 4, seed=5)
    b = evaluate(make_eval_step(graphdef, get_objective("diffusion"), 100, 4), state.params,
                 windows, 4, seed=5)
    c = evaluate(eval_step, state.params, windows, 4, seed=6)
    assert a == b and a != c
    assert abs(a - math.log(128)) < 0.5  # an untrained model's ELBO is near ln V per token


@pytest.fixture(scope="module")
def tiny_run(text_data_cfg, tmp_path_factory):
    cfg = get_config()
    cfg.data = text_data_cfg
    cfg.model.name = "cpu-xs"
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.unique_tokens = 4_000
    cfg.data.epochs = 3
    cfg.data.seq_len = 32
    cfg.data.validation_tokens = 1_000
    cfg.train.batch_size = 8
    cfg.train.peak_lr = 3e-3
    cfg.train.log_every = 5
    cfg.eval.every_epochs = 1.0
    cfg.objective = "diffusion"
    workdir = tmp_path_factory.mktemp("tiny_run")
    return cfg, workdir, train(cfg, workdir, progress=False)


def test_a_run_writes_config_metrics_summary_and_tensorboard(tiny_run):
    cfg, workdir, summary = tiny_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    windows = (cfg.data.unique_tokens - 1) // cfg.data.seq_len
    steps = 3 * windows // 8
    assert summary.steps == steps
    assert [r["step"] for r in train_records] == [*range(5, steps + 1, 5), steps][:len(
        train_records)]
    for r in train_records:
        assert set(r) >= {"loss", "lr", "grad_norm", "tokens", "epoch", "tokens_per_s", "mfu"}
        assert r["tokens"] == r["step"] * 8 * 32
        assert r["epoch"] == pytest.approx(r["step"] * 8 / windows)
    assert eval_records[0]["step"] == 0 and eval_records[-1]["step"] == steps
    assert len(eval_records) >= 4  # before training, after each epoch
    assert summary.best_val_loss == min(r["val_loss"] for r in eval_records)
    assert summary.final_val_loss == eval_records[-1]["val_loss"]
    assert summary.best_val_loss < eval_records[0]["val_loss"]
    assert json.loads((workdir / "config.json").read_text())["objective"] == "diffusion"
    assert json.loads((workdir / "summary.json").read_text())["steps"] == steps
    assert list((workdir / "tb").glob("events.out.tfevents.*"))


def test_a_run_is_reproducible_from_its_config(tiny_run, tmp_path):
    cfg, workdir, summary = tiny_run
    again = train(cfg, tmp_path, progress=False)
    assert again.best_val_loss == summary.best_val_loss
    first = [r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
             if r["kind"] == "train"]
    second = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
              if r["kind"] == "train"]
    assert first == second
