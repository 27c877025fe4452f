"""Train-step throughput: our AR and diffusion steps against a minimal plain-JAX reference.

For each model size and objective this times two jitted, state-donating train steps on the same
random token batch:

* ours: `dvar_jax.step.make_train_step` on the Flax NNX `Transformer`, exactly as `dvar train`
  builds it (`create_train_state`, `make_optimizer`, the objective from `dvar_jax.objectives`);
* the reference: the same model, objective and optimizer written here in plain JAX + optax
  (parameters a dict of arrays, a pure `forward(params, tokens)`), initialised with a copy of
  our model's initial parameters.

Both run with dropout 0 in float32. The reference draws the diffusion noise level and mask from
the same keys as our step, so the two compute the same loss at every step for both objectives;
the script asserts that before it trusts any timing. Throughput is tokens/s (batch x seq per
step) and MFU is tokens/s x `matmul_flops_per_token` / the float32 matmul peak measured in the
same process (`dvar_jax.perf.measure_matmul_peak`).

Run from the repository root:

    python benchmarks/train_throughput.py            # cpu-xs, cpu-s, cpu-m; batch 32, seq 128
    python benchmarks/train_throughput.py --quick    # smoke run, ~10 s (mostly compiling)
    python benchmarks/train_throughput.py --sizes cpu-l 7M --batch 16 --json out.json
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import ConfigDict

from dvar_jax.configs.base import get_config
from dvar_jax.configs.models import model_shape
from dvar_jax.model.transformer import (
    TransformerConfig,
    count_params,
    ffn_hidden_size,
    padded_vocab_size,
)
from dvar_jax.objectives import get_objective
from dvar_jax.perf import measure_matmul_peak
from dvar_jax.scaling.flops import matmul_flops_per_token
from dvar_jax.sharding import make_mesh, rules_from_config
from dvar_jax.step import create_train_state, make_optimizer, make_train_step

OBJECTIVE_NAMES = ("ar", "diffusion")
# Length of the learning-rate schedule both optimizers are built for: warmup is then one step,
# so every timed step applies a real (non-zero learning rate) update.
SCHEDULE_STEPS = 100
LOSS_RTOL = 1e-4  # |ours - ref| <= LOSS_RTOL * max(1, |loss|) at init
TRAJECTORY_RTOL = 1e-3  # the same after the warm-up updates (Adam amplifies rounding a little)

DEFAULTS = {"sizes": ["cpu-xs", "cpu-s", "cpu-m"], "objectives": list(OBJECTIVE_NAMES),
            "batch": 32, "seq": 128, "vocab": 4096, "warmup": 2, "repeats": 5, "steps": 0,
            "target_s": 1.0}
QUICK = {"sizes": ["32,1,2,16"], "objectives": list(OBJECTIVE_NAMES), "batch": 4, "seq": 32,
         "vocab": 256, "warmup": 2, "repeats": 2, "steps": 2, "target_s": 0.0}


# --------------------------------------------------------------------------------------------
# The reference: the same model, objective and optimizer in plain JAX (no flax).
# --------------------------------------------------------------------------------------------

Params = dict[str, Any]  # {"embed": [V, d], "final_norm": [d], "blocks": [per-layer dicts]}


class RefConfig(NamedTuple):
    """Static shape of the reference model; `vocab` is the padded embedding row count."""

    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn_hidden: int
    causal: bool
    mask_id: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e4


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x: [..., d], scale: [d] -> [..., d]."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x: [batch, seq, heads, head_dim]; cos, sin: [seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Softmax attention, float32 scores. q, k, v: [batch, seq, heads, head_dim] -> same."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        seq = q.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def forward(params: Params, tokens: jax.Array, cfg: RefConfig) -> jax.Array:
    """tokens: [batch, seq] int -> logits [batch, seq, vocab] float32."""
    batch, seq = tokens.shape
    heads, head_dim = cfg.n_heads, cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (jnp.arange(0, head_dim, 2) / head_dim)
    angles = jnp.arange(seq)[:, None] * inv_freq[None, :]  # [seq, head_dim / 2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [seq, head_dim]
    cos, sin = jnp.cos(angles), jnp.sin(angles)

    x = params["embed"][tokens]  # [batch, seq, d]
    for blk in params["blocks"]:
        h = rms_norm(x, blk["attn_norm"], cfg.norm_eps)
        q = rope((h @ blk["wq"]).reshape(batch, seq, heads, head_dim), cos, sin)
        k = rope((h @ blk["wk"]).reshape(batch, seq, heads, head_dim), cos, sin)
        v = (h @ blk["wv"]).reshape(batch, seq, heads, head_dim)
        x = x + attention(q, k, v, cfg.causal).reshape(batch, seq, heads * head_dim) @ blk["wo"]
        h = rms_norm(x, blk["mlp_norm"], cfg.norm_eps)
        x = x + (jax.nn.silu(h @ blk["w_gate"]) * (h @ blk["w_up"])) @ blk["w_down"]
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    return x @ params["embed"].T  # tied output projection


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits: [batch, seq, vocab], labels: [batch, seq] -> per-token CE [batch, seq]."""
    label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - label_logits


