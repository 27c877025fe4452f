"""dvar-jax: diffusion vs autoregression when data, not compute, is the bottleneck.

Importing the package sets process defaults before JAX or TensorFlow start, so that no
entry point (the `dvar` command, the lm-eval adapter, a notebook) greets a user with the
start-up errors of accelerators this machine does not have, and so that gs:// paths go through
gcsfs (`dvar_jax.storage`). Each is only a default: an environment variable the user set wins.
"""

import contextlib
import glob
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType


def _machine_has_tpu() -> bool:
    """TPU VMs expose their chips as /dev/accel* (v2-v5e) or VFIO groups (v5p, v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_ACCELERATOR_TYPE"))


def _quiet_start_up() -> None:
    # TensorFlow (imported by seqio and tfds) prints CUDA and oneDNN notices that say nothing
    # about this program.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # libtpu (the `tpu` extra, installed for `dvar plan-memory`'s ahead-of-time compiles) makes
    # JAX try a TPU backend at start, which on a machine without one prints initialisation
    # errors ("Failed to find host bounds ...") before falling back. Without a TPU, JAX is told
    # which platforms exist; compiling for a TPU topology still loads libtpu when asked.
    if ("JAX_PLATFORMS" in os.environ or "jax" in sys.modules or _machine_has_tpu()
            or importlib.util.find_spec("libtpu") is None):
        return
    has_cuda = (glob.glob("/dev/nvidia[0-9]*")
                and any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin",
                                                               "jax_cuda13_plugin")))
    os.environ["JAX_PLATFORMS"] = "cuda,cpu" if has_cuda else "cpu"


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """The process's stderr (file descriptor 2) goes to /dev/null within this block, so C++
    libraries' start-up lines do not reach the user; Python exceptions still raise.
    TF_CPP_MIN_LOG_LEVEL=0 keeps everything."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_quietly(name: str) -> ModuleType:
    """`importlib.import_module(name)` for a module that loads TensorFlow (seqio, tfds).

    TensorFlow 2.21 prints INFO lines about CUDA drivers and oneDNN from C++ while it loads,
    before its logging honours TF_CPP_MIN_LOG_LEVEL: it loads with `native_stderr_silenced`.
    """
    if "tensorflow" in sys.modules:
        return importlib.import_module(name)
    with native_stderr_silenced():
        return importlib.import_module(name)


def _gcs_through_gcsfs() -> None:
    # etils.epath serves gs:// with tf.io.gfile whenever TensorFlow is installed; gfile has no
    # generation preconditions and ignores STORAGE_EMULATOR_HOST. gcsfs has both.
    os.environ.setdefault("EPATH_USE_TF", "false")
    # gcsfs's zonal/hierarchical-bucket layer asks the Storage Control gRPC API about every
    # bucket first (a minute of retries where that API is unreachable, as with an emulator);
    # run folders live in standard buckets.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # gcsfs keeps every folder listing for the life of the process; objects written by other
    # processes (another host's checkpoint shards, another sweep's runs) or by TensorStore would
    # stay unseen. Run folders are listed rarely: always ask GCS.
    os.environ.setdefault("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")


_quiet_start_up()
_gcs_through_gcsfs()
