"""The training loop: drives the pure step (`dvar_jax.step`) over a run's batches, with the
I/O at the edge: metrics and TensorBoard, validation on its cadence, checkpoints, preemption.

`train(cfg, workdir)` is the whole contract: it trains, or resumes, the run that `cfg` describes
in the run folder `workdir` (layout: `dvar_jax.run_dir`), and returns its `RunSummary`.
"""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm import tqdm

from dvar_jax.checkpoint import CheckpointError, Checkpoints, abstract_like
from dvar_jax.config import transformer_config, validate_config
from dvar_jax.data.pipeline import TrainBatches, open_run_data, validation_windows
from dvar_jax.metrics import MetricsWriter, NoMetricsWriter
from dvar_jax.objectives import objective_from_config
from dvar_jax.perf import measure_matmul_peak
from dvar_jax.run_dir import RunDir
from dvar_jax.scaling.flops import matmul_flops_per_token, paper_param_count, training_flops
from dvar_jax.sharding import (
    LogicalRules,
    activation_sharding,
    global_batch,
    make_mesh,
    maybe_initialize_distributed,
    rules_from_config,
)
from dvar_jax.step import (
    TrainState,
    checkpoint_layout,
    create_train_state,
    evaluate,
    evaluated_params,
    lr_schedule,
    make_eval_step,
    make_optimizer,
    make_train_step,
)


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
    unique_tokens: int = 0  # U as trained (data.unique_documents resolves it from the store)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; nothing of that state was saved."""


@functools.cache
def _matmul_peak() -> float:
    """The MFU denominator, measured once per process (about 1 s): every run of a sweep or a
    test session reports MFU against the same peak."""
    return measure_matmul_peak()


def train(cfg: ConfigDict, workdir: str | os.PathLike, *, progress: bool | None = None,
          override: bool = False) -> RunSummary:
    """Trains one model as `cfg` says into workdir (config.json, metrics.jsonl, summary.json,
    tb/, checkpoints/), resuming from its latest readable checkpoint if it has one.

    workdir is a local folder or gs://BUCKET/PATH. On a multi-host run only process 0 writes
    the run's files; every process writes its shards of the checkpoints.
    A workdir trained with a different run-defining config is refused unless `override`.
    SIGTERM finishes the current step, saves, and returns with `completed=False`.
    """
    validate_config(cfg)
    maybe_initialize_distributed(cfg.distributed)
    mesh = make_mesh(cfg.mesh)
    rules = rules_from_config(cfg.mesh.rules)
    _check_batches_divide(cfg, mesh)
    run = RunDir(workdir)
    _check_run_dir(run, cfg, override)
    with contextlib.ExitStack() as held, activation_sharding(mesh, rules), \
            _sigterm_flag() as preempted:
        return _Loop(cfg, run, mesh, rules, progress, preempted, held).run()


def _check_batches_divide(cfg: ConfigDict, mesh: Mesh) -> None:
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    for key in ("train.batch_size", "eval.batch_size"):
        size = cfg[key.split(".")[0]].batch_size
        if size % batch_shards:
            raise ValueError(f"{key}={size} must divide by the {batch_shards} batch shards of "
                             f"the mesh {dict(mesh.shape)}")


def _check_run_dir(run: RunDir, cfg: ConfigDict, override: bool) -> None:
    """Every check of the run folder, before any work, writing nothing: a refused run leaves
    the folder as it found it (config.json is written once the checkpoint has restored)."""
    run.check_writable()
    run.check_not_held()  # early, so a busy run is refused before its data loads
    differences = run.config_differences(cfg)
    if differences and not override:
        raise CheckpointError(
            f"--workdir={str(run.root)!r} holds a run with a different config: "
            f"{', '.join(differences)} differ (pass --override to continue it anyway, or "
            "use another workdir)")
    if run.metrics_path.exists():
        run.read_metrics()  # a damaged log is an error naming its line, and stays as it is


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


@dataclasses.dataclass
class _Throughput:
    """Tokens/s over the steps since the last log line, excluding the first step (it compiles)
    and evaluation time."""

    start: float | None = None
    steps: int = 0

    def stepped(self, state: TrainState) -> None:
        if self.start is None:  # the first step compiles: time from its end
            jax.block_until_ready(state.step)
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def tokens_per_s(self, tokens_per_step: int) -> float:
        elapsed = time.perf_counter() - self.start
        return self.steps * tokens_per_step / elapsed if self.steps else float("nan")

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def exclude(self, seconds: float) -> None:
        self.start += seconds