def ref_ar_loss(params: Params, tokens: jax.Array, cfg: RefConfig) -> jax.Array:
    """Mean next-token CE. tokens: [batch, seq + 1] -> scalar."""
    return cross_entropy(forward(params, tokens[:, :-1], cfg), tokens[:, 1:]).mean()


def ref_diffusion_loss(params: Params, tokens: jax.Array, key: jax.Array,
                       cfg: RefConfig, eps: float = 1e-3) -> jax.Array:
    """Masked-diffusion loss. tokens: [batch, seq + 1] (last dropped) -> scalar.

    t ~ U(0, 1) per sequence, p = (1 - eps) t + eps, each token -> MASK with probability p;
    sum over masked positions of CE / p, divided by batch * seq. The key is split 3 ways as in
    our objective (the third key feeds dropout there) so both draw the same t and mask.
    """
    clean = tokens[:, :-1]
    t_key, mask_key, _ = jax.random.split(key, 3)
    t = jax.random.uniform(t_key, (clean.shape[0],))
    p = ((1.0 - eps) * t + eps)[:, None]  # [batch, 1]
    masked = jax.random.bernoulli(mask_key, p, clean.shape)
    ce = cross_entropy(forward(params, jnp.where(masked, cfg.mask_id, clean), cfg), clean)
    return jnp.sum(jnp.where(masked, ce / p, 0.0)) / clean.size


