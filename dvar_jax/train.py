"""Training: the train state, one jitted step shared by every objective, the loop.

State lives in one place (`TrainState`); the step is a pure function of (state, batch) whose
randomness is derived from (seed, step), so a run is reproducible from its config alone.
I/O (metrics, progress, TensorBoard) stays in `train`, the loop at the edge.
"""

import contextlib
import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict
from tqdm import tqdm

from dvar_jax.checkpoint import (
    CheckpointError,
    Checkpoints,
    abstract_like,
    flatten,
    run_defining_differences,
)
from dvar_jax.config import transformer_config, validate_config
from dvar_jax.configs.base import get_config
from dvar_jax.data.corpus import write_atomically as _write_bytes_atomically
from dvar_jax.data.pipeline import TrainBatches, load_token_streams, validation_windows
from dvar_jax.metrics import MetricsWriter, keep_metrics_through, read_metrics
from dvar_jax.model.transformer import Transformer, TransformerConfig
from dvar_jax.objectives import Objective, objective_from_config
from dvar_jax.perf import measure_matmul_peak
from dvar_jax.scaling.flops import matmul_flops_per_token, paper_param_count, training_flops
from dvar_jax.sharding import (
    LogicalRules,
    activation_sharding,
    batch_sharding,
    global_batch,
    make_mesh,
    maybe_initialize_distributed,
    replicated_rows,
    rules_from_config,
    train_state_shardings,
)


def write_atomically(path: Path, text: str) -> None:
    """A complete file or the old one, never half of it (a kill may come at any time)."""
    _write_bytes_atomically(path, lambda f: f.write(text.encode()))


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: steps taken
    params: nnx.State
    opt_state: optax.OptState


def lr_schedule(train_cfg: ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup over warmup_fraction of the steps, then cosine to min_lr_ratio x peak at the
    last step: the schedule stretches with the run, as the study's (PAPER.md §4)."""
    warmup = max(1, round(train_cfg.warmup_fraction * num_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.peak_lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=train_cfg.peak_lr * train_cfg.min_lr_ratio)


def make_optimizer(train_cfg: ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decay on >= 2-D parameters only (not norm gains)."""
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(lr_schedule(train_cfg, num_steps), b1=train_cfg.b1, b2=train_cfg.b2,
                    eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
    )


class Placement(NamedTuple):
    """Where a run's arrays live: its mesh and the shardings derived from the rule table."""

    mesh: Mesh
    state: TrainState  # a NamedSharding per leaf
    batch: NamedSharding  # token batches [batch, seq + 1]
    replicated: NamedSharding


def plan_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
                     mesh: Mesh | None = None, rules: LogicalRules = ()
                     ) -> tuple[nnx.GraphDef, Callable[[], TrainState], Placement | None]:
    """The model's static graph, the pure init function of the train state, and (with a mesh)
    where every array of it goes. Nothing is allocated: shapes are worked out abstractly."""
    init_key = jax.random.fold_in(jax.random.key(seed), 0)

    def init() -> TrainState:
        params = nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(params=init_key)), nnx.Param)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    placement = None
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        placement = Placement(mesh, train_state_shardings(jax.eval_shape(init), tx, mesh, rules),
                              batch_sharding(mesh, rules), replicated)
    return graphdef, init, placement


def create_train_state(model_cfg: TransformerConfig, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh | None = None, rules: LogicalRules = ()
                       ) -> tuple[nnx.GraphDef, TrainState, Placement | None]:
    """A freshly initialised model, split into its static graph and its parameters, + optimizer.

    With a mesh, one jitted init creates every array directly in its shards: no device ever
    holds a full copy of a sharded parameter.
    """
    graphdef, init, placement = plan_train_state(model_cfg, tx, seed, mesh, rules)
    state = jax.jit(init, out_shardings=None if placement is None else placement.state)()
    return graphdef, state, placement


