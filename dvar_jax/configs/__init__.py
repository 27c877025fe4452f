"""The defaults, inside the package: the base config (`base`), the size table (`models`), the
naming helpers of grids (`grids`), the shared run recipes (`recipes`) and the demo's config
(`demo`).

The top-level `configs/` folder of the repository holds user-facing examples (demo, tiny, the
grids, the ablations) that import these modules; nothing in `dvar_jax` imports `configs/`.
"""