def ref_optimizer(train_cfg: ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Clip to global norm, then AdamW (warmup + cosine) with decay on >= 2-D arrays only."""
    warmup = max(1, round(train_cfg.warmup_fraction * num_steps))
    lr = optax.warmup_cosine_decay_schedule(
        0.0, train_cfg.peak_lr, warmup, max(num_steps, warmup + 1),
        train_cfg.peak_lr * train_cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                    weight_decay=train_cfg.weight_decay, mask=decay_mask))


RefState = tuple[jax.Array, Params, optax.OptState]  # (step int32 scalar, params, opt state)


def make_ref_step(cfg: RefConfig, objective: str, tx: optax.GradientTransformation,
                  step_key: jax.Array) -> Callable[[RefState, jax.Array], tuple[RefState, Any]]:
    """Jitted (state, tokens [batch, seq + 1]) -> (state, loss); the state is donated.

    step_key: the base key; step s uses fold_in(step_key, s) (diffusion only).
    """

    def step(state: RefState, tokens: jax.Array) -> tuple[RefState, jax.Array]:
        step_i, params, opt_state = state
        if objective == "ar":
            loss_fn = lambda p: ref_ar_loss(p, tokens, cfg)
        else:
            key = jax.random.fold_in(step_key, step_i)
            loss_fn = lambda p: ref_diffusion_loss(p, tokens, key, cfg)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (step_i + 1, optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0)


def ref_params_from_ours(ours: nnx.State, cfg: RefConfig) -> Params:
    """A copy (our state gets donated) of our parameters in the reference layout.

    Our fused qkv kernel [d, 3 * width] is (q | k | v) along its columns and the fused SwiGLU
    input [d, 2 * h_f] is (gate | up), as `Block.__call__` splits them.
    """
    pure = nnx.to_pure_dict(ours)
    width, h_f = cfg.n_heads * cfg.head_dim, cfg.ffn_hidden
    blocks = []
    for i in range(cfg.n_layers):
        b = pure["blocks"][i]
        qkv, mlp_in = b["qkv"]["kernel"], b["mlp_in"]["kernel"]
        blocks.append({
            "attn_norm": b["attn_norm"]["scale"],
            "wq": qkv[:, :width], "wk": qkv[:, width:2 * width], "wv": qkv[:, 2 * width:],
            "wo": b["attn_out"]["kernel"],
            "mlp_norm": b["mlp_norm"]["scale"],
            "w_gate": mlp_in[:, :h_f], "w_up": mlp_in[:, h_f:],
            "w_down": b["mlp_out"]["kernel"],
        })
    params = {"embed": pure["embed"]["embedding"], "blocks": blocks,
              "final_norm": pure["final_norm"]["scale"]}
    return jax.tree.map(jnp.copy, params)


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


class Contender(NamedTuple):
    """One train step and its live state. `run(n)` runs n steps, blocks, returns seconds."""

    name: str
    run: Callable[..., float]
    losses: list[float]  # the loss of each warm-up step (the first one at init)


def contender(name: str, step: Callable, state: Any, tokens: jax.Array,
              loss_of: Callable[[Any], jax.Array]) -> Contender:
    """Wraps a donating step so the live state is carried between calls."""
    box = {"state": state}
    losses: list[float] = []

    def run(n: int, record: bool = False) -> float:
        start = time.perf_counter()
        out = None
        for _ in range(n):
            box["state"], out = step(box["state"], tokens)
            if record:
                losses.append(float(loss_of(out)))
        jax.block_until_ready(box["state"])
        return time.perf_counter() - start

    return Contender(name, run, losses)


def loss_close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))


def bench_one(size: str, objective_name: str, args: argparse.Namespace,
              peak: float) -> dict[str, Any]:
    """Times ours and the reference for one (size, objective); returns one table row."""
    d_model, n_layers, n_heads, head_dim = model_shape(size)
    objective = get_objective(objective_name)
    mask_id = args.vocab
    model_cfg = TransformerConfig(
        vocab_size=padded_vocab_size(args.vocab), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, head_dim=head_dim, causal=objective.causal,
        attention_dropout=0.0, hidden_dropout=0.0, dtype="float32")
    ref_cfg = RefConfig(model_cfg.vocab_size, d_model, n_layers, n_heads, head_dim,
                        ffn_hidden_size(d_model), objective.causal, mask_id)
    train_cfg = get_config().train
    seed = args.seed
    tokens = jax.random.randint(jax.random.key(seed + 1), (args.batch, args.seq + 1), 0,
                                args.vocab, dtype=jnp.int32)

    tx = make_optimizer(train_cfg, SCHEDULE_STEPS)
    # Exactly what `dvar train` runs: state and step placed on the configured mesh (1 device
    # here, so every sharding is trivial but the constraints and explicit shardings are real).
    base = get_config()
    graphdef, state, placement = create_train_state(
        model_cfg, tx, seed, make_mesh(base.mesh), rules_from_config(base.mesh.rules))
    n_params = count_params(nnx.merge(graphdef, state.params))
    # Jitted: one compile instead of one per slice and copy.
    ref_params = jax.jit(ref_params_from_ours, static_argnums=1)(state.params, ref_cfg)
    ref_n_params = sum(x.size for x in jax.tree.leaves(ref_params))
    assert ref_n_params == n_params, (ref_n_params, n_params)
    ref_tx = ref_optimizer(train_cfg, SCHEDULE_STEPS)
    ref_state = (jnp.zeros((), jnp.int32), ref_params, ref_tx.init(ref_params))
    # Our step derives its key as fold_in(fold_in(key(seed), 1), step): use the same base.
    ref_key = jax.random.fold_in(jax.random.key(seed), 1)

    ours = contender("ours", make_train_step(graphdef, objective, tx, mask_id, seed, placement),
                     state,
                     tokens, lambda m: m["loss"])
    ref = contender("ref", make_ref_step(ref_cfg, objective_name, ref_tx, ref_key), ref_state,
                    tokens, lambda loss: loss)
    compile_s = {c.name: c.run(1, record=True) for c in (ours, ref)}  # compile + 1 step
    if not loss_close(ours.losses[0], ref.losses[0], LOSS_RTOL):
        raise AssertionError(f"{size} {objective_name}: loss at init differs: ours "
                             f"{ours.losses[0]:.6f}, reference {ref.losses[0]:.6f}")
    warm_s = {c.name: c.run(args.warmup, record=True) for c in (ours, ref)}
    for i, (a, b) in enumerate(zip(ours.losses, ref.losses, strict=True)):
        if not loss_close(a, b, TRAJECTORY_RTOL):
            raise AssertionError(f"{size} {objective_name}: loss at step {i} differs: ours "
                                 f"{a:.6f}, reference {b:.6f}")
    max_loss_diff = max(abs(a - b) for a, b in zip(ours.losses, ref.losses, strict=True))

    steps = args.steps
    if steps <= 0:  # auto: enough steps that the slower one's repeat lasts about target_s
        per_step = max(warm_s.values()) / max(1, args.warmup)
        steps = max(2, math.ceil(args.target_s / max(per_step, 1e-6)))
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(args.repeats):  # interleaved: ours, ref, ours, ref, ...
        for c in (ours, ref):
            times[c.name].append(c.run(steps))

    best = args.stat == "best"
    pick = min if best else statistics.median
    tokens_per_step = args.batch * args.seq
    flops_per_token = matmul_flops_per_token(model_cfg, args.seq)
    row: dict[str, Any] = {"size": size, "params": n_params, "objective": objective_name,
                           "steps_per_repeat": steps, "flops_per_token": flops_per_token,
                           "compile_s": compile_s, "repeat_s": times,
                           "losses": {"ours": ours.losses, "ref": ref.losses},
                           "max_loss_diff": max_loss_diff}
    for name in ("ours", "ref"):
        tok_s = steps * tokens_per_step / pick(times[name])
        row[f"{name}_tokens_per_s"] = tok_s
        row[f"{name}_mfu"] = tok_s * flops_per_token / peak
    # Median ratio: of the adjacent (ours, ref) pairs, which saw about the same background load.
    paired = [r / o for o, r in zip(times["ours"], times["ref"], strict=True)]
    row["ratio"] = (row["ours_tokens_per_s"] / row["ref_tokens_per_s"] if best
                    else statistics.median(paired))
    return row


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", metavar="SIZE",
                   help="model sizes: names from configs/models.py or d_model,n_layers,n_heads,"
                        f"head_dim (default {' '.join(DEFAULTS['sizes'])})")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVE_NAMES,
                   help="objectives to time (default both)")
    p.add_argument("--batch", type=int, help="sequences per step (default 32)")
    p.add_argument("--seq", type=int, help="sequence length (default 128)")
    p.add_argument("--vocab", type=int,
                   help="tokenizer vocabulary; the embedding has it + MASK rounded up to 128 "
                        "rows (default 4096 -> 4224)")
    p.add_argument("--warmup", type=int, help="untimed steps after the compiling one (default 2)")
    p.add_argument("--repeats", type=int, help="timed repeats per implementation (default 5)")
    p.add_argument("--steps", type=int,
                   help="steps per repeat; 0 = enough for about --target-s seconds (default 0)")
    p.add_argument("--target-s", type=float,
                   help="seconds per repeat when --steps is 0 (default 1.0)")
    p.add_argument("--stat", choices=("median", "best"), default="median",
                   help="which repeat to report (default median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write every row (with all repeat times) here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a 1-layer d=32 model, batch 4, seq 32, vocab 256, "
                        "2 repeats of 2 steps")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for size in args.sizes:
        try:
            model_shape(size)
        except ValueError as e:
            p.error(str(e))
    for key in ("batch", "seq", "vocab", "repeats"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("size", "params", "objective", "ours tok/s", "ours MFU", "ref tok/s", "ref MFU",
              "ours/ref")
    cells = [header] + [
        (r["size"], f"{r['params']:,}", r["objective"], f"{r['ours_tokens_per_s']:,.0f}",
         f"{r['ours_mfu']:.1%}", f"{r['ref_tokens_per_s']:,.0f}", f"{r['ref_mfu']:.1%}",
         f"{r['ratio']:.3f}") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the table, returns its rows."""
    args = parse_args(argv)
    start = time.perf_counter()
    device = jax.devices()[0]
    peak = measure_matmul_peak()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind} "
          f"(x{jax.device_count()}), host cpus {os.cpu_count()}")
    print(f"float32 matmul peak (measure_matmul_peak, this process): {peak / 1e9:,.1f} GFLOP/s")
    print("FLOPs/token = matmul_flops_per_token: 6 x matmul weights (tied output projection "
          "included) + 12 * n_layers * seq * attention width")
    print(f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, vocab "
          f"{args.vocab} -> {padded_vocab_size(args.vocab)} rows, float32, dropout 0 in both; "
          f"same token batch and initial parameters for both")
    steps_note = f"{args.steps} steps" if args.steps > 0 else f"~{args.target_s:g} s (auto steps)"
    print(f"timing: compile + {args.warmup} warm-up steps excluded; {args.repeats} repeats of "
          f"{steps_note}, ours and ref interleaved; {args.stat} repeat reported", flush=True)

    rows = []
    for size in args.sizes:
        for objective in args.objectives:
            rows.append(bench_one(size, objective, args, peak))
            print(f"  done {size} {objective} ({rows[-1]['steps_per_repeat']} steps/repeat, "
                  f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    print()
    print("ours = dvar_jax.step.make_train_step (Flax NNX); ref = plain-JAX reference in this "
          "file. Dropout 0 in both.")
    print(format_table(rows))
    ratio = ("ours best / ref best" if args.stat == "best"
             else "median over repeats of the adjacent pair's ref time / ours time")
    print(f"ours/ref = {ratio} (> 1: ours faster)")
    worst = max(r["max_loss_diff"] for r in rows)
    print(f"checked: same loss at init (rtol {LOSS_RTOL:g}) and at each of the first "
          f"{1 + args.warmup} steps (rtol {TRAJECTORY_RTOL:g}) for every row; largest "
          f"|ours - ref| {worst:.2e}")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.json:
        meta = {"jax": jax.__version__, "backend": jax.default_backend(),
                "device": device.device_kind, "peak_flops": peak, "args": {
                    k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
