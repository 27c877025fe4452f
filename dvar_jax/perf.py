"""Hardware peak measured in the same process, so every MFU figure has a fair denominator."""

import time

import jax
import jax.numpy as jnp


def measure_matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """Best observed FLOP/s of a square matmul on the default device (about 1 s on a CPU).

    2048 on a CPU: smaller matmuls under-report the peak by a third on 2 cores and vary more
    from run to run; accelerators need far larger ones to saturate.
    """
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
