"""Parameter counts and FLOPs as the study counts them (PAPER.md §2, §4.1): pure functions."""

from dvar_jax.model.transformer import TransformerConfig, ffn_hidden_size

GPT2_VOCAB = 50257  # the study's (unpadded) vocabulary, used in its N formula


def paper_param_count(d_model: int, n_layers: int, vocab_size: int = GPT2_VOCAB) -> int:
    """N = 4 L d^2 + 3 L d h_f + 6 L d + V d, the study's "N formula" (PAPER.md §2)."""
    h_f = ffn_hidden_size(d_model)
    return (4 * n_layers * d_model**2 + 3 * n_layers * d_model * h_f + 6 * n_layers * d_model
            + vocab_size * d_model)


def training_flops(params: float, tokens: float) -> float:
    """C = 6 N D, the study's compute for both objectives (PAPER.md §4.1)."""
    return 6.0 * params * tokens


def matmul_flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """FLOPs one training token costs in matmuls (forward + backward), for MFU.

    6 x (every weight used in a matmul, the tied output projection included) plus the attention
    score and value products, 12 L seq width, counted in full for causal models too because the
    XLA path computes the whole score matrix.
    """
    width = cfg.n_heads * cfg.head_dim
    per_layer = cfg.d_model * 3 * width + width * cfg.d_model + 3 * cfg.d_model * cfg.ffn_hidden
    weights = cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model
    return 6.0 * weights + 12.0 * cfg.n_layers * seq_len * width
