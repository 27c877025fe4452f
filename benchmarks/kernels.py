"""Kernel benchmarks: loss memory (compiled for TPU) and attention / loss speed (on a device).

Part `memory`: the cross-entropy from hidden [T, d] and the tied embedding [V, d], value and
gradient w.r.t. both, compiled ahead of time (never run) for an abstract TPU device of
`--topology` (libtpu, no TPU needed) and for the host CPU. The figure is
`compiled.memory_analysis().temp_size_in_bytes`: the scratch the program needs besides its
arguments and outputs. Implementations (`dvar_jax.kernels.cross_entropy`):

* naive: `xla_cross_entropy`, full float32 [T, V] logits (the reference);
* chunked: `chunked_cross_entropy`, pure-JAX scan over vocabulary chunks;
* pallas: `fused_cross_entropy`, Mosaic TPU kernels (TPU rows only).

It checks chunked and pallas need at most 1/4 of naive's temporary memory (PASS/FAIL; the
script exits 1 on FAIL).

Part `timing` (on a GPU or TPU backend; on CPU only with `--cpu-timing`, at tiny shapes with
Pallas in interpret mode, to exercise the code): forward + backward of attention (our `pallas`
flash kernel, JAX's `splash` kernel on TPU, `jax.nn.dot_product_attention`, and the `xla`
reference `dvar_jax.model.attention.dot_product_attention`) and of the loss (naive, chunked,
pallas). Our Pallas kernels are Mosaic TPU kernels: on GPU their rows say "not supported on
gpu". A row that fails (out of memory, say) reports the error instead of stopping the run.

Run from the repository root:

    python benchmarks/kernels.py                 # memory at T 8192, V 50304, d 1024; timing if
                                                 # an accelerator is the default backend
    python benchmarks/kernels.py --quick         # smaller memory shapes + tiny CPU timing
    python benchmarks/kernels.py --parts timing --seqs 2048 4096 --batch 8 --heads 16
"""

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from dvar_jax.kernels import cross_entropy as ce
from dvar_jax.kernels.common import GPU_BACKENDS
from dvar_jax.kernels.flash_attention import flash_attention
from dvar_jax.kernels.splash import splash_attention
from dvar_jax.model.attention import dot_product_attention

MEMORY_LIMIT = 0.25  # chunked and pallas temp bytes must be <= this fraction of naive's
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}

DEFAULTS = {"tokens": 8192, "vocab": 50304, "dim": 1024, "seqs": [2048, 4096], "batch": 8,
            "heads": 16, "head_dim": 128, "loss_tokens": 8192, "loss_vocab": 50304,
            "loss_dim": 1024, "warmup": 2, "repeats": 10}
# Tiny CPU timing shapes (--cpu-timing): splash needs seq a multiple of 128.
CPU_TIMING = {"seqs": [128], "batch": 1, "heads": 2, "head_dim": 64, "loss_tokens": 256,
              "loss_vocab": 1000, "loss_dim": 64, "warmup": 1, "repeats": 3}
QUICK = {"tokens": 2048, "vocab": 8192, "dim": 256, "seqs": [256], "batch": 2, "heads": 4,
         "head_dim": 128, "loss_tokens": 2048, "loss_vocab": 8192, "loss_dim": 256,
         "warmup": 1, "repeats": 3}


# --------------------------------------------------------------------------------------------
# Memory: compiled temporary bytes of the loss's value and gradient.
# --------------------------------------------------------------------------------------------


def loss_value_and_grad(impl: Callable) -> Callable:
    """(hidden [T, d], embedding [V, d], targets [T], weights [T]) -> (loss sum, (dh, dE))."""
    def run(hidden, embedding, targets, weights):
        loss = lambda h, e: impl(h, e, targets, weights)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(hidden, embedding)
    return run


def loss_impls(backend: str, interpret: bool = False) -> dict[str, Callable | None]:
    """The three loss implementations; pallas is None where it cannot compile (cpu, gpu)."""
    pallas = functools.partial(ce.fused_cross_entropy, interpret=interpret)
    usable = backend == "tpu" or interpret
    return {"naive": ce.xla_cross_entropy, "chunked": ce.chunked_cross_entropy,
            "pallas": pallas if usable else None}


