"""AR with token masking (PAPER.md §8, Fig. 8b): the study's randmask at ratios r (each query
selected with probability r blocks each earlier key with probability t ~ U(1e-3, 1)), against
plain AR and diffusion. The study's r levels are not in its text; these span the range. It
found no improvement."""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import ablation_config

RATIOS = (0.1, 0.25, 0.5, 0.75)


def get_grid(cpu: bool = False) -> list[tuple[str, ConfigDict]]:
    runs = [("ar", ablation_config("ar", cpu)), ("diffusion", ablation_config("diffusion", cpu))]
    for ratio in RATIOS:
        cfg = ablation_config("ar", cpu)
        cfg.ar.randmask_ratio = ratio
        runs.append((f"ar-randmask{ratio:g}", cfg))
    return runs
