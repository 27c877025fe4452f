"""Model sizes by name: the study's table (PAPER.md §2, from datablations' model_params.sh) plus
CPU-sized models for demos and tests.

Each entry is (d_model, n_layers, n_heads, head_dim). head_dim is Megatron's kv_channels, so the
attention width n_heads * head_dim differs from d_model for 20M and 35M, as in the study.
The SwiGLU width is derived from d_model (`dvar_jax.model.transformer.ffn_hidden_size`).
"""

# The study's sizes, named as in the paper (by their "N formula" count rounded as the paper does).
PAPER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "7M": (128, 3, 4, 32),
    "14M": (224, 4, 7, 32),
    "20M": (288, 5, 7, 32),
    "35M": (448, 6, 7, 32),
    "44M": (512, 8, 8, 64),
    "57M": (576, 9, 9, 64),
    "74M": (640, 10, 10, 64),
    "90M": (640, 13, 10, 64),
    "106M": (640, 16, 10, 64),
    "117M": (768, 12, 12, 64),
    "140M": (768, 15, 12, 64),
    "163M": (768, 18, 12, 64),
    "175M": (896, 14, 14, 64),
    "196M": (896, 16, 14, 64),
    "217M": (896, 18, 14, 64),
    "251M": (1024, 16, 16, 64),
    "278M": (1024, 18, 16, 64),
    "306M": (1024, 20, 16, 64),
    "425M": (1280, 18, 10, 128),
    "489M": (1280, 21, 10, 128),
    "509M": (1408, 18, 11, 128),
    "552M": (1280, 24, 10, 128),
    "587M": (1408, 21, 11, 128),
    "632M": (1536, 19, 12, 128),
    "664M": (1408, 24, 11, 128),
    "724M": (1536, 22, 12, 128),
    "816M": (1536, 25, 12, 128),
    "893M": (1792, 20, 14, 128),
    "1018M": (1792, 23, 14, 128),
    "1143M": (1792, 26, 14, 128),
    "1266M": (2048, 22, 16, 128),
    "1424M": (2176, 22, 17, 128),
    "1429M": (2048, 25, 16, 128),
    "1593M": (2048, 28, 16, 128),
    "1609M": (2176, 25, 17, 128),
    "1731M": (2304, 24, 18, 128),
    "1794M": (2176, 28, 17, 128),
    "2007M": (2304, 28, 18, 128),
    "2283M": (2304, 32, 18, 128),
    "2298M": (2560, 26, 20, 128),
    "2639M": (2560, 30, 20, 128),
}

# Sizes for a 2-core CPU (the study's family, scaled down). With the embedded corpus's
# 4096-token vocabulary the embedding is 4224 * d_model of the count.
CPU_SIZES: dict[str, tuple[int, int, int, int]] = {
    "cpu-xxs": (32, 2, 1, 32),
    "cpu-xs": (64, 2, 2, 32),
    "cpu-sm": (96, 3, 3, 32),  # between cpu-xs and cpu-s: the small grid's fourth size
    "cpu-s": (128, 4, 4, 32),
    "cpu-m": (192, 6, 6, 32),
    "cpu-l": (256, 8, 8, 32),
}

MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {**PAPER_SIZES, **CPU_SIZES}


def model_shape(spec: str) -> tuple[int, int, int, int]:
    """(d_model, n_layers, n_heads, head_dim) of a size name, or of "d_model,n_layers,n_heads,
    head_dim" written out (benchmarks and scripts take either)."""
    if spec in MODEL_SIZES:
        return MODEL_SIZES[spec]
    try:
        d_model, n_layers, n_heads, head_dim = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"size {spec!r}: a name from configs/models.py "
                         "or d_model,n_layers,n_heads,head_dim") from None
    return d_model, n_layers, n_heads, head_dim