def compiled_temp_bytes(fn: Callable, device, tokens: int, vocab: int, dim: int,
                        dtype) -> tuple[int, float]:
    """(temp bytes, compile seconds) of `loss_value_and_grad(fn)` compiled for `device`."""
    sharding = SingleDeviceSharding(device)
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    args = (spec((tokens, dim), dtype), spec((vocab, dim), dtype), spec((tokens,), jnp.int32),
            spec((tokens,), jnp.float32))
    start = time.perf_counter()
    compiled = jax.jit(loss_value_and_grad(fn)).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (target, implementation): temp bytes, ratio to naive, PASS/FAIL."""
    targets = [("cpu", jax.devices("cpu")[0])]
    try:
        from dvar_jax.memory_plan import tpu_devices

        targets.insert(0, (f"tpu {args.topology}", tpu_devices(args.topology)[0]))
    except ValueError as e:  # no libtpu: CPU rows only
        print(f"memory: TPU rows skipped: {e}")
    rows = []
    for target, device in targets:
        naive = None
        for name, fn in loss_impls(device.platform).items():
            row = {"part": "memory", "target": target, "impl": name, "tokens": args.tokens,
                   "vocab": args.vocab, "dim": args.dim, "dtype": args.dtype}
            if fn is None:
                rows.append({**row, "note": "Mosaic TPU kernel: TPU rows only"})
                continue
            temp, seconds = compiled_temp_bytes(fn, device, args.tokens, args.vocab, args.dim,
                                                DTYPES[args.dtype])
            row.update(temp_bytes=temp, compile_s=seconds)
            if name == "naive":
                naive = temp
            else:
                row["ratio"] = temp / naive
                row["check"] = "PASS" if temp <= MEMORY_LIMIT * naive else "FAIL"
            rows.append(row)
    return rows


def format_memory(rows: list[dict[str, Any]]) -> str:
    header = ("target", "impl", "temp bytes", "temp MiB", "/ naive", f"<= {MEMORY_LIMIT:g}",
              "compile s")
    cells = [header] + [(
        r["target"], r["impl"], f"{r['temp_bytes']:,}" if "temp_bytes" in r else "-",
        f"{r['temp_bytes'] / 2**20:,.1f}" if "temp_bytes" in r else "-",
        f"{r['ratio']:.4f}" if "ratio" in r else ("1" if "temp_bytes" in r else "-"),
        r.get("check", r.get("note", "")), f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
    ) for r in rows]
    return _table(cells, left=(0, 1, 5))


# --------------------------------------------------------------------------------------------
# Timing: forward + backward on the default backend.
# --------------------------------------------------------------------------------------------


def attention_impls(backend: str) -> dict[str, Callable | str]:
    """name -> fn(q, k, v, causal) on [batch, seq, heads, head_dim], or why it is skipped."""
    on_gpu = backend in GPU_BACKENDS
    impls: dict[str, Callable | str] = {
        "xla": lambda q, k, v, causal: dot_product_attention(q, k, v, causal=causal),
        "jax.nn.dpa": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v,
                                                                           is_causal=causal),
        "pallas": (f"not supported on {backend}" if on_gpu
                   else lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)),
        "splash": (f"not supported on {backend}" if on_gpu
                   else lambda q, k, v, causal: splash_attention(q, k, v, causal=causal)),
    }
    if on_gpu:
        impls["jax.nn.dpa cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
    return impls


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward + backward: 4 B H L^2 D forward (QK^T, PV), x 2.5 with the backward, / 2 causal."""
    flops = 2.5 * 4 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


def loss_flops(tokens: int, vocab: int, dim: int) -> float:
    """Forward + backward of the loss: 2 T V d logits, 4 T V d for dh and dE (recompute not
    counted)."""
    return 6.0 * tokens * vocab * dim


