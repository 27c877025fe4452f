"""Parameter counts and FLOPs as the study counts them (PAPER.md §2, §4.1): pure functions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model module imports jax and flax: not needed to count FLOPs
    from dvar_jax.model.transformer import TransformerConfig

GPT2_VOCAB = 50257  # the study's (unpadded) vocabulary, used in its N formula


def paper_param_count(d_model: int, n_layers: int, vocab_size: int = GPT2_VOCAB) -> int:
    """N = 4 L d^2 + 3 L d h_f + 6 L d + V d, the study's "N formula" (PAPER.md §2)."""
    from dvar_jax.model.transformer import ffn_hidden_size

    h_f = ffn_hidden_size(d_model)
    return (4 * n_layers * d_model**2 + 3 * n_layers * d_model * h_f + 6 * n_layers * d_model
            + vocab_size * d_model)


# How a table's FLOPs column was counted, written next to it (e.g. as the column's label).
FLOPS_CONVENTION = "C = 6 N D"
FLOPS_CONVENTION_ATTENTION = "C = 6 N D + 12 L S w D"
FLOPS_CONVENTION_NOTE = {
    FLOPS_CONVENTION: "6 N D with N the study's parameter count (embeddings included, "
                      "V = 50257); attention scores not counted, as in the study",
    FLOPS_CONVENTION_ATTENTION: "6 N D plus attention: 12 x n_layers x seq_len x width per "
                                "token (QK^T and attention x V, forward + backward, the full "
                                "S x S square for both objectives)",
}


def attention_flops(tokens: float, n_layers: int, seq_len: int, width: int) -> float:
    """Training FLOPs of the attention products that 6 N D leaves out: 12 L S w per token.

    Per layer and token the forward pass multiplies the query by S keys (QK^T, 2 S w FLOPs) and
    the S attention weights by the values (2 S w); the backward pass costs twice the forward
    (x3 in all). width = n_heads x head_dim (Megatron's kv_channels). The full S x S square is
    counted for causal AR as for bidirectional diffusion (the XLA path computes all of it), so
    the two objectives still cost the same, as in the study's 6 N D.
    """
    return 12.0 * n_layers * seq_len * width * tokens


def training_flops(params: float, tokens: float, *,
                   attention: tuple[int, int, int] | None = None) -> float:
    """C = 6 N D, the study's compute for both objectives (PAPER.md §4.1).

    attention=(n_layers, seq_len, width) adds `attention_flops` (FLOPS_CONVENTION_ATTENTION);
    None (default) is the study's convention (FLOPS_CONVENTION).
    """
    flops = 6.0 * params * tokens
    if attention is not None:
        n_layers, seq_len, width = attention
        flops += attention_flops(tokens, n_layers, seq_len, width)
    return flops


def flops_convention(attention: bool = False) -> str:
    """The label of a FLOPs column counted with or without attention_flops."""
    return FLOPS_CONVENTION_ATTENTION if attention else FLOPS_CONVENTION


def matmul_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """FLOPs one training token costs in matmuls (forward + backward), for MFU.

    6 x (every weight used in a matmul, the tied output projection included) plus the attention
    score and value products, 12 L seq width, counted in full for causal models too because the
    XLA path computes the whole score matrix. Block diffusion runs its layers over [noisy; clean]
    (2 seq positions, each attending over 2 seq) per scored token, the output layer once.
    """
    width = cfg.n_heads * cfg.head_dim
    per_layer = cfg.d_model * 3 * width + width * cfg.d_model + 3 * cfg.d_model * cfg.ffn_hidden
    copies = 2 if cfg.diffusion_block else 1
    attention = 12.0 * cfg.n_layers * copies * seq_len * width
    output = 6.0 * cfg.vocab_size * cfg.d_model
    return copies * (6.0 * cfg.n_layers * per_layer + attention) + output
