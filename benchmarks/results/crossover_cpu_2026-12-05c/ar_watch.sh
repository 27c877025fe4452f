#!/bin/bash
# Runs AR search runs one at a time and stops each once it is well past its best
# (8 epochs and 0.2 nats above it): AR's loss is exact and its best comes early.
# Usage, from anywhere: benchmarks/results/crossover_cpu_2026-12-05c/ar_watch.sh NAME [NAME ...]
cd "$(dirname "$0")/../../.."  # the repository root
for name in "$@"; do
  JAX_PLATFORMS=cpu nice .venv/bin/python -m dvar_jax.cli sweep run --grid=crossover_cpu \
      --workdir=runs/crossover-cpu --only=$name > /tmp/ar-watch-$name.log 2>&1 &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    sleep 10
    if python3 - "$name" <<'PY'
import json, sys
try:
    ev = [json.loads(l) for l in open(f"runs/crossover-cpu/{sys.argv[1]}/metrics.jsonl") if '"eval"' in l]
except FileNotFoundError:
    sys.exit(1)
if not ev: sys.exit(1)
best = min(ev, key=lambda e: e["val_loss"])
last = ev[-1]
sys.exit(0 if last["epoch"] >= best["epoch"] + 8 and last["val_loss"] > best["val_loss"] + 0.2 else 1)
PY
    then
      echo "$name: stopped past its best" >> /tmp/ar-watch.log
      kill $pid; sleep 5; break
    fi
  done
done
echo done >> /tmp/ar-watch.log
