"""Block diffusion (Arriola et al., ICLR 2025) from AR to masked diffusion: block sizes B from
1 (each token predicted from a clean prefix, AR-like) to the whole sequence (masked diffusion),
with plain AR and diffusion as references, on the ablations' data-constrained run. Not in the
study; it asks how much of diffusion's advantage survives left-to-right generation by blocks."""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import ablation_config

# As fractions of the sequence: 1 token, 1/16, 1/4 and all of it.
BLOCK_FRACTIONS = (0.0, 1 / 16, 1 / 4, 1.0)


def get_grid(cpu: bool = False) -> list[tuple[str, ConfigDict]]:
    runs = [("ar", ablation_config("ar", cpu)), ("diffusion", ablation_config("diffusion", cpu))]
    for fraction in BLOCK_FRACTIONS:
        cfg = ablation_config("block_diffusion", cpu)
        cfg.block_diffusion.block_size = max(1, int(cfg.data.seq_len * fraction))
        runs.append((f"block_diffusion-B{cfg.block_diffusion.block_size}", cfg))
    return runs
