"""The study's sizes on v5p at the study's batch: the smallest slice where each fits, and its
roofline, from `dvar plan-memory`'s ahead-of-time compile on this CPU (libtpu, no TPU).

For every size of the study's table (7M to 2.6B) at batch 256 x 2048 and vocabulary 50304
(GPT-2's 50257 padded), AR, it searches slices of v5p from 4 chips up, fsdp over all chips
(`--mesh=1,N,1`), and microbatches 1, 2, 4, ...; the first plan that fits is the row: slice,
mesh, microbatches, per-chip memory, compile time here, roofline step time and estimated MFU.
The model settings are the study grid's (`study_config`: layers scanned, remat "dots", dtype,
attention and loss "auto" for TPU), with attention dropout as given: 0 (the default here)
lets "auto" choose splash; the grid's faithful 0.1 keeps the xla attention.

Each finished size is appended to a JSON-lines file as it comes, and a rerun skips the sizes
already there, so the search (hours on 2 cores for all 41 sizes) can be stopped and resumed.

    python benchmarks/tpu_plan.py                                # all sizes, dropout 0
    python benchmarks/tpu_plan.py --sizes 140M,425M --attention_dropout 0.1
    python benchmarks/tpu_plan.py --report                       # the table from the file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SLICES = (("v5p:2x2x1", 4), ("v5p:2x2x2", 8), ("v5p:2x2x4", 16), ("v5p:2x4x4", 32),
          ("v5p:4x4x4", 64), ("v5p:4x4x8", 128))
MICROBATCHES = (1, 2, 4, 8, 16)


def study_cfg(size: str, attention_dropout: float, slice_chips: int, microbatches: int):
    from dvar_jax.configs.recipes import study_config

    cfg = study_config("ar", size, unique_tokens=100_000_000, epochs=1)
    cfg.data.train_store = cfg.data.validation_store = "unused-by-plan-memory"
    cfg.model.attention_dropout = attention_dropout
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, slice_chips, 1
    cfg.train.microbatches = microbatches
    return cfg


def plan_size(size: str, attention_dropout: float) -> dict:
    """The first (slice, microbatches) where `size` fits, with its plan; tries listed too."""
    from dvar_jax.memory_plan import plan_memory, tpu_devices

    tries = []
    for topology, chips in SLICES:
        devices = tpu_devices(topology)
        for m in MICROBATCHES:
            if (256 // m) % chips:
                continue
            cfg = study_cfg(size, attention_dropout, chips, m)
            try:
                plan = plan_memory(cfg, devices)
            except Exception as e:  # a compile failure other than "does not fit": recorded
                tries.append({"topology": topology, "microbatches": m, "error": str(e)[:2000]})
                print(f"  {size} {topology} m={m}: compile failed: {str(e)[:300]}",
                      file=sys.stderr, flush=True)
                continue
            tries.append({"topology": topology, "microbatches": m, "fits": plan["fits"],
                          "needed_gib": plan["needed_bytes"] / 2**30,
                          "compile_s": plan["compile_s"]})
            print(f"  {size} {topology} m={m}: {'fits' if plan['fits'] else 'does not fit'} "
                  f"({plan['needed_bytes'] / 2**30:,.1f} GiB, {plan['compile_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            if plan["fits"]:
                return {"size": size, "attention_dropout": attention_dropout,
                        "topology": topology, "chips": chips, "plan": plan, "tries": tries}
    return {"size": size, "attention_dropout": attention_dropout, "topology": None,
            "tries": tries}


def table(rows: list[dict]) -> str:
    out = ["| size | smallest v5p slice | mesh (data, fsdp, tensor) | microbatches | attention "
           "| per-chip peak (GiB) | compile here (s) | roofline step (s) | bound | MFU est. |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["topology"] is None:
            out.append(f"| {r['size']} | none up to {SLICES[-1][0]} | | | | | | | | |")
            continue
        p = r["plan"]
        mesh = p["mesh"]
        out.append(
            f"| {r['size']} | {r['topology']} ({r['chips']} chips) | {mesh['data']}, "
            f"{mesh['fsdp']}, {mesh['tensor']} | {p['microbatches']} | "
            f"{p['model']['attention_impl']} | {p['peak_bytes_estimate'] / 2**30:,.1f} | "
            f"{sum(t['compile_s'] for t in r['tries']):,.0f} | {p['roofline_step_s']:.3f} | "
            f"{p['bound']} | {p['roofline_mfu']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from dvar_jax.configs.models import PAPER_SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(PAPER_SIZES),
                        help="comma-separated sizes of the study's table (default: all)")
    parser.add_argument("--attention_dropout", type=float, default=0.0,
                        help="0 lets auto pick splash; the study's code ran 0.1 (xla)")
    parser.add_argument("--out", default=str(RESULTS / "tpu_plan_2026-12-04.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in PAPER_SIZES]
    if unknown:
        parser.error(f"--sizes: {unknown} are not sizes of the study's table; allowed "
                     f"{', '.join(PAPER_SIZES)}")
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["size"], r["attention_dropout"]) for r in rows}
    if not args.report:
        for size in sizes:
            if (size, args.attention_dropout) in done:
                continue
            started = time.perf_counter()
            row = plan_size(size, args.attention_dropout)
            row["search_s"] = time.perf_counter() - started
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    order = {s: i for i, s in enumerate(PAPER_SIZES)}
    chosen = sorted((r for r in rows if r["attention_dropout"] == args.attention_dropout),
                    key=lambda r: order[r["size"]])
    print(f"AR at batch 256 x 2048, vocabulary 50304, attention dropout "
          f"{args.attention_dropout}, v5p (459 TFLOP/s bf16, 2765 GB/s, 95 GiB a chip):")
    print(table(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
