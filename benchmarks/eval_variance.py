"""How noisy is the masked-diffusion likelihood estimate at K Monte-Carlo draws? Pick K from it.

On a trained diffusion run, for each K in --num-mc (default 8, 32, 128) and each of --repeats
seeds, this measures

* validation: the per-token validation loss (the ELBO estimate `dvar eval` reports, with
  `validation_draws` / `summarize_draws` of `dvar_jax.eval.validation`), its reported Monte-Carlo
  standard error, and how much the estimate really moves between seeds; and the same for the
  training loss's form of the estimate (1/p weights at a sampled noise level, as the study
  validates), which has the same expectation: the variance the masked-count estimator saves;
* downstream: each continuation's log-likelihood from `Scorer.loglikelihood_with_stderr`
  (`mc` method) on made-up 4-choice examples, its spread over seeds, and how often two seeds
  pick a different argmax choice: the quantity that decides whether accuracy moves with the seed.

Every std is printed next to the 1/sqrt(K) scaling extrapolated from the smallest K.

With no --workdir it first trains a tiny diffusion model (cpu-xs, seq 32, 4k tokens of a
synthetic corpus, 2 epochs; 20-40 s on 2 shared cores), so it runs anywhere. Run from the
repository root:

    python benchmarks/eval_variance.py --workdir runs/demo          # the demo's diffusion run
    python benchmarks/eval_variance.py                              # tiny model, K 8 32 128
    python benchmarks/eval_variance.py --quick                      # smoke run, K 2 8

This file also holds the pieces `eval_speed.py` shares (made-up examples, the tiny model,
finding runs in a workdir).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from dvar_jax.configs.recipes import tiny_config
from dvar_jax.data.pipeline import validation_windows
from dvar_jax.data.synthetic import write_synthetic_corpus
from dvar_jax.eval.downstream import Example, multiple_choice, requests
from dvar_jax.eval.loading import LoadedRun, load_run, saved_config
from dvar_jax.eval.scoring import Scorer
from dvar_jax.eval.validation import evaluate_validation, summarize_draws, validation_draws
from dvar_jax.objectives.diffusion import masked_diffusion_sequence_losses, stratified_times

# 4096 validation tokens: the tiny model's whole validation stream (96 sequences of 32), 31 of
# the demo's 128-token windows. Fewer sequences make the std itself too noisy to read: the
# draws are heavy-tailed (see validation_variance), so with the tiny model's first 31 sequences
# and 3 seeds the std at K = 8 came out above the one at K = 2 for 8 % of seed sets.
DEFAULTS = {"num_mc": [8, 32, 128], "repeats": 5, "examples": 12, "batch": 16,
            "validation_tokens": 4096}
QUICK = {"num_mc": [2, 8], "repeats": 5, "examples": 8, "batch": 16, "validation_tokens": 4096}

# --------------------------------------------------------------------------------------------
# Shared with eval_speed.py: made-up multiple-choice examples, the tiny model, finding runs.
# --------------------------------------------------------------------------------------------

# Made-up 4-choice examples (never downloaded), the right answer listed first; `made_up_examples`
# rotates the choices so the gold index varies. Two "tasks" of different prompt shapes.
QUESTIONS: tuple[tuple[str, tuple[str, str, str, str]], ...] = (
    ("Question: What do bees make?\nAnswer:", ("honey", "milk", "glass", "salt")),
    ("Question: Which season is the coldest?\nAnswer:", ("winter", "summer", "spring", "noon")),
    ("Question: What does a clock tell?\nAnswer:",
     ("the time", "the weather", "a story", "the way home")),
    ("Question: Where do fish live?\nAnswer:", ("in water", "in trees", "in sand", "in clouds")),
    ("Question: What cuts paper?\nAnswer:", ("scissors", "a spoon", "a pillow", "a cup")),
    ("Question: What color is fresh grass?\nAnswer:", ("green", "purple", "black", "orange")),
    ("Question: Which animal says moo?\nAnswer:", ("a cow", "a cat", "a duck", "a dog")),
    ("Question: What falls from clouds?\nAnswer:", ("rain", "stones", "bread", "coins")),
    ("Question: What do we breathe?\nAnswer:", ("air", "sand", "oil", "ink")),
    ("Question: What is ice?\nAnswer:", ("frozen water", "dry wood", "paper", "wool")),
    ("Question: What lights the sky at night?\nAnswer:",
     ("the moon", "a river", "a table", "a shoe")),
    ("Question: What do you wear on your feet?\nAnswer:", ("shoes", "a hat", "gloves", "a scarf")),
)
COMPLETIONS: tuple[tuple[str, tuple[str, str, str, str]], ...] = (
    ("The king rose from his throne and",
     ("called for his guards.", "ate the moon.", "became a river.", "sang to a fish.")),
    ("She opened the window because the room was",
     ("too warm.", "a banana.", "made of song.", "running fast.")),
    ("The soldiers marched through the night until",
     ("they reached the castle.", "night was a spoon.", "they turned blue.", "bread flew.")),
    ("He lit a candle so that he could",
     ("see in the dark.", "hear the colours.", "eat the wind.", "forget his name.")),
    ("My lord, the messenger brings word that",
     ("the enemy has fled.", "the fish are singing.", "bread is purple.", "stars ate lunch.")),
    ("The queen wept when she heard that her son",
     ("had died in battle.", "was a teapot.", "had become a cloud.", "could swim in air.")),
    ("Good night, sweet friend; we shall meet again",
     ("tomorrow at dawn.", "inside a stone.", "under the spoon.", "never yesterday.")),
    ("The ship was lost at sea, and the sailors",
     ("prayed for land.", "planted potatoes.", "painted the sun.", "wrote laws for cats.")),
)
TASKS: dict[str, tuple[tuple[str, tuple[str, str, str, str]], ...]] = {
    "questions": QUESTIONS, "completions": COMPLETIONS}


def made_up_examples(n: int, task: str = "questions") -> list[Example]:
    """n 4-choice Examples cycling through `TASKS[task]`; example i has its right answer at
    index i % 4 (lm-eval's layout: context, " " + choice per choice)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: allowed {', '.join(TASKS)}")
    out = []
    for i, (context, choices) in zip(range(n), itertools.cycle(TASKS[task])):
        gold = i % len(choices)
        rotated = choices[-gold:] + choices[:-gold] if gold else choices
        out.append(multiple_choice(context, rotated, gold))
    return out


def train_tiny_runs(folder: Path, objectives: Sequence[str]) -> dict[str, Path]:
    """Trains (or, if already there, reuses) a tiny model per objective in folder/<objective>:
    the recipe of tests/conftest.py `trained_runs` (cpu-xs, seq 32, 4,000 unique tokens of a
    synthetic corpus, 2 epochs, batch 8, vocab 400). Returns objective -> workdir."""
    from dvar_jax.train import train  # late: only this path trains

    corpus = folder / "corpus"
    if not corpus.is_dir():
        write_synthetic_corpus(corpus)
    runs = {}
    for objective in objectives:
        cfg = tiny_config(objective, str(corpus), str(folder / "cache"))
        runs[objective] = folder / objective
        train(cfg, runs[objective], progress=False)
    return runs


def find_runs(workdirs: Sequence[Path]) -> dict[str, Path]:
    """objective -> run folder. Each workdir is a run (`dvar train`: it has config.json) or a
    `dvar demo` folder (its ar/ and diffusion/ runs); a later one replaces an earlier one's
    run of the same objective."""
    runs: dict[str, Path] = {}
    for workdir in workdirs:
        candidates = [workdir] if (workdir / "config.json").is_file() else [
            workdir / name for name in ("ar", "diffusion")
            if (workdir / name / "config.json").is_file()]
        if not candidates:
            raise ValueError(f"--workdir={str(workdir)!r} holds no trained run: allowed a "
                             f"`dvar train` workdir (config.json) or a `dvar demo` workdir "
                             f"(ar/ and diffusion/)")
        for run in candidates:
            runs[saved_config(run).objective] = run
    return runs


def resolve_runs(workdirs: Sequence[Path] | None, tiny_dir: Path | None,
                 objectives: Sequence[str]) -> tuple[dict[str, Path], Callable[[], None]]:
    """(objective -> run folder for `objectives`, cleanup). Without workdirs the tiny runs are
    trained in tiny_dir (kept) or in a temporary folder that cleanup removes."""
    if workdirs:
        runs = find_runs(workdirs)
        missing = [o for o in objectives if o not in runs]
        if missing:
            raise ValueError(f"--workdir={' '.join(map(str, workdirs))!r} has no "
                             f"{' or '.join(missing)} run; this benchmark needs "
                             f"{' and '.join(objectives)}")
        return {o: runs[o] for o in objectives}, lambda: None
    folder = tiny_dir or Path(tempfile.mkdtemp(prefix="dvar_eval_bench_"))
    start = time.perf_counter()
    print(f"no --workdir: training a tiny model ({', '.join(objectives)}) in {folder}",
          file=sys.stderr, flush=True)
    runs = train_tiny_runs(folder, objectives)
    print(f"  trained in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    cleanup = (lambda: None) if tiny_dir else partial(shutil.rmtree, folder, True)
    return runs, cleanup


def model_label(run: LoadedRun) -> str:
    """e.g. "cpu-xs diffusion, step 24 (seq 32, vocab 400)": which model a table is about."""
    return (f"{run.cfg.model.name} {run.objective.name}, step {run.step} of {run.workdir} "
            f"(seq {run.cfg.data.seq_len}, tokenizer vocab {run.mask_id})")


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 left: Sequence[int] = (0,)) -> str:
    """Aligned text table: columns in `left` left-aligned, the rest right-aligned."""
    cells = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The two measurements.
# --------------------------------------------------------------------------------------------


def sampled_level_draws(model, tokens, rng, mask_id: int, num_mc: int):
    """The training loss's estimate of the same ELBO, as validation draws [batch, seq + 1] ->
    [batch, num_mc]: draw k at the sequence's k-th stratified noise level t, Bernoulli masks,
    1/p weights (what the study's validation computes, with K = 1)."""
    clean = tokens[:, :-1]
    t_rng, mask_rng = jax.random.split(rng)
    t = jax.vmap(stratified_times, in_axes=(0, None))(
        jax.random.split(t_rng, clean.shape[0]), num_mc)
    return jax.numpy.stack([masked_diffusion_sequence_losses(
        model, clean, t[:, k], jax.random.fold_in(mask_rng, k), mask_id)[0]
        for k in range(num_mc)], axis=1)


# estimator name -> draws function, or None for the objective's own validation estimator.
ESTIMATORS = {"masked counts (validation)": None, "1/p at sampled t (training loss)":
              sampled_level_draws}


def validation_variance(run: LoadedRun, ks: Sequence[int], seeds: Sequence[int],
                        batch_size: int, validation_tokens: int,
                        estimator: str = "masked counts (validation)") -> list[dict[str, Any]]:
    """One row per K: the validation ELBO's reported standard error and its spread over seeds,
    for one of ESTIMATORS.

    The estimate is sum_i xbar_i / (n L) over n sequences, each xbar_i the mean of its K draws,
    and the sequences' draws are independent (each has its own key), so the variance over seeds
    is sum_i var(xbar_i) / (n L)^2. `empirical_std` estimates each var(xbar_i) from the R seeds
    (n (R - 1) degrees of freedom: steadier with few seeds); `raw_std` is the plain std of the R
    estimates (R - 1 degrees of freedom), the same quantity, noisier.

    The 1/p form's draws are heavy-tailed: a draw at small t masks few tokens and weights each
    by 1/p (up to 1/eps = 1000), so rare draws are tens of times the typical one. Any std
    estimated from few draws is then usually below the true one, the more so the fewer draws in
    total: with few seeds the smallest K's std reads low and the slope looks flatter than -1/2.
    The masked-count form weights m masked tokens by about seq / m, so its draws are bounded.
    Its reported s.e. treats a sequence's stratified draws as independent, which overstates it.
    """
    seq = run.cfg.data.seq_len
    windows = validation_windows(run.data.validation, seq, validation_tokens)
    n = len(windows)
    graphdef, params = nnx.split(run.model)
    draws_fn = ESTIMATORS[estimator] or run.objective.validation_draws

    # One compile per K; the parameters are an argument, not constants baked into the HLO.
    @partial(jax.jit, static_argnums=3)
    def eval_fn(params, tokens, rng, k):
        return draws_fn(nnx.merge(graphdef, params), tokens, rng, run.mask_id, k)

    rows = []
    for k in ks:
        means, estimates, stderrs = [], [], []
        start = time.perf_counter()
        for seed in seeds:
            draws = validation_draws(lambda t, r, k=k: eval_fn(params, t, r, k), windows,
                                     batch_size, seed)
            estimate, stderr = summarize_draws(draws, seq)
            means.append(draws.mean(axis=1))
            estimates.append(estimate)
            stderrs.append(stderr)
        seconds = time.perf_counter() - start
        per_sequence_var = np.var(np.stack(means), axis=0, ddof=1)  # [n], over seeds
        rows.append({
            "part": "validation", "estimator": estimator, "num_mc": k, "sequences": n,
            "seeds": len(seeds),
            "estimate": float(np.mean(estimates)),
            "reported_stderr": float(np.sqrt(np.mean(np.square(stderrs)))),
            "empirical_std": float(math.sqrt(per_sequence_var.sum()) / (n * seq)),
            "raw_std": float(np.std(estimates, ddof=1)),
            "estimates": estimates, "seconds": seconds,
        })
    return rows


def check_matches_dvar_eval(run: LoadedRun, row: dict[str, Any], seed: int, batch_size: int,
                            validation_tokens: int) -> float:
    """|difference| between our first estimate and `evaluate_validation`'s at the same K, seed
    and batch size: they must be the same computation, else the table measures something else."""
    ref = evaluate_validation(run, num_mc=row["num_mc"], batch_size=batch_size, seed=seed,
                              validation_tokens=validation_tokens)
    diff = abs(ref["val_loss"] - row["estimates"][0])
    if diff > 1e-5 * max(1.0, abs(ref["val_loss"])):
        raise AssertionError(f"K={row['num_mc']} seed {seed}: evaluate_validation gives "
                             f"{ref['val_loss']:.6f}, this script {row['estimates'][0]:.6f}")
    return diff


def pairwise_disagreement(choices: np.ndarray) -> float:
    """choices [R seeds, E examples] of argmax indices -> the share of (seed pair, example) with
    different picks: the chance that two evaluations that differ only in the seed disagree."""
    r = choices.shape[0]
    pairs = [(a, b) for a in range(r) for b in range(a + 1, r)]
    return float(np.mean([np.mean(choices[a] != choices[b]) for a, b in pairs]))


def downstream_variance(run: LoadedRun, ks: Sequence[int], seeds: Sequence[int],
                        batch_size: int, examples: Sequence[Example]) -> list[dict[str, Any]]:
    """One row per K: the spread over seeds of each choice's log-likelihood estimate (`mc`), and
    how often the argmax choice changes with the seed.

    Scoring uses the study's eps = 0 (p = t), so a draw at tiny t that masks one token weighs
    it by 1/t, without bound: the estimate's variance is infinite in theory (the integral of
    1/t), and in practice a few requests' rare deep draws make most of the spread. Hence the
    mean over requests (and its median, the typical request) next to the root mean square.
    """
    reqs = requests(examples, run.tokenizer)
    sizes = [len(ex.pairs) for ex in examples]
    bounds = np.cumsum([0, *sizes])
    gold = np.array([ex.gold for ex in examples])
    rows = []
    for k in ks:
        lls, ses = [], []
        start = time.perf_counter()
        for seed in seeds:
            # A Scorer per seed: the compiled function is shared (same model structure and K).
            scorer = Scorer(run.model, run.objective, run.mask_id, run.cfg.data.seq_len,
                            eod_id=run.tokenizer.eod_id, batch_size=batch_size, num_mc=k,
                            seed=seed)
            scored = np.array(scorer.loglikelihood_with_stderr(reqs))  # [requests, 2]
            lls.append(scored[:, 0])
            ses.append(scored[:, 1])
        seconds = time.perf_counter() - start
        lls_arr = np.stack(lls)  # [R, requests]
        per_request_std = np.std(lls_arr, axis=0, ddof=1)
        picks = np.stack([[int(np.argmax(row[a:b])) for a, b in itertools.pairwise(bounds)]
                          for row in lls_arr])  # [R, examples]
        acc = (picks == gold).mean(axis=1)
        rows.append({
            "part": "downstream", "num_mc": k, "examples": len(examples), "requests": len(reqs),
            "seeds": len(seeds),
            "mean_loglik": float(lls_arr.mean()),
            "reported_stderr": float(np.mean(ses)),  # mean over seeds and requests
            # Per request over seeds, then over requests: mean, median, root mean square.
            "empirical_std": float(np.mean(per_request_std)),
            "empirical_std_median": float(np.median(per_request_std)),
            "empirical_std_rms": float(np.sqrt(np.mean(np.square(per_request_std)))),
            "flip_rate": pairwise_disagreement(picks),
            "acc_mean": float(acc.mean()), "acc_std": float(np.std(acc, ddof=1)),
            "seconds": seconds,
        })
    return rows


def add_scaling(rows: list[dict[str, Any]]) -> None:
    """Adds `expected_std` (the smallest K's empirical std x sqrt(K_min / K)) to each row."""
    base = rows[0]
    for row in rows:
        row["expected_std"] = base["empirical_std"] * math.sqrt(base["num_mc"] / row["num_mc"])


def slope(rows: Sequence[dict[str, Any]], key: str = "empirical_std") -> float:
    """d log(rows' `key`) / d log K between the smallest and largest K (-0.5 = 1/sqrt(K))."""
    a, b = rows[0], rows[-1]
    if len(rows) < 2 or a[key] <= 0 or b[key] <= 0:
        return float("nan")
    return math.log(b[key] / a[key]) / math.log(b["num_mc"] / a["num_mc"])


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path,
                   help="a diffusion run (`dvar train`) or a `dvar demo` folder (its diffusion/ "
                        "run is used); default: train a tiny model first")
    p.add_argument("--checkpoint", default="best", help="best, latest or a step (default best)")
    p.add_argument("--tiny-dir", type=Path,
                   help="without --workdir: train (or reuse) the tiny model here and keep it "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--num-mc", type=int, nargs="+", metavar="K",
                   help="Monte-Carlo draws to compare (default 8 32 128)")
    p.add_argument("--repeats", type=int, help="seeds per K (default 5)")
    p.add_argument("--seed", type=int, default=0, help="first seed; seeds are seed .. seed+R-1")
    p.add_argument("--examples", type=int,
                   help="made-up 4-choice examples for the downstream part (default 12: each "
                        "made-up question once; --quick 8)")
    p.add_argument("--batch", type=int, help="sequences per model call (default 16)")
    p.add_argument("--validation-tokens", type=int,
                   help="first validation tokens used, 0 = all (default 4096)")
    p.add_argument("--parts", nargs="+", choices=("validation", "downstream"),
                   default=["validation", "downstream"], help="what to measure (default both)")
    p.add_argument("--json", type=Path, help="also write every row here")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: K 2 8 (else as the defaults)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for k in args.num_mc:
        if k < 2:
            p.error(f"--num-mc {k}: allowed integers >= 2 (one draw has no standard error)")
    args.num_mc = sorted(set(args.num_mc))
    if args.repeats < 2:
        p.error(f"--repeats={args.repeats}: allowed >= 2 (a spread needs two seeds)")
    for key in ("examples", "batch"):
        if getattr(args, key) < 1:
            p.error(f"--{key}={getattr(args, key)}: allowed >= 1")
    if args.validation_tokens < 0:
        p.error(f"--validation-tokens={args.validation_tokens}: allowed 0 (all) or > 0")
    return args


