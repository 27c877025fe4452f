"""The demo's config as an example to copy: `make demo` runs the packaged one
(dvar_jax/configs/demo.py); `dvar demo --config=configs/demo.py --config.KEY=VALUE` runs this
file, and a copy of it with your changes runs the same way.
"""

from ml_collections import ConfigDict

from dvar_jax.configs import demo


def get_config() -> ConfigDict:
    c = demo.get_config()
    # Change the demo here, e.g. a larger budget or more epochs:
    # c.data.unique_tokens = 100_000
    # c.data.epochs = 48.0
    return c
