"""Two stacks (interpreter + checkout), one machine, one interleaved run: train_throughput.py of
each, alternating A B A B ..., and a table of the medians over rounds.

Used for dependency upgrades (README, "Performance"): absolute tokens/s move with the machine's
load, so the two stacks are only compared inside one run, round by round.

    python benchmarks/compare_stacks.py \
        --a "jax 0.10.2=/tmp/venv311/bin/python:/tmp/old-checkout" \
        --b "jax 0.12=.venv/bin/python:." --rounds 3 -- --sizes cpu-s --repeats 3
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _stack(text: str) -> tuple[str, str, Path]:
    """"LABEL=PYTHON:CHECKOUT" -> (label, python, checkout)."""
    label, _, rest = text.partition("=")
    python, _, checkout = rest.partition(":")
    if not (label and python and checkout):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed LABEL=PYTHON:CHECKOUT")
    return label, python, Path(checkout).resolve()


def run_once(python: str, checkout: Path, args: list[str]) -> list[dict]:
    """The rows of one train_throughput.py run of a stack."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([python, str(checkout / "benchmarks" / "train_throughput.py"), *args,
                        "--json", out.name], cwd=checkout, check=True,
                       stdout=subprocess.DEVNULL)
        data = json.loads(Path(out.name).read_text())
    return data["rows"] if isinstance(data, dict) else data


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Our flags, then after "--" the ones train_throughput.py gets.
    split = argv.index("--") if "--" in argv else len(argv)
    ours, passed = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", type=_stack, required=True, help="LABEL=PYTHON:CHECKOUT")
    p.add_argument("--b", type=_stack, required=True, help="LABEL=PYTHON:CHECKOUT")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(ours)
    # (size, objective, implementation, stack label) -> [(tok/s, MFU) per round]
    results: dict[tuple[str, str, str, str], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for label, python, checkout in (args.a, args.b):
            for row in run_once(python, checkout, passed):
                for impl in ("ours", "ref"):
                    key = (row["size"], row["objective"], impl, label)
                    results.setdefault(key, []).append((row[f"{impl}_tokens_per_s"],
                                                        row[f"{impl}_mfu"]))
            print(f"round {round_ + 1}/{args.rounds}: {label} done", file=sys.stderr, flush=True)
    a_label, b_label = args.a[0], args.b[0]
    print(f"| size | objective | step | {a_label} tok/s (MFU) | {b_label} tok/s (MFU) | ratio |")
    print("|---|---|---|---|---|---|")
    for size, objective, impl in sorted({k[:3] for k in results}):
        cells = []
        for label in (a_label, b_label):
            rounds = results[(size, objective, impl, label)]
            tok_s = statistics.median(t for t, _ in rounds)
            mfu = statistics.median(m for _, m in rounds)
            cells.append((tok_s, mfu))
        (a, a_mfu), (b, b_mfu) = cells
        print(f"| {size} | {objective} | {impl} | {a:,.0f} ({a_mfu:.1%}) | {b:,.0f} "
              f"({b_mfu:.1%}) | {b / a:.3f} |")
    print(f"\nmedians over {args.rounds} interleaved rounds; each round's value is the script's "
          "own median of its repeats")


if __name__ == "__main__":
    main()