def make_train_step(graphdef: nnx.GraphDef, objective: Objective,
                    tx: optax.GradientTransformation, mask_id: int, seed: int,
                    placement: Placement | None = None, skip_nonfinite: bool = False):
    """The jitted step (state, tokens [batch, seq + 1]) -> (state, metrics); state is donated.

    With a placement, inputs and outputs have explicit shardings and metrics come back
    replicated. With skip_nonfinite, a step whose loss or gradient norm is not finite leaves
    parameters and optimizer state as they were and reports `skipped` = 1.
    """
    step_key = jax.random.fold_in(jax.random.key(seed), 1)

    def step_fn(state: TrainState, tokens: jax.Array):
        rng = jax.random.fold_in(step_key, state.step)

        def loss_fn(params):
            return objective.loss(nnx.merge(graphdef, params), tokens, rng, mask_id)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm}
        if skip_nonfinite:  # keep the old parameters and moments; the step still counts
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
            metrics["skipped"] = (~finite).astype(jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    if placement is None:
        return jax.jit(step_fn, donate_argnums=0)
    return jax.jit(step_fn, donate_argnums=0,
                   in_shardings=(placement.state, placement.batch),
                   out_shardings=(placement.state, placement.replicated))


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective, mask_id: int, num_mc: int,
                   placement: Placement | None = None):
    """(params, tokens [batch, seq + 1] numpy, rng) -> per-sequence summed loss [batch]."""

    def eval_fn(params, tokens, rng):
        return objective.validation_loss(nnx.merge(graphdef, params), tokens, rng, mask_id, num_mc)

    if placement is None:
        return jax.jit(eval_fn)
    jitted = jax.jit(eval_fn, in_shardings=(placement.state.params, placement.batch,
                                            placement.replicated),
                     out_shardings=placement.replicated)
    # Every process holds all validation windows: each contributes the rows of its devices.
    return lambda params, tokens, rng: jitted(
        params, replicated_rows(np.asarray(tokens), placement.batch), rng)


def evaluate(eval_step, params: nnx.State, windows: np.ndarray, batch_size: int,
             seed: int) -> float:
    """Mean per-token validation loss over all windows [n, seq + 1].

    Batch j always uses the key fold_in(seed, j), so every evaluation of every run with the same
    validation data draws the same masks and noise levels: curves are comparable.
    """
    n, seq = windows.shape[0], windows.shape[1] - 1
    key = jax.random.key(seed)
    total = 0.0
    for j, start in enumerate(range(0, n, batch_size)):
        chunk = windows[start:start + batch_size]
        real = chunk.shape[0]
        if real < batch_size:  # pad with repeats so one compiled shape serves every batch
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - real, axis=0)])
        sums = eval_step(params, chunk, jax.random.fold_in(key, j))
        total += float(jnp.sum(sums[:real]))
    return total / (n * seq)


class RunSummary(NamedTuple):
    objective: str
    params: int  # the study's N formula with this run's vocabulary
    best_val_loss: float
    best_epoch: float
    final_val_loss: float
    steps: int  # steps taken so far (all of them unless preempted)
    tokens: int
    completed: bool = True  # False: stopped by SIGTERM after saving; rerun to resume
    skipped_steps: int = 0


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; nothing of that state was saved."""


@functools.cache
def _matmul_peak() -> float:
    """The MFU denominator, measured once per process (about 1 s): every run of a sweep or a
    test session reports MFU against the same peak."""
    return measure_matmul_peak()


def train(cfg: ConfigDict, workdir: str | Path, *, progress: bool | None = None,
          override: bool = False) -> RunSummary:
    """Trains one model as `cfg` says into workdir (config.json, metrics.jsonl, summary.json,
    tb/, checkpoints/), resuming from its latest readable checkpoint if it has one.

    A workdir trained with a different run-defining config is refused unless `override`.
    SIGTERM finishes the current step, saves, and returns with `completed=False`.
    """
    validate_config(cfg)
    maybe_initialize_distributed(cfg.distributed)
    mesh = make_mesh(cfg.mesh)
    rules = rules_from_config(cfg.mesh.rules)
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    for key in ("train.batch_size", "eval.batch_size"):
        size = cfg[key.split(".")[0]].batch_size
        if size % batch_shards:
            raise ValueError(f"{key}={size} must divide by the {batch_shards} batch shards of "
                             f"the mesh {dict(mesh.shape)}")
    # Every check of the workdir comes before any work and writes nothing: a refused run
    # leaves the folder as it found it (config.json is written once the checkpoint restored).
    workdir = Path(workdir)
    check_workdir(workdir)
    saved_config = workdir / "config.json"
    if saved_config.exists():
        # Keys added to the code since the run was saved count as their defaults.
        defaults = flatten(json.loads(get_config().to_json()))
        saved = defaults | flatten(json.loads(saved_config.read_text()))
        differences = run_defining_differences(saved, flatten(json.loads(cfg.to_json())))
        if differences and not override:
            raise CheckpointError(
                f"--workdir={str(workdir)!r} holds a run with a different config: "
                f"{', '.join(differences)} differ (pass --override to continue it anyway, or "
                "use another workdir)")
    if (workdir / "metrics.jsonl").exists():
        read_metrics(workdir)  # a damaged log is an error naming its line, and stays as it is
    with activation_sharding(mesh, rules), _sigterm_flag() as preempted:
        return _train_loop(cfg, workdir, mesh, rules, progress, preempted)


def _probe_write(folder: Path) -> None:
    """Creates and removes a file in `folder`: the only sure test that this process may write
    there (permission bits, ACLs, read-only mounts, root)."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".dvar-write-probe-")
    os.close(fd)
    os.unlink(probe)


