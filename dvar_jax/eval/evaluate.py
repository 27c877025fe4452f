"""`dvar eval`: a checkpoint's validation loss and downstream scores, appended to the run's
results file (`<workdir>/eval.jsonl`, one record per evaluation) and printed as a table."""

from collections.abc import Sequence
from pathlib import Path

from dvar_jax.eval.downstream import TASKS, check_task, evaluate_task
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.scoring import Scorer
from dvar_jax.eval.validation import evaluate_validation
from dvar_jax.objectives import Decoding, get_objective
from dvar_jax.results import append_record
from dvar_jax.run_dir import RunDir

RESULTS_FILE = "eval.jsonl"


def parse_tasks(spec: str) -> tuple[str, ...]:
    """"" or "none" = no tasks, "all" = the 9, else comma-separated names (each checked)."""
    if spec in ("", "none"):
        return ()
    if spec == "all":
        return TASKS
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    for name in names:
        try:
            check_task(name)
        except ValueError:
            raise ValueError(f"--tasks={spec!r}: {name!r} is not a task; allowed all, none or "
                             f"a comma-separated list of {', '.join(TASKS)}") from None
    return names


def run_evaluation(workdir: str | Path, *, checkpoint: str = "best", num_mc: int = 32,
                   batch_size: int = 16, seed: int = 0, validation_tokens: int | None = None,
                   tasks: Sequence[str] = (), tasks_dir: str | None = None, source: str = "jsonl",
                   limit: int | None = None, diffusion_method: str = "mc") -> dict:
    """Evaluates one checkpoint of the run in `workdir`; returns the record it appended.

    validation_tokens: None = the run's own data.validation_tokens; 0 = the whole stream.
    Nothing is appended unless every part succeeded.
    """
    for name, value, low in (("num_mc", num_mc, 1), ("batch_size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"--{name}={value!r}: must be an integer >= {low}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit}: must be >= 1 (or 0 for every document)")
    run = load_run(workdir, checkpoint)
    if validation_tokens is None:
        validation_tokens = run.cfg.data.validation_tokens
    record = {"kind": "eval", "checkpoint": checkpoint, "step": run.step,
              "objective": run.objective.name, "seed": seed}
    record |= evaluate_validation(run, num_mc=num_mc, batch_size=batch_size, seed=seed,
                                  validation_tokens=validation_tokens)
    if tasks:
        scorer = Scorer(run.model, run.objective, run.mask_id, run.cfg.data.seq_len,
                        eod_id=run.tokenizer.eod_id, batch_size=batch_size, num_mc=num_mc,
                        diffusion_method=diffusion_method, seed=seed)
        unmasking = run.objective.decoding is Decoding.UNMASKING
        record["diffusion_method"] = diffusion_method if unmasking else None
        record["tasks"] = {task: evaluate_task(scorer, run.tokenizer, task, tasks_dir, limit,
                                               source=source) for task in tasks}
    append_record(RunDir(workdir).evals_path, record)
    return record


def format_evaluation(record: dict) -> str:
    """The record as a small table: validation first, then one row per task."""
    exact = get_objective(record["objective"]).exact  # the record names its objective
    lines = [
        f"{record['objective']} at step {record['step']} ({record['checkpoint']} checkpoint)",
        f"  validation loss  {record['val_loss']:.4f} nats/token"
        + ("" if exact else
           f" ± {record['val_loss_stderr']:.4f} (Monte-Carlo s.e., K = {record['num_mc']})"),
        f"  bits per token   {record['bits_per_token']:.4f}",
        f"  bits per byte    {record['bits_per_byte']:.4f}"
        f"   ({record['sequences']} sequences, {record['tokens']} tokens, "
        f"{record['bytes']} bytes)",
    ]
    tasks = record.get("tasks") or {}
    if tasks:
        lines.append(f"  {'task':<18}{'n':>6}{'acc':>9}{'± s.e.':>9}{'acc_norm':>10}"
                     f"{'perplexity':>12}")
        for name, r in tasks.items():
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
            ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
            lines.append(f"  {name:<18}{r['n']:>6}{r['acc']:>9.4f}{r['acc_stderr']:>9.4f}"
                         f"{norm:>10}{ppl:>12}")
    return "\n".join(lines)
