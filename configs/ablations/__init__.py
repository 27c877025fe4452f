"""The study's ablation figures as grids (PAPER.md §8), at the study's scale and on a CPU.

Each module defines `get_grid(cpu: bool = False) -> list[(name, ConfigDict)]`:

- `attention_dropout`: AR with dropout on the attention probabilities (Fig. 8a);
- `token_masking`: AR with the study's randmask (Fig. 8b);
- `orderings`: AR trained over N fixed token orders, N in 1, 2, 4, 8, 16 (Fig. 7);
- `block_diffusion`: block diffusion from B = 1 (AR-like) to B = L (masked diffusion), which
  the study does not run: where between the two objectives does the advantage appear?

Each grid also trains the plain reference runs its figure compares against (plain AR, and the
diffusion model of the same size and data). `dvar sweep run --grid=ablations/NAME` runs the
study-scale grid (your corpus at --config.data.path), `--grid=ablations/NAME-cpu` the CPU one
on the embedded corpus; `dvar curves --workdir=W` plots validation loss against epochs per run,
as the study's Figures 7-8.
"""

from ml_collections import ConfigDict

from configs.grids.paper import study_config
from configs.grids.small import small_config

# The study's ablation setting: AR 140M, 50 epochs of U = 100M (Fig. 8) ...
STUDY_SIZE, STUDY_UNIQUE, STUDY_EPOCHS = "140M", 100_000_000, 50
# ... and for the orderings, 278M for 100 epochs (Fig. 7).
ORDERINGS_SIZE, ORDERINGS_EPOCHS = "278M", 100

# CPU: the small grid's cpu-s on 20k unique tokens for 24 epochs, where plain AR has overfit
# (its validation loss bottoms out near epoch 6; configs/grids/small.py runs).
CPU_SIZE, CPU_UNIQUE, CPU_EPOCHS = "cpu-s", 20_000, 24
CPU_EVALS = 12  # validation points per curve


def ablation_config(objective: str, cpu: bool, *, size: str | None = None,
                    epochs: int | None = None) -> ConfigDict:
    """The ablations' shared run: the study's (AR 140M, U 100M, 50 epochs, its dropout 0.1) or
    the CPU one (cpu-s, U 20k, 24 epochs, dropout 0 as the small grid)."""
    if cpu:
        cfg = small_config(objective, size or CPU_SIZE, CPU_UNIQUE, epochs or CPU_EPOCHS)
        cfg.eval.every_epochs = (epochs or CPU_EPOCHS) / CPU_EVALS
        cfg.eval.num_mc = 4
        return cfg
    return study_config(objective, size or STUDY_SIZE, STUDY_UNIQUE, epochs or STUDY_EPOCHS)