def check_workdir(workdir: Path) -> None:
    """ValueError unless `workdir` is a folder this process can write, or can be created in one
    (the nearest existing parent). Creates nothing."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} is a file, not a folder; give a folder "
                         "(an existing run to resume, or a new one)")
    existing = workdir
    while not existing.exists():  # created later, once the data has loaded
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} cannot be created: {existing} is a file")
    folders = [existing] + [f for f in (workdir / "checkpoints",) if f.is_dir()]
    for folder in folders:
        try:
            _probe_write(folder)
        except OSError as e:
            raise ValueError(
                f"--workdir={str(workdir)!r} is not writable ({folder}: "
                f"{e.strerror or type(e).__name__}); nothing was changed. Make it writable, or "
                "give a folder you can write to") from None


@contextlib.contextmanager
def _sigterm_flag():
    """A one-element list that becomes [True] when SIGTERM arrives (what a TPU VM gets on
    preemption); the loop checks it between steps. Only the main thread can own signals."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train_loop(cfg: ConfigDict, workdir: Path, mesh: Mesh, rules: LogicalRules,
                progress: bool | None, preempted: list[bool]) -> RunSummary:
    streams = load_token_streams(cfg.data)
    batches = TrainBatches.from_config(cfg, streams.train)
    val_windows = validation_windows(streams.validation, cfg.data.seq_len,
                                     cfg.data.validation_tokens)
    objective = objective_from_config(cfg)
    model_cfg = transformer_config(cfg, streams.tokenizer.vocab_size)
    mask_id = streams.tokenizer.vocab_size
    num_steps = batches.num_steps
    tx = make_optimizer(cfg.train, num_steps)
    schedule = lr_schedule(cfg.train, num_steps)
    graphdef, state, placement = create_train_state(model_cfg, tx, cfg.seed, mesh, rules)
    train_step = make_train_step(graphdef, objective, tx, mask_id, cfg.seed, placement,
                                 cfg.train.skip_nonfinite)
    eval_step = make_eval_step(graphdef, objective, mask_id, cfg.eval.num_mc, placement)

    n_params = paper_param_count(model_cfg.d_model, model_cfg.n_layers,
                                 streams.tokenizer.vocab_size)
    flops_per_token = matmul_flops_per_token(model_cfg, cfg.data.seq_len)
    peak = _matmul_peak()
    tokens_per_step = batches.tokens_per_step
    eval_every = max(1, round(cfg.eval.every_epochs * batches.num_windows / cfg.train.batch_size))
    save_every = cfg.checkpoint.every_steps or eval_every

    checkpoints = Checkpoints(workdir, cfg.checkpoint.keep)
    # pending: (step, metrics) of the steps not yet logged; saved with each checkpoint so a
    # resumed run logs exactly what an uninterrupted one would.
    pending: list[tuple[int, dict]] = []
    start_step = 0
    restored = checkpoints.restore_latest(abstract_like(state))
    if restored is not None:
        start_step, state, meta = restored
        pending = [(s, m) for s, m in meta["pending"]]
        print(f"{cfg.objective}: resuming {workdir} from the checkpoint at step {start_step}",
              flush=True)
    # Only now, with the data loaded and the checkpoint (if any) restored: a run refused
    # earlier must not replace the config of the run the workdir holds.
    write_atomically(workdir / "config.json", cfg.to_json(indent=2))
    keep_metrics_through(workdir, start_step if restored is not None else -1)
    writer = MetricsWriter(workdir)
    kept = read_metrics(workdir) if writer.path.exists() else []
    history = [(r["epoch"], r["val_loss"]) for r in kept if r["kind"] == "eval"]
    skipped_total = int(sum(r.get("skipped", 0) for r in kept if r["kind"] == "train"))

    def run_eval(step: int) -> float:
        loss = evaluate(eval_step, state.params, val_windows, cfg.eval.batch_size, cfg.eval.seed)
        tokens = step * tokens_per_step
        epoch = batches.epoch_at(step)
        history.append((epoch, loss))
        writer.write("eval", step, {"val_loss": loss, "epoch": epoch, "tokens": tokens,
                                    "flops": training_flops(n_params, tokens)})
        return loss

    def check_finite() -> list[tuple[int, dict]]:
        """pending as floats; raises NonFiniteError at the first non-finite step (stop mode)."""
        fetched = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
        if not cfg.train.skip_nonfinite:
            for s, m in fetched:
                bad = [k for k in ("loss", "grad_norm") if not math.isfinite(m[k])]
                if bad:
                    good = checkpoints.steps()
                    raise NonFiniteError(
                        f"non-finite {bad[0]}={m[bad[0]]} at step {s}; stopped without saving "
                        "that state. Last good checkpoint: "
                        + (f"{checkpoints.directory / str(good[-1])} (step {good[-1]})" if good
                           else "none") + ". Set --config.train.skip_nonfinite=True to skip "
                        "such steps instead.")
        return fetched

    def save(step: int, val: float | None) -> None:
        checkpoints.save(step, state, {"step": step, "pending": check_finite()}, val)

    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=num_steps, initial=start_step, desc=cfg.objective, disable=not progress,
               unit="step")
    val_loss = history[-1][1] if history else run_eval(0)
    interval_start, interval_steps = None, 0
    completed = True
    try:
        for step, tokens in enumerate(batches.iterate(start_step), start=start_step + 1):
            state, metrics = train_step(state, global_batch(tokens, placement.batch))
            pending.append((step, metrics))
            if interval_start is None:  # the first step compiles: time from its end
                jax.block_until_ready(state.step)
                interval_start = time.perf_counter()
            else:
                interval_steps += 1
            if step % cfg.train.log_every == 0 or step == num_steps:
                fetched = [m for _, m in check_finite()]
                values = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                if "skipped" in values:
                    values["skipped"] = float(sum(m["skipped"] for m in fetched))
                    skipped_total += int(values["skipped"])
                elapsed = time.perf_counter() - interval_start
                tok_s = interval_steps * tokens_per_step / elapsed if interval_steps \
                    else float("nan")
                values |= {"lr": float(schedule(step - 1)), "tokens": step * tokens_per_step,
                           "epoch": batches.epoch_at(step), "tokens_per_s": tok_s,
                           "mfu": tok_s * flops_per_token / peak}
                writer.write("train", step, values)
                bar.set_postfix(loss=f"{values['loss']:.3f}", val=f"{val_loss:.3f}",
                                epoch=f"{values['epoch']:.1f}")
                pending, interval_steps = [], 0
                interval_start = time.perf_counter()
            evaluated = step % eval_every == 0 or step == num_steps
            if evaluated:
                jax.block_until_ready(state)  # finish training work before timing evaluation
                eval_start = time.perf_counter()
                val_loss = run_eval(step)
                interval_start += time.perf_counter() - eval_start  # not training throughput
            if step % save_every == 0 or step == num_steps or preempted[0]:
                save(step, val_loss if evaluated else None)
            bar.update(1)
            if preempted[0] and step < num_steps:
                checkpoints.wait()
                print(f"{cfg.objective}: SIGTERM received; saved and committed the checkpoint "
                      f"at step {step} of {num_steps} in {checkpoints.directory}. Run the same "
                      "command again to resume.", flush=True)
                completed = False
                break
    finally:
        bar.close()
        writer.close()
        checkpoints.close()  # waits for the last asynchronous save to commit

    best_epoch, best = min(history, key=lambda h: h[1])
    done = int(step) if not completed else num_steps
    summary = RunSummary(cfg.objective, n_params, best, best_epoch, history[-1][1], done,
                         done * tokens_per_step, completed, skipped_total)
    if completed:
        write_atomically(workdir / "summary.json", json.dumps(summary._asdict(), indent=2))
    return summary
