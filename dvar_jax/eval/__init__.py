"""Downstream evaluation: log-likelihood scoring of AR and masked-diffusion models, and the 9
zero-shot tasks of the study (PAPER.md §6, DATA.md §4)."""