def time_call(fn: Callable, args: tuple, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds per call, compile + first call seconds) of jitted fn(*args)."""
    fn = jax.jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def _attention_fwd_bwd(impl: Callable, causal: bool) -> Callable:
    """(q, k, v, dout) -> (dq, dk, dv): one forward and one backward pass."""
    def run(q, k, v, dout):
        _, vjp = jax.vjp(lambda q, k, v: impl(q, k, v, causal), q, k, v)
        return vjp(dout)
    return run


def _timed_row(row: dict[str, Any], fn: Callable | str, args: tuple, flops: float,
               opts: argparse.Namespace) -> dict[str, Any]:
    """row + ms and TFLOP/s of fn(*args), or the reason it was skipped or failed."""
    if isinstance(fn, str):
        return {**row, "note": fn}
    try:
        seconds, first = time_call(fn, args, opts.warmup, opts.repeats)
    except Exception as e:  # out of memory, unsupported shape: report it and go on
        return {**row, "note": f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    return {**row, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "first_s": first}


def timing_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    backend = jax.default_backend()
    dtype = DTYPES[args.dtype]
    keys = jax.random.split(jax.random.key(0), 8)
    rows = []
    for seq in args.seqs:
        shape = (args.batch, seq, args.heads, args.head_dim)
        qkvd = tuple(jax.random.normal(k, shape, dtype) for k in keys[:4])
        for causal in (True, False):
            flops = attention_flops(args.batch, args.heads, seq, args.head_dim, causal)
            for name, impl in attention_impls(backend).items():
                row = {"part": "attention", "impl": name, "causal": causal,
                       "shape": "x".join(map(str, shape))}
                fn = impl if isinstance(impl, str) else _attention_fwd_bwd(impl, causal)
                rows.append(_timed_row(row, fn, qkvd, flops, args))
    t, v, d = args.loss_tokens, args.loss_vocab, args.loss_dim
    loss_args = (jax.random.normal(keys[4], (t, d), dtype),
                 (0.02 * jax.random.normal(keys[5], (v, d))).astype(dtype),
                 jax.random.randint(keys[6], (t,), 0, v), jnp.ones((t,), jnp.float32))
    for name, impl in loss_impls(backend, interpret=backend == "cpu").items():
        row = {"part": "loss", "impl": name, "causal": None, "shape": f"T{t} V{v} d{d}"}
        fn = loss_value_and_grad(impl) if impl else f"not supported on {backend}"
        rows.append(_timed_row(row, fn, loss_args, loss_flops(t, v, d), args))
    return rows


def format_timing(rows: list[dict[str, Any]]) -> str:
    header = ("part", "impl", "causal", "shape", "fwd+bwd ms", "TFLOP/s", "note")
    cells = [header] + [(
        r["part"], r["impl"], "" if r["causal"] is None else str(r["causal"]).lower(),
        r["shape"], f"{r['ms']:,.3f}" if "ms" in r else "-",
        f"{r['tflops']:.3f}" if "tflops" in r else "-", r.get("note", ""),
    ) for r in rows]
    return _table(cells, left=(0, 1, 2, 3, 6))


# --------------------------------------------------------------------------------------------


def _table(cells: list[tuple[str, ...]], left: tuple[int, ...]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("memory", "timing"),
                   default=["memory", "timing"])
    p.add_argument("--topology", default="v5p:2x2x1", help="TPU topology compiled for (memory)")
    p.add_argument("--tokens", type=int, help="memory: T (default 8192)")
    p.add_argument("--vocab", type=int, help="memory: V (default 50304)")
    p.add_argument("--dim", type=int, help="memory: d (default 1024)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="hidden/embedding (memory) and q/k/v (timing) dtype")
    p.add_argument("--seqs", type=int, nargs="+", help="timing: attention seq lengths")
    p.add_argument("--batch", type=int, help="timing: attention batch (default 8)")
    p.add_argument("--heads", type=int, help="timing: attention heads (default 16)")
    p.add_argument("--head-dim", type=int, help="timing: attention head_dim (default 128)")
    p.add_argument("--loss-tokens", type=int, help="timing: loss T (default 8192)")
    p.add_argument("--loss-vocab", type=int, help="timing: loss V (default 50304)")
    p.add_argument("--loss-dim", type=int, help="timing: loss d (default 1024)")
    p.add_argument("--warmup", type=int, help="timing: untimed calls after the first")
    p.add_argument("--repeats", type=int, help="timing: timed calls; the median is reported")
    p.add_argument("--cpu-timing", action="store_true",
                   help="on a CPU backend, time tiny shapes anyway (Pallas in interpret mode)")
    p.add_argument("--quick", action="store_true",
                   help="smaller memory shapes (T 2048, V 8192, d 256) and, on CPU, --cpu-timing")
    p.add_argument("--json", type=Path, help="also write every row here")
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    args.cpu_timing = args.cpu_timing or (args.quick and on_cpu)
    # Unset options: DEFAULTS, overridden by QUICK, then (timing shapes) by CPU_TIMING.
    presets = [DEFAULTS] + [QUICK] * args.quick + [CPU_TIMING] * (on_cpu and args.cpu_timing)
    for key in DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, [p[key] for p in presets if key in p][-1])
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the chosen parts, prints their tables, returns every row."""
    args = parse_args(argv)
    start = time.perf_counter()
    backend = jax.default_backend()
    print(f"jax {jax.__version__}, backend {backend}, device {jax.devices()[0].device_kind}")
    rows: list[dict[str, Any]] = []
    if "memory" in args.parts:
        print(f"\nmemory: loss value + grad w.r.t. hidden and embedding, hidden [{args.tokens}, "
              f"{args.dim}] and embedding [{args.vocab}, {args.dim}] {args.dtype}, targets int32, "
              "weights float32; compiled, not run; temp = memory_analysis().temp_size_in_bytes")
        mem = memory_rows(args)
        print(format_memory(mem))
        rows += mem
    if "timing" in args.parts:
        if backend == "cpu" and not args.cpu_timing:
            print("\ntiming: skipped, it needs a GPU or TPU backend (--cpu-timing times tiny "
                  "shapes on CPU anyway)")
        else:
            note = " (CPU: tiny shapes, Pallas in interpret mode; not a speed figure)" * (
                backend == "cpu")
            print(f"\ntiming on {backend}{note}: forward + backward, {args.dtype}, median of "
                  f"{args.repeats} calls after compile + {args.warmup} warm-up calls")
            print("FLOPs: attention 4*B*H*L^2*D forward, x2.5 forward+backward, /2 causal (the "
                  "same count for every impl); loss 6*T*V*d (backward recompute not counted)")
            timed = timing_rows(args)
            print(format_timing(timed))
            rows += timed
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"jax": jax.__version__, "backend": backend,
                                         "rows": rows}, indent=2))
    return rows


def failed(rows: list[dict[str, Any]]) -> bool:
    """Whether any memory check failed."""
    return any(r.get("check") == "FAIL" for r in rows)


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
