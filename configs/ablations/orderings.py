"""AR over N token orders (PAPER.md §8, Fig. 7): N in 1, 2, 4, 8, 16 fixed orders drawn by the
study's noisy local perturbations (its App. 12), no target-position input, evaluated left to
right; against diffusion of the same size on the same data. The study (AR 278M, 100 epochs):
validation loss falls and overfitting comes later as N grows; at N = 16 it approaches
diffusion's."""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import ORDERINGS_EPOCHS, ORDERINGS_SIZE, ablation_config

NUM_ORDERS = (1, 2, 4, 8, 16)


def get_grid(cpu: bool = False) -> list[tuple[str, ConfigDict]]:
    size, epochs = (None, None) if cpu else (ORDERINGS_SIZE, ORDERINGS_EPOCHS)
    runs = []
    for n in NUM_ORDERS:
        cfg = ablation_config("ar", cpu, size=size, epochs=epochs)
        cfg.ar.num_orders = n
        runs.append((f"ar-orders{n}", cfg))
    runs.append(("diffusion", ablation_config("diffusion", cpu, size=size, epochs=epochs)))
    return runs