def print_validation(rows: list[dict[str, Any]], seq: int) -> None:
    print(f"\nValidation ELBO (per-token loss, nats), estimated by {rows[0]['estimator']}, "
          f"{rows[0]['sequences']} sequences x {seq} tokens, {rows[0]['seeds']} seeds per K:")
    print(format_table(
        ("K", "estimate", "reported s.e.", "std over seeds", "1/sqrt(K) expect.", "std/s.e.",
         "s"),
        [(str(r["num_mc"]), f"{r['estimate']:.4f}", f"{r['reported_stderr']:.5f}",
          f"{r['empirical_std']:.5f}", f"{r['expected_std']:.5f}",
          f"{r['empirical_std'] / r['reported_stderr']:.2f}", f"{r['seconds']:.1f}")
         for r in rows]))
    print(f"  slope d log(std) / d log K = {slope(rows):+.2f} (1/sqrt(K): -0.50)")


def print_downstream(rows: list[dict[str, Any]]) -> None:
    r0 = rows[0]
    print(f"\nDownstream scoring (mc), {r0['examples']} made-up 4-choice examples = "
          f"{r0['requests']} requests, {r0['seeds']} seeds per K; std of one continuation's "
          f"log-likelihood (nats):")
    print(format_table(
        ("K", "mean loglik", "reported s.e.", "std over seeds", "1/sqrt(K) expect.", "median",
         "RMS", "argmax flips", "acc mean ± std", "s"),
        [(str(r["num_mc"]), f"{r['mean_loglik']:.3f}", f"{r['reported_stderr']:.3f}",
          f"{r['empirical_std']:.3f}", f"{r['expected_std']:.3f}",
          f"{r['empirical_std_median']:.3f}", f"{r['empirical_std_rms']:.3f}",
          f"{r['flip_rate']:.1%}", f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f}",
          f"{r['seconds']:.1f}") for r in rows]))
    print(f"  slope d log(std) / d log K = {slope(rows):+.2f} (mean), "
          f"{slope(rows, 'empirical_std_median'):+.2f} (median), "
          f"{slope(rows, 'empirical_std_rms'):+.2f} (RMS); 1/sqrt(K): -0.50")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark, prints the tables, returns their rows."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.workdir is not None:
        runs = find_runs([args.workdir])
        if "diffusion" not in runs:
            raise SystemExit(f"--workdir={str(args.workdir)!r} holds an ar run only; this "
                             f"benchmark needs a diffusion run (or a `dvar demo` folder)")
        paths, cleanup = {"diffusion": runs["diffusion"]}, lambda: None
    else:
        paths, cleanup = resolve_runs(None, args.tiny_dir, ["diffusion"])
    try:
        run = load_run(paths["diffusion"], args.checkpoint)
        seeds = list(range(args.seed, args.seed + args.repeats))
        print(f"jax {jax.__version__}, backend {jax.default_backend()}; model: {model_label(run)}")
        print(f"K = {' '.join(map(str, args.num_mc))}, seeds {seeds[0]}..{seeds[-1]}, "
              f"batch {args.batch}")
        rows: list[dict[str, Any]] = []
        if "validation" in args.parts:
            by_estimator = {}
            for estimator in ESTIMATORS:
                val = validation_variance(run, args.num_mc, seeds, args.batch,
                                          args.validation_tokens, estimator)
                add_scaling(val)
                print_validation(val, run.cfg.data.seq_len)
                if ESTIMATORS[estimator] is None:
                    diff = check_matches_dvar_eval(run, val[0], seeds[0], args.batch,
                                                   args.validation_tokens)
                    print(f"  checked: K={val[0]['num_mc']} seed {seeds[0]} equals "
                          f"evaluate_validation (|diff| {diff:.1e})")
                by_estimator[estimator] = val
                rows += val
            counts, sampled = by_estimator.values()
            print("  variance of the 1/p form over the masked-count form, same K: " + ", ".join(
                f"K={a['num_mc']}: {(b['empirical_std'] / a['empirical_std']) ** 2:.1f}x"
                for a, b in zip(counts, sampled, strict=True)))
        if "downstream" in args.parts:
            down = downstream_variance(run, args.num_mc, seeds, args.batch,
                                       made_up_examples(args.examples))
            add_scaling(down)
            print_downstream(down)
            rows += down
    finally:
        cleanup()
    print("\nstd over seeds: validation, from each sequence's spread over the seeds (pooled); "
          "downstream, each request's std over the seeds, then the mean (median, root mean "
          "square) over requests; reported s.e. likewise the mean. 1/sqrt(K) expect. = the "
          "smallest K's std x sqrt(K_min / K). argmax flips = share of (example, seed pair) "
          "whose argmax choice differs.")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