class _Loop:
    """One run's training: everything built from the config once, then `run()`, a short
    sequence of named steps (log, evaluate, save, preempt)."""

    def __init__(self, cfg: ConfigDict, run: RunDir, mesh: Mesh, rules: LogicalRules,
                 progress: bool | None, preempted: list[bool], held: contextlib.ExitStack):
        self.cfg, self.run_dir, self.preempted = cfg, run, preempted
        data = open_run_data(cfg.data)
        self.batches = TrainBatches.from_config(cfg, data.train)
        data.train.check_shards(self.batches.unique_tokens)
        self.val_windows = validation_windows(data.validation, cfg.data.seq_len,
                                              cfg.data.validation_tokens)
        vocab_size = data.tokenizer.vocab_size
        objective = objective_from_config(cfg)
        model_cfg = transformer_config(cfg, vocab_size, objective)
        mask_id = vocab_size
        self.num_steps = self.batches.num_steps
        tx = make_optimizer(cfg.train, self.num_steps)
        self.schedule = lr_schedule(cfg.train, self.num_steps)
        graphdef, self.state, self.placement = create_train_state(model_cfg, tx, cfg.seed, mesh,
                                                                  rules)
        self.train_step = make_train_step(graphdef, objective, tx, mask_id, cfg.seed,
                                          self.placement, cfg.train.skip_nonfinite,
                                          cfg.train.microbatches)
        self.eval_step = make_eval_step(graphdef, objective, mask_id, cfg.eval.num_mc,
                                        self.placement)

        self.n_params = paper_param_count(model_cfg.d_model, model_cfg.n_layers, vocab_size)
        self.flops_per_token = matmul_flops_per_token(model_cfg, cfg.data.seq_len)
        self.peak = _matmul_peak()
        self.tokens_per_step = self.batches.tokens_per_step
        self.eval_every = max(1, round(cfg.eval.every_epochs * self.batches.num_windows
                                       / cfg.train.batch_size))
        self.save_every = cfg.checkpoint.every_steps or self.eval_every
        if progress is None:
            progress = sys.stderr.isatty()
        self.show_progress = progress

        # One writer per run: process 0 holds the folder until the loop ends and alone writes
        # config, metrics, TensorBoard and summary (orbax coordinates the checkpoints). Taken
        # only now, just before the folder is first written, so a refused run creates nothing.
        self.writes = jax.process_index() == 0
        if self.writes:
            held.enter_context(run.hold())
        self.checkpoints = Checkpoints(run.root, cfg.checkpoint.keep,
                                       layout=checkpoint_layout(model_cfg, tx, cfg.seed, mesh,
                                                                rules))
        # pending: (step, metrics) of the steps not yet logged; saved with each checkpoint so a
        # resumed run logs exactly what an uninterrupted one would.
        self.pending: list[tuple[int, dict]] = []
        restored_step = self._restore()
        self.start_step = restored_step or 0
        # Only now, with the data loaded and the checkpoint (if any) restored: a run refused
        # earlier must not replace the config of the run the workdir holds.
        kept_through = -1 if restored_step is None else restored_step
        if self.writes:
            run.write_config(cfg)
            run.keep_metrics_through(kept_through)
        self.writer: MetricsWriter | NoMetricsWriter = (run.metrics_writer() if self.writes
                                                        else NoMetricsWriter())
        # Filtered here too: the other processes may read before process 0 has truncated.
        kept = [r for r in (run.read_metrics() if run.metrics_path.exists() else [])
                if r["step"] <= kept_through]
        self.history = [(r["epoch"], r["val_loss"]) for r in kept if r["kind"] == "eval"]
        self.skipped_total = int(sum(r.get("skipped", 0) for r in kept if r["kind"] == "train"))

    def _restore(self) -> int | None:
        """The step of the latest readable checkpoint, its state and pending metrics restored;
        None when there is none."""
        restored = self.checkpoints.restore_latest(abstract_like(self.state))
        if restored is None:
            return None
        start_step, self.state, meta = restored
        self.pending = [(s, m) for s, m in meta["pending"]]
        print(f"{self.cfg.objective}: resuming {self.run_dir.root} from the checkpoint at step "
              f"{start_step}", flush=True)
        return start_step

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> RunSummary:
        cfg, num_steps = self.cfg, self.num_steps
        bar = tqdm(total=num_steps, initial=self.start_step, desc=cfg.objective,
                   disable=not self.show_progress, unit="step")
        self.val_loss = self.history[-1][1] if self.history else self.evaluate(0)
        throughput = _Throughput()
        completed, step = True, self.start_step
        try:
            for step, tokens in enumerate(self.batches.iterate(self.start_step),
                                          start=self.start_step + 1):
                self.state, metrics = self.train_step(
                    self.state, global_batch(tokens, self.placement.batch))
                self.pending.append((step, metrics))
                throughput.stepped(self.state)
                if step % cfg.train.log_every == 0 or step == num_steps:
                    self.log(step, throughput, bar)
                evaluated = step % self.eval_every == 0 or step == num_steps
                if evaluated:
                    jax.block_until_ready(self.state)  # finish training work before timing
                    eval_start = time.perf_counter()
                    self.val_loss = self.evaluate(step)
                    throughput.exclude(time.perf_counter() - eval_start)
                if step % self.save_every == 0 or step == num_steps or self.preempted[0]:
                    self.save(step, self.val_loss if evaluated else None)
                bar.update(1)
                if self.preempted[0] and step < num_steps:
                    self.stop_preempted(step)
                    completed = False
                    break
        finally:
            bar.close()
            self.writer.close()
            self.checkpoints.close()  # waits for the last asynchronous save to commit
        return self.summarize(step, completed)

    # -- its named steps ---------------------------------------------------------------------

    def log(self, step: int, throughput: _Throughput, bar: tqdm) -> None:
        """One train record: the pending steps' mean metrics, lr, tokens, epoch, speed, MFU."""
        fetched = [m for _, m in self.fetch_pending()]
        values = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if "skipped" in values:
            values["skipped"] = float(sum(m["skipped"] for m in fetched))
            self.skipped_total += int(values["skipped"])
        tok_s = throughput.tokens_per_s(self.tokens_per_step)
        values |= {"lr": float(self.schedule(step - 1)), "tokens": step * self.tokens_per_step,
                   "epoch": self.batches.epoch_at(step), "tokens_per_s": tok_s,
                   "mfu": tok_s * self.flops_per_token / self.peak}
        self.writer.write("train", step, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", val=f"{self.val_loss:.3f}",
                        epoch=f"{values['epoch']:.1f}")
        self.pending = []
        throughput.restart()

    def evaluate(self, step: int) -> float:
        """Validation loss on the fixed windows, recorded with its epoch, tokens and FLOPs."""
        loss = evaluate(self.eval_step, evaluated_params(self.state), self.val_windows,
                        self.cfg.eval.batch_size, self.cfg.eval.seed)
        tokens = step * self.tokens_per_step
        epoch = self.batches.epoch_at(step)
        self.history.append((epoch, loss))
        self.writer.write("eval", step, {"val_loss": loss, "epoch": epoch, "tokens": tokens,
                                         "flops": training_flops(self.n_params, tokens)})
        return loss

    def save(self, step: int, val_loss: float | None) -> None:
        """An asynchronous checkpoint of the state and the metrics not yet logged."""
        self.checkpoints.save(step, self.state, {"step": step, "pending": self.fetch_pending()},
                              val_loss)

    def stop_preempted(self, step: int) -> None:
        self.checkpoints.wait()
        print(f"{self.cfg.objective}: SIGTERM received; saved and committed the checkpoint at "
              f"step {step} of {self.num_steps} in {self.checkpoints.directory}. Run the same "
              "command again to resume.", flush=True)

    def fetch_pending(self) -> list[tuple[int, dict]]:
        """The pending metrics as floats; NonFiniteError at the first non-finite step (unless
        non-finite steps are skipped), naming the last good checkpoint."""
        fetched = [(s, {k: float(v) for k, v in m.items()})
                   for s, m in jax.device_get(self.pending)]
        if self.cfg.train.skip_nonfinite:
            return fetched
        for s, m in fetched:
            bad = [k for k in ("loss", "grad_norm") if not math.isfinite(m[k])]
            if bad:
                good = self.checkpoints.steps()
                raise NonFiniteError(
                    f"non-finite {bad[0]}={m[bad[0]]} at step {s}; stopped without saving "
                    "that state. Last good checkpoint: "
                    + (f"{self.checkpoints.directory / str(good[-1])} (step {good[-1]})"
                       if good else "none") + ". Set --config.train.skip_nonfinite=True to "
                    "skip such steps instead.")
        return fetched

    def summarize(self, step: int, completed: bool) -> RunSummary:
        """The run's summary; written to summary.json once the run has completed."""
        best_epoch, best = min(self.history, key=lambda h: h[1])
        done = int(step) if not completed else self.num_steps
        summary = RunSummary(self.cfg.objective, self.n_params, best, best_epoch,
                             self.history[-1][1], done, done * self.tokens_per_step, completed,
                             self.skipped_total, self.batches.unique_tokens)
        if completed and self.writes:
            self.run_dir.write_summary(summary._asdict())
        return summary
