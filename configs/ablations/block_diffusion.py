"""Block diffusion (Arriola et al., ICLR 2025) from AR to masked diffusion: block sizes B from
1 (each token predicted from a clean prefix, AR-like) to the whole sequence (masked diffusion),
with plain AR and diffusion as references, on the ablations' data-constrained run. Not in the
study; it asks how much of diffusion's advantage survives left-to-right generation by blocks."""

from ml_collections import ConfigDict

from dvar_jax.configs.recipes import ablation_config

# As fractions of the sequence: 1 token, 1/16, 1/4 and all of it.
BLOCK_FRACTIONS = (0.0, 1 / 16, 1 / 4, 1.0)
# On CPU, the run of the README's block-diffusion table (cpu-s, U 20k, 24 epochs, batch 16),
# not the AR ablations' longer one: block diffusion trains twice the tokens a step.
CPU_RUN = {"unique_tokens": 20_000, "epochs": 24, "batch_size": 16}


def get_grid(cpu: bool = False) -> list[tuple[str, ConfigDict]]:
    run = CPU_RUN if cpu else {}
    runs = [("ar", ablation_config("ar", cpu, **run)),
            ("diffusion", ablation_config("diffusion", cpu, **run))]
    for fraction in BLOCK_FRACTIONS:
        cfg = ablation_config("block_diffusion", cpu, **run)
        cfg.block_diffusion.block_size = max(1, int(cfg.data.seq_len * fraction))
        runs.append((f"block_diffusion-B{cfg.block_diffusion.block_size}", cfg))
    return runs
