"""Resume soak: a small `dvar train` run killed many times at random must end bitwise where the
same run ends uninterrupted.

It writes a small synthetic text corpus to a temporary folder and trains a tiny model on it
twice with the same command:

1. uninterrupted, to completion: the reference;
2. killed `--kills` times (SIGKILL and SIGTERM in equal numbers, in a seeded random order, at
   seeded random moments) and restarted with the same command after each kill, then left to
   finish.

A kill lands either a random number of steps beyond the furthest step logged so far (plus up to
50 ms: mid-step, mid-save, mid-log) or, one time in four, at a random time within the start-up
of a run (imports, data, restore, compilation). SIGKILL loses the steps since the last
checkpoint; SIGTERM (what a preempted TPU VM gets) makes the run save and exit 0, unless it
arrives before the handler is installed, when it kills like SIGKILL.

It prints a table: attempts, kills of each kind, SIGTERMs that saved, steps trained in all
attempts and how many of them were recomputed (trained more than once), and whether the final
parameters (sha256 over every parameter array), the whole final train state and every logged
loss equal the uninterrupted run's. They must: the script exits 1 when they do not.

Run from the repository root:

    python benchmarks/resume_soak.py            # 20 kills of a 124-step run (several minutes)
    python benchmarks/resume_soak.py --quick    # 3 kills of a 46-step run (a minute or two)
    python benchmarks/resume_soak.py --kills 50 --seed 3 --keep /tmp/soak --json soak.json
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dvar_jax.checkpoint import read_saved_arrays  # noqa: E402 (after the path is set)
from dvar_jax.data.synthetic import write_synthetic_corpus  # noqa: E402

DEFAULTS = {"kills": 20, "epochs": 8, "every_steps": 6}  # 124 steps
QUICK = {"kills": 3, "epochs": 3, "every_steps": 4}  # 46 steps
# The tiny run (cpu-xs on about 4,000 tokens): the same settings as tests/train_worker.py.
TINY = ["--config.data.source=text", "--config.data.vocab_size=400",
        "--config.model.name=cpu-xs", "--config.model.attention_dropout=0.0",
        "--config.model.hidden_dropout=0.0", "--config.data.unique_tokens=4000",
        "--config.data.seq_len=32", "--config.data.validation_tokens=1000",
        "--config.train.batch_size=8", "--config.objective=diffusion",
        # One record per step: the log then tells exactly which steps each attempt trained.
        "--config.train.log_every=1", "--progress=false"]
ATTEMPT_TIMEOUT_S = 900
TIME_KILL_SHARE = 0.25  # kills timed from process start rather than from logged steps
# Steps a run may take between the record that triggers a kill and the kill itself; kills are
# planned to leave this many steps before the end, so that each one lands before it.
OVERSHOOT_STEPS = 3
MAX_DELAY_S = 0.05  # after the triggering record: lands mid-step, mid-save or mid-log

@dataclasses.dataclass(frozen=True)
class Kill:
    """One planned interruption: `sig` after `steps_ahead` newly logged steps (+ `delay_s`),
    or, when `steps_ahead` is 0, `delay_s` after the process started."""

    sig: int
    steps_ahead: int
    delay_s: float


@dataclasses.dataclass
class Attempt:
    rc: int
    seconds: float
    first_step_s: float | None  # from start to its first newly logged step
    sent: int | None  # the signal sent, if any
    resumed_from: int | None  # the checkpoint step it restored (0: none; None: not reached)
    trained: int  # steps it trained and logged
    completed: bool
    sigterm_saved: bool


def logged_train_steps(workdir: Path) -> list[int]:
    """Steps of the train records now in the log; a line cut short by a kill is ignored."""
    path = workdir / "metrics.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "train":
                steps.append(record["step"])
    return steps


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def run_attempt(cmd: list[str], env: dict, workdir: Path, logs: Path, kill: Kill | None
                ) -> Attempt:
    """Runs the command once, delivering `kill` if the run is still going when it is due."""
    before_max = max(logged_train_steps(workdir), default=0)
    before_inode = _inode(workdir / "metrics.jsonl")
    out_path, err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=err)
        started = time.monotonic()
        sent, first_step_s = None, None
        try:
            if kill is not None and _wait_for_kill(proc, workdir, kill, before_max, started):
                proc.send_signal(kill.sig)
                sent = kill.sig
            while proc.poll() is None:  # (a kill's own wait ends before this one starts)
                if first_step_s is None and max(logged_train_steps(workdir), default=0) > \
                        before_max:
                    first_step_s = time.monotonic() - started
                if time.monotonic() - started > ATTEMPT_TIMEOUT_S:
                    raise TimeoutError(f"`{' '.join(cmd)}` ran over {ATTEMPT_TIMEOUT_S} s")
                time.sleep(0.02)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM) or (
            proc.returncode != 0 and sent is None):
        raise RuntimeError(f"`{' '.join(cmd)}` exited {proc.returncode}:\n{stderr[-3000:]}")
    # A run rewrites the log (a new file) when it starts training, dropping the steps after
    # its checkpoint; an attempt killed before that trained nothing.
    rewritten = _inode(workdir / "metrics.jsonl") not in (None, before_inode)
    resumed_from = 0 if rewritten else None  # 0: started afresh; None: killed before that
    if " from the checkpoint at step " in stdout:
        resumed_from = int(stdout.split(" from the checkpoint at step ")[1].split()[0])
    trained = max(0, max(logged_train_steps(workdir), default=0) - (resumed_from or 0)) \
        if rewritten else 0
    saved = "SIGTERM received; saved and committed" in stdout
    return Attempt(proc.returncode, time.monotonic() - started, first_step_s, sent,
                   resumed_from, trained,
                   completed=proc.returncode == 0 and not saved, sigterm_saved=saved)


def _wait_for_kill(proc: subprocess.Popen, workdir: Path, kill: Kill, before_max: int,
                   started: float) -> bool:
    """Waits until `kill` is due; False if the process ended first."""
    deadline = started + ATTEMPT_TIMEOUT_S
    target = before_max + kill.steps_ahead  # beyond every step logged before: fresh records
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if kill.steps_ahead == 0:
            if time.monotonic() - started >= kill.delay_s:
                return True
        elif max(logged_train_steps(workdir), default=0) >= target:
            time.sleep(kill.delay_s)
            return proc.poll() is None
        time.sleep(0.02)
    raise TimeoutError(f"the run did not reach step {target} in {ATTEMPT_TIMEOUT_S} s")


def plan_kill(rng: random.Random, sig: int, logged: int, num_steps: int, kills_left: int,
              startup_s: float) -> Kill:
    """A kill that leaves room for the ones after it before the run's last step."""
    room = num_steps - 1 - OVERSHOOT_STEPS - logged
    if rng.random() < TIME_KILL_SHARE or room < 1:
        # Within start-up (imports, data, restore, compilation): a later timed kill could find
        # a resumed run already finished, as resuming skips the steps before its checkpoint.
        return Kill(sig, 0, rng.uniform(0.2, 0.95 * startup_s))
    return Kill(sig, rng.randint(1, max(1, room // kills_left)), rng.uniform(0.0, MAX_DELAY_S))


def final_state(workdir: Path, num_steps: int) -> tuple[str, str]:
    """(sha256 of the parameters, sha256 of the whole train state) of the final checkpoint."""
    arrays = read_saved_arrays(workdir / "checkpoints" / str(num_steps) / "state")
    params, state = hashlib.sha256(), hashlib.sha256()
    for path in sorted(arrays):
        chunk = path.encode() + arrays[path].dtype.str.encode() + arrays[path].tobytes()
        state.update(chunk)
        if path.startswith("params/"):
            params.update(chunk)
    return params.hexdigest(), state.hexdigest()


def logged_losses(workdir: Path) -> dict:
    """(kind, step) -> loss or validation loss of every record of the log."""
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {(r["kind"], r["step"]): r.get("loss", r.get("val_loss")) for r in records}


def soak(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    corpus = write_synthetic_corpus(root / "corpus")
    env = {**os.environ, "DVAR_CACHE": str(root / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    flags = [f"--config.data.path={corpus}", *TINY, f"--config.data.epochs={args.epochs}",
             f"--config.checkpoint.every_steps={args.every_steps}"]

    def command(workdir: Path) -> list[str]:
        return [sys.executable, "-m", "dvar_jax.cli", "train", f"--workdir={workdir}", *flags]

    reference = root / "uninterrupted"
    first = run_attempt(command(reference), env, reference, root / "uninterrupted", None)
    num_steps = json.loads((reference / "summary.json").read_text())["steps"]
    # Start-up time (imports, data, compilation) of a run: kills timed from process start
    # are drawn below it, so they land in start-up, restore or compilation.
    startup_s = first.first_step_s or first.seconds / 2
    print(f"uninterrupted: {num_steps} steps in {first.seconds:.1f} s (first step logged after "
          f"{startup_s:.1f} s)", file=sys.stderr, flush=True)

    rng = random.Random(args.seed)
    signals = [signal.SIGKILL, signal.SIGTERM] * math.ceil(args.kills / 2)
    rng.shuffle(signals)
    signals = signals[:args.kills]
    soaked = root / "killed"
    attempts: list[Attempt] = []
    while True:
        kills_left = len(signals) - sum(a.sent is not None for a in attempts)
        kill = None
        if kills_left:
            logged = max(logged_train_steps(soaked), default=0)
            kill = plan_kill(rng, signals[len(signals) - kills_left], logged, num_steps,
                             kills_left, startup_s)
        attempt = run_attempt(command(soaked), env, soaked,
                              root / f"attempt{len(attempts):02d}", kill)
        attempts.append(attempt)
        resumed = "-" if attempt.resumed_from is None else attempt.resumed_from
        print(f"  attempt {len(attempts)}: resumed from {resumed}, trained "
              f"{attempt.trained}, "
              + (f"sent {signal.Signals(attempt.sent).name}, " if attempt.sent else "")
              + f"exit {attempt.rc}", file=sys.stderr, flush=True)
        if attempt.completed:
            break

    params_ref, state_ref = final_state(reference, num_steps)
    params_soak, state_soak = final_state(soaked, num_steps)
    trained = sum(a.trained for a in attempts)
    rows = [dict(run="uninterrupted", attempts=1, sigkill=0, sigterm=0, sigterm_saved=0,
                 steps=num_steps, steps_trained=first.trained, steps_recomputed=0,
                 params_sha256=params_ref[:16], params_equal=True, state_equal=True,
                 losses_equal=True)]
    rows.append(dict(
        run=f"killed (seed {args.seed})", attempts=len(attempts),
        sigkill=sum(a.sent == signal.SIGKILL for a in attempts),
        sigterm=sum(a.sent == signal.SIGTERM for a in attempts),
        sigterm_saved=sum(a.sigterm_saved for a in attempts), steps=num_steps,
        steps_trained=trained, steps_recomputed=trained - num_steps,
        params_sha256=params_soak[:16], params_equal=params_soak == params_ref,
        state_equal=state_soak == state_ref,
        losses_equal=logged_losses(soaked) == logged_losses(reference)))
    return rows


COLUMNS = ("run", "attempts", "sigkill", "sigterm", "sigterm_saved", "steps", "steps_trained",
           "steps_recomputed", "params_sha256", "params_equal", "state_equal", "losses_equal")


def format_table(rows: list[dict]) -> str:
    cells = [[str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK['kills']} kills of a short run")
    parser.add_argument("--kills", type=int, help=f"default {DEFAULTS['kills']}")
    parser.add_argument("--epochs", type=int, help=f"of the tiny run (default "
                                                   f"{DEFAULTS['epochs']}: 124 steps)")
    parser.add_argument("--every-steps", type=int, help="checkpoint cadence in steps "
                                                        f"(default {DEFAULTS['every_steps']})")
    parser.add_argument("--seed", type=int, default=0, help="of the kill schedule")
    parser.add_argument("--keep", type=Path, help="write everything here (default: a temporary "
                                                  "folder, removed at the end)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.kills < 0 or args.epochs < 1 or args.every_steps < 1:
        parser.error("--kills must be >= 0, --epochs and --every-steps >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the soak, prints the table, returns its rows (the last: the killed run)."""
    args = parse_args(argv)
    start = time.monotonic()
    print(f"resume soak: {args.kills} kills (SIGKILL and SIGTERM, seed {args.seed}) of a tiny "
          f"`dvar train` run (cpu-xs, {args.epochs} epochs of 4,000 tokens, a checkpoint every "
          f"{args.every_steps} steps), restarted with the same command until it finishes",
          flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="dvar-soak-") as tmp:
            rows = soak(args, Path(tmp))
    print()
    print(format_table(rows))
    killed = rows[-1]
    print(f"\nsteps_recomputed = steps trained in all attempts - steps of the run (work lost to "
          f"kills); restarts: {killed['attempts'] - 1}")
    verdict = all(killed[k] for k in ("params_equal", "state_equal", "losses_equal"))
    print("final parameters, train state and every logged loss "
          + ("EQUAL the uninterrupted run's" if verdict else "DIFFER from the uninterrupted run's"))
    print(f"total {time.monotonic() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(result[-1][k] for k in ("params_equal", "state_equal",
                                              "losses_equal")) else 1)
