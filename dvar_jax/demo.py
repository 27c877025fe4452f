"""`dvar demo`: AR and masked diffusion, same model size, same unique tokens, many epochs."""

import json
import math
from pathlib import Path

from ml_collections import ConfigDict

from dvar_jax.config import model_dims, validate_config
from dvar_jax.eval.loading import load_run
from dvar_jax.eval.sampling import generate
from dvar_jax.files import write_atomically
from dvar_jax.report import markdown_table, plot_curves, run_table
from dvar_jax.run_dir import METRICS_FILE, DemoDir
from dvar_jax.scaling.flops import training_flops
from dvar_jax.scaling.planner import (
    DEFAULT_LAW_SET,
    FLOPS_RANGE,
    LAW_SETS,
    critical_compute,
)
from dvar_jax.train import train

OBJECTIVES = ("ar", "diffusion")
STUDY_FIT_RANGE = "25M-100M"  # the unique-token budgets the study's multi-epoch fit saw
SAMPLE_PROMPTS = ("", "And")  # a document start, and a common first word of a line


def sample_section(runs: dict[str, Path], n_new: int) -> list[str]:
    """Markdown: two samples of each run's best checkpoint (AR: temperature 1, top-p 0.9;
    diffusion: the ancestral sampler over n_new steps), seed 0."""
    lines = ["## Samples", "",
             f"Seed 0, {n_new} new tokens after each prompt, best checkpoint of each run. AR: "
             "temperature 1, top-p 0.9. Diffusion: masked ancestral sampler, one step per "
             "token. Reproduce with `dvar sample --workdir=RUN --prompt=...`.", ""]
    for name, workdir in runs.items():
        run = load_run(workdir)
        texts = generate(run.model, run.tokenizer, list(SAMPLE_PROMPTS),
                         objective=run.objective, n_new=n_new, seed=0,
                         seq_len=run.cfg.data.seq_len, top_p=0.9)
        for prompt, text in zip(SAMPLE_PROMPTS, texts, strict=True):
            lines += [f"**{name}**, prompt {prompt!r}:", "", "```", prompt + text, "```", ""]
    return lines


def standing_section(unique_tokens: int, flops: float) -> list[str]:
    """Markdown: the compute the demo used against C_crit(U) of the study's laws, and what the
    study predicts there, in one sentence."""
    c_crit = critical_compute(LAW_SETS[DEFAULT_LAW_SET]["laws"], unique_tokens)
    lines = ["## Where this demo stands", "",
             f"Compute: each model trained for C = 6ND = {flops:.3g} FLOPs. C_crit(U = "
             f"{unique_tokens:,}) from the study's laws (law set `{DEFAULT_LAW_SET}`, "
             "`dvar plan`): "
             + ("none (no crossover between {:.0e} and {:.0e} FLOPs).".format(*FLOPS_RANGE)
                if math.isnan(c_crit) else f"{c_crit:.3g} FLOPs."), ""]
    if math.isnan(c_crit):
        prediction = "the study's laws predict no crossover at this U"
    elif flops > c_crit:
        prediction = (f"the study's laws predict diffusion ahead at this compute "
                      f"({flops / c_crit:.2g}x C_crit)")
    else:
        prediction = (f"the study's laws predict AR ahead at this compute ({flops / c_crit:.2g}x "
                      "C_crit)")
    lines += [f"At U = {unique_tokens:,} unique tokens {prediction}, extrapolating their fit on "
              f"{STUDY_FIT_RANGE} unique tokens far below its range.", ""]
    return lines


def run_demo(cfg: ConfigDict, workdir: str | Path, *, progress: bool | None = None) -> str:
    """Trains both objectives from `cfg` (its `objective` field is ignored) into workdir/ar and
    workdir/diffusion, writes report.md and curves.png, and returns the one-line summary."""
    validate_config(cfg)
    demo = DemoDir(workdir)
    runs, summaries = {}, {}
    for objective in OBJECTIVES:
        run_cfg = ConfigDict(cfg.to_dict())
        run_cfg.objective = objective
        run_cfg.lock()
        runs[objective] = demo.run_path(objective)
        summaries[objective] = train(run_cfg, runs[objective], progress=progress)

    dims = model_dims(cfg.model)
    n_params = summaries["ar"].params
    title = (f"{cfg.model.name} ({n_params / 1e6:.2f}M params), U = {cfg.data.unique_tokens:,} "
             f"unique tokens, {cfg.data.epochs} epochs")
    plot_curves(runs, demo.curves_path, title)
    rows = run_table(runs)
    line = " | ".join(f"{r['run']}: best validation loss {r['best_val_loss']:.4f} at epoch "
                      f"{r['best_epoch']:.1f}" for r in rows)
    report = [
        "# dvar demo: AR vs masked diffusion on repeated data", "",
        f"Model: `{cfg.model.name}` ({', '.join(f'{k}={v}' for k, v in dims.items())}; "
        f"{n_params:,} parameters by the study's N formula). Data: the first "
        f"{cfg.data.unique_tokens:,} tokens of the `{cfg.data.source}` train split, "
        f"{cfg.data.epochs} epochs of {cfg.data.seq_len}-token windows, batch "
        f"{cfg.train.batch_size}, peak LR {cfg.train.peak_lr}. Validation: held-out text "
        f"(diffusion: ELBO with {cfg.eval.num_mc} mask draws per sequence at stratified masked "
        f"counts).", "",
        markdown_table(rows), "",
        "`rise after best` is how far the final validation loss sits above the run's best: "
        "a model that overfits the repeated tokens climbs after its best epoch.", "",
        f"![validation curves]({demo.curves_path.name})", "",
        f"Summary: {line}", "",
        *standing_section(cfg.data.unique_tokens,
                          training_flops(summaries["ar"].params, summaries["ar"].tokens)),
        "Runs: " + ", ".join(f"[{k}]({k}/{METRICS_FILE})" for k in runs), "",
        *sample_section(runs, n_new=min(48, cfg.data.seq_len - 4)),
    ]
    write_atomically(demo.report_path, "\n".join(report))
    write_atomically(demo.summary_path, json.dumps(rows, indent=2))
    return line
