"""AR with attention dropout (PAPER.md §8, Fig. 8a): dropout on the attention probabilities at
0.25, 0.5 and 0.75, against plain AR and diffusion of the same size on the same data. The study
found no improvement: AR still overfits."""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import ablation_config

RATES = (0.25, 0.5, 0.75)


def get_grid(cpu: bool = False) -> list[tuple[str, ConfigDict]]:
    runs = [("ar", ablation_config("ar", cpu)), ("diffusion", ablation_config("diffusion", cpu))]
    for rate in RATES:
        cfg = ablation_config("ar", cpu)
        cfg.model.attention_dropout = rate
        runs.append((f"ar-attention_dropout{rate:g}", cfg))
    return runs
