"""The study's ablation figures as grids (PAPER.md §8), at the study's scale and on a CPU.

Each module defines `get_grid(cpu: bool = False) -> list[(name, ConfigDict)]`:

- `attention_dropout`: AR with dropout on the attention probabilities (Fig. 8a);
- `token_masking`: AR with the study's randmask (Fig. 8b);
- `orderings`: AR trained over N fixed token orders, N in 1, 2, 4, 8, 16 (Fig. 7);
- `block_diffusion`: block diffusion from B = 1 (AR-like) to B = L (masked diffusion), which
  the study does not run: where between the two objectives does the advantage appear?

Each grid also trains the plain reference runs its figure compares against (plain AR, and the
diffusion model of the same size and data). `dvar sweep run --grid=ablations/NAME` runs the
study-scale grid (C4 token stores at --config.data.train_store / validation_store),
`--grid=ablations/NAME-cpu` the CPU one on the embedded corpus (the shared run:
`dvar_jax.configs.recipes.ablation_config`);
`dvar curves --workdir=W` plots validation loss against epochs per run, as the study's
Figures 7-8.
"""
