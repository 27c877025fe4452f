"""Seed spread of the small grid's isoFLOP cells (configs/grids/small.py): the U = 600k, one-epoch
cells of cpu-xs and cpu-sm, both objectives, at seeds 1 and 2 (the grid ran seed 1234).

    dvar sweep run --workdir=/tmp/seeds \\
        --grid=benchmarks/results/grid_demo_2026-12-04b/seeds_grid.py
"""

import importlib.util
from pathlib import Path

from dvar_jax.configs.grids import add_run

_SMALL = Path(__file__).resolve().parents[3] / "configs" / "grids" / "small.py"
_spec = importlib.util.spec_from_file_location("small_grid", _SMALL)
small = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(small)

SEEDS = (1, 2)


def get_grid():
    grid = {}
    for objective in ("diffusion", "ar"):
        for size in ("cpu-xs", "cpu-sm"):
            for seed in SEEDS:
                c = small.grid_config(objective, size, 600_000, 1)
                c.seed = seed
                add_run(grid, f"{objective}-{size}-U600k-E1-seed{seed}", c)
    return list(grid.items())
