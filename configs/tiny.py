"""A tiny run for tests, benchmarks and smoke checks: cpu-xs on 4,000 unique tokens of a text
corpus for 2 epochs of 32-token windows (about 15 s on 2 cores), evaluated every epoch.

`get_config()` uses the corpus folder given by --config.data.path, e.g.
`dvar train --config=configs/tiny.py --config.data.path=DIR --workdir=runs/tiny`; from Python
the same run is `dvar_jax.configs.recipes.tiny_config(objective, corpus_dir)`.
"""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import tiny_config


def get_config() -> ConfigDict:
    return tiny_config()
