"""What every Pallas kernel here shares: the masked-score value, the tile unit, block rounding,
matmul dimension numbers and the choice between compiling and interpreting.

Used by flash_attention.py, cross_entropy.py and splash.py; imports nothing from dvar_jax.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import numpy as np

# The platform kernels are lowered for when it is not the process's own backend: a CPU process
# compiling ahead of time for abstract TPU devices (`dvar plan-memory`) must lower the kernels
# through Mosaic, as the TPU would run them, not as interpret-mode loops.
_LOWERING_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lowering_platform", default=None)


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Within this block, kernels with interpret=None are lowered for `platform` (e.g. "tpu")."""
    token = _LOWERING_PLATFORM.set(platform)
    try:
        yield
    finally:
        _LOWERING_PLATFORM.reset(token)

# Finite stand-in for -inf: exp(MASK_VALUE - m) is exactly 0 for any real m, and a row that has
# seen only masked scores so far (m == MASK_VALUE) is reset by the first real score instead of
# producing inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUBLANE = 8  # second-minor tile of TPU vector registers: blocks are multiples of it

# `lax.dot_general` dimension numbers for 2-D operands, no batch dims (BLAS names: N keeps an
# operand as it is, T transposes it).
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b

GPU_BACKENDS = ("gpu", "cuda", "rocm")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` (> 0) that is >= n, for n >= 0."""
    return -(-n // multiple) * multiple


def resolve_interpret(interpret: bool | None) -> bool:
    """Whether a kernel runs in Pallas interpret mode, from the caller's `interpret` argument.

    None: interpret on a CPU backend, compile otherwise (the backend being `lowering_for`'s
    platform inside one). False on a CPU backend still lowers and compiles for TPU
    (`jax.export(..., platforms=["tpu"])`, or jit for an abstract TPU device).
    Raises NotImplementedError when compiling on a GPU backend: the kernels are Mosaic TPU
    kernels (docs/kernels.md, "GPU").
    """
    backend = _LOWERING_PLATFORM.get() or jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if not interpret and backend in GPU_BACKENDS:
        raise NotImplementedError(
            f"dvar_jax.kernels are written for Mosaic TPU and do not lower on {backend!r}; pass "
            "interpret=True (slow) or use the xla implementation")
    return bool(interpret)
