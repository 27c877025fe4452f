"""Checking a run's config and turning it into the typed objects the code uses.

Everything here runs before any data is read or any array is made, so a bad config fails in
well under a second with a message naming the key, the value, and what is allowed.
"""

import dataclasses

import jax
from ml_collections import ConfigDict

from dvar_jax.configs.grids import FAMILIES, FAMILY_ISOFLOP
from dvar_jax.configs.models import MODEL_SIZES
from dvar_jax.model.attention import ATTENTION_IMPLS
from dvar_jax.model.output import LOSS_IMPLS
from dvar_jax.model.transformer import (
    DTYPES,
    REMAT_POLICIES,
    TransformerConfig,
    padded_vocab_size,
)
from dvar_jax.objectives import Objective, config_problems, objective_from_config
from dvar_jax.sharding import distributed_problems, mesh_size_problems, rules_from_config

DIMS = ("d_model", "n_layers", "n_heads", "head_dim")
DATA_SOURCES = ("shakespeare", "text", "store")
TOKENIZER_TYPES = ("unigram", "bpe")
# model.attention_impl, loss_impl and dtype may be "auto": chosen for the devices that run the
# model (`hardware_choices`), so one config suits a laptop and a TPU pod.
AUTO = "auto"
# From this many vocabulary rows, auto picks the chunked loss off TPU: the [batch, seq, vocab]
# float32 logits of the xla path (GPT-2: 50304 rows) dominate activation memory.
CHUNKED_LOSS_MIN_VOCAB = 16_384


def _divisors_near(n: int, target: int) -> str:
    """The divisors of n closest to target, smallest first, as "2, 4" (for error messages)."""
    divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))
    return ", ".join(str(d) for d in sorted(divisors[:2]))


def model_dims(model_cfg: ConfigDict) -> dict[str, int]:
    """d_model, n_layers, n_heads, head_dim from `model.name` (or the explicit dims for custom)."""
    name = model_cfg.name
    given = {k: model_cfg[k] for k in DIMS if model_cfg[k] is not None}
    if name == "custom":
        # head_dim may be left out: it is then d_model // n_heads, which must divide evenly.
        missing = [k for k in DIMS if k not in given and k != "head_dim"]
        if missing:
            raise ValueError(f"model.name='custom' needs model.{', model.'.join(missing)}")
        if "head_dim" not in given:
            d_model, n_heads = given["d_model"], given["n_heads"]
            bad = [f"model.{k}={given[k]}" for k in ("d_model", "n_heads") if given[k] < 1]
            if bad:
                raise ValueError(f"{', '.join(bad)}: must be >= 1")
            if d_model % n_heads:
                raise ValueError(
                    f"model.n_heads={n_heads} does not divide model.d_model={d_model}: allowed "
                    f"n_heads dividing d_model (e.g. {_divisors_near(d_model, n_heads)}), or "
                    "give model.head_dim explicitly")
            given["head_dim"] = d_model // n_heads
        return {k: given[k] for k in DIMS}
    if name not in MODEL_SIZES:
        raise ValueError(
            f"model.name={name!r} is not a known size; choose one of "
            f"{', '.join(MODEL_SIZES)} (configs/models.py) or 'custom'")
    if given:
        raise ValueError(
            f"{', '.join(f'model.{k}={v!r}' for k, v in given.items())} given with "
            f"model.name={name!r}; "
            "set model.name=custom to choose the dimensions yourself")
    return dict(zip(DIMS, MODEL_SIZES[name], strict=True))


def validate_config(cfg: ConfigDict) -> None:
    """Raises ValueError listing every impossible value in the config."""
    problems = []

    def check(ok: bool, message: str):
        if not ok:
            problems.append(message)

    problems += config_problems(cfg)  # objective, ar.*, block_diffusion.*
    check(cfg.get("family", "") in ("", *FAMILIES),
          f"family={cfg.get('family')!r}: allowed {', '.join(repr(f) for f in FAMILIES)} or '' "
          "(none)")
    check(cfg.get("family", "") != FAMILY_ISOFLOP or cfg.data.epochs <= 1,
          f"family={FAMILY_ISOFLOP!r} with data.epochs={cfg.data.epochs}: an isoFLOP run is one "
          "epoch on fresh data (data.epochs <= 1); use 'data_constrained'")
    try:
        dims = model_dims(cfg.model)
        for k, v in dims.items():
            check(v >= 1, f"model.{k}={v}: must be >= 1")
        check(dims.get("head_dim", 2) % 2 == 0,
              f"model.head_dim={dims.get('head_dim')}: must be even (RoPE)")
    except ValueError as e:
        problems.append(str(e))
    for k in ("attention_dropout", "hidden_dropout"):
        check(0.0 <= cfg.model[k] < 1.0, f"model.{k}={cfg.model[k]}: must be in [0, 1)")
    check(cfg.model.attention_impl in (AUTO, *ATTENTION_IMPLS),
          f"model.attention_impl={cfg.model.attention_impl!r}: allowed "
          f"{', '.join((AUTO, *ATTENTION_IMPLS))}")
    check(cfg.model.attention_impl not in ("pallas", "splash")
          or cfg.model.attention_dropout == 0.0,
          f"model.attention_dropout={cfg.model.attention_dropout}: must be 0 with "
          f"model.attention_impl={cfg.model.attention_impl!r} (dropout needs 'xla' or 'auto')")
    check(cfg.model.attention_impl != "splash" or cfg.data.seq_len % 128 == 0,
          f"data.seq_len={cfg.data.seq_len}: model.attention_impl='splash' needs a multiple of "
          "128 (or use 'pallas', which pads)")
    check(cfg.model.loss_impl in (AUTO, *LOSS_IMPLS),
          f"model.loss_impl={cfg.model.loss_impl!r}: allowed {', '.join((AUTO, *LOSS_IMPLS))}")
    check(cfg.model.remat in REMAT_POLICIES,
          f"model.remat={cfg.model.remat!r}: allowed {', '.join(REMAT_POLICIES)}")
    check(isinstance(cfg.model.scan_layers, bool),
          f"model.scan_layers={cfg.model.scan_layers!r}: must be True or False")
    for k in ("attention_block_q", "attention_block_k", "loss_block_t", "loss_block_v"):
        check(cfg.model[k] > 0 and cfg.model[k] % 8 == 0,
              f"model.{k}={cfg.model[k]}: must be a positive multiple of 8")
    check(cfg.model.dtype in (AUTO, *DTYPES),
          f"model.dtype={cfg.model.dtype!r}: allowed {', '.join((AUTO, *DTYPES))}")

    d = cfg.data
    check(d.source in DATA_SOURCES, f"data.source={d.source!r}: allowed {', '.join(DATA_SOURCES)}")
    check(d.source != "text" or bool(d.path), "data.source='text' needs data.path")
    check(0.0 < d.validation_fraction < 1.0,
          f"data.validation_fraction={d.validation_fraction}: must be in (0, 1)")
    for key in ("train_store", "validation_store"):
        check(d.source != "store" or bool(d[key]), f"data.source='store' needs data.{key} "
              "(a folder made by `dvar prepare`)")
    check(d.unique_documents >= 0,
          f"data.unique_documents={d.unique_documents}: must be >= 0 (0 = use unique_tokens)")
    if d.unique_documents:
        check(d.unique_tokens == 0, f"data.unique_documents={d.unique_documents} and "
              f"data.unique_tokens={d.unique_tokens}: give one of them (set the other to 0)")
        check(d.source == "store", f"data.unique_documents={d.unique_documents}: needs "
              f"data.source='store', not {d.source!r} (or use data.unique_tokens)")
    else:
        check(d.unique_tokens >= 2, f"data.unique_tokens={d.unique_tokens}: must be >= 2")
    check(d.eod_id >= -1, f"data.eod_id={d.eod_id}: must be >= 0, or -1 (the tokenizer's own)")
    check(d.epochs > 0, f"data.epochs={d.epochs}: must be > 0")
    check(d.seq_len >= 2, f"data.seq_len={d.seq_len}: must be >= 2")
    check(d.validation_tokens >= 0,
          f"data.validation_tokens={d.validation_tokens}: must be >= 0 (0 = all)")
    check(d.vocab_size >= 16, f"data.vocab_size={d.vocab_size}: must be >= 16")
    check(d.tokenizer_type in TOKENIZER_TYPES,
          f"data.tokenizer_type={d.tokenizer_type!r}: allowed {', '.join(TOKENIZER_TYPES)}")

    t = cfg.train
    check(t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be >= 1")
    check(t.microbatches >= 1 and t.batch_size % t.microbatches == 0,
          f"train.microbatches={t.microbatches}: must be >= 1 and divide train.batch_size="
          f"{t.batch_size}")
    check(t.peak_lr > 0, f"train.peak_lr={t.peak_lr}: must be > 0")
    check(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    check(0.0 <= t.warmup_fraction < 1.0,
          f"train.warmup_fraction={t.warmup_fraction}: must be in [0, 1)")
    check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    check(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0,
          f"train.b1={t.b1}, train.b2={t.b2}: each must be in [0, 1)")
    check(t.eps > 0, f"train.eps={t.eps}: must be > 0")
    check(t.grad_clip > 0, f"train.grad_clip={t.grad_clip}: must be > 0")
    check(0.0 <= t.ema_decay < 1.0,
          f"train.ema_decay={t.ema_decay}: must be in [0, 1) (0 = no moving average)")
    check(t.log_every >= 1, f"train.log_every={t.log_every}: must be >= 1")

    check(cfg.checkpoint.every_steps >= 0,
          f"checkpoint.every_steps={cfg.checkpoint.every_steps}: must be >= 0 (0 = every eval)")
    check(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep}: must be >= 1")

    problems += mesh_size_problems(cfg.mesh)
    try:
        rules_from_config(cfg.mesh.rules)
    except (ValueError, TypeError) as e:
        problems.append(str(e))
    problems += distributed_problems(cfg.distributed)

    e = cfg.eval
    check(e.every_epochs > 0, f"eval.every_epochs={e.every_epochs}: must be > 0")
    check(e.batch_size >= 1, f"eval.batch_size={e.batch_size}: must be >= 1")
    check(e.num_mc >= 1, f"eval.num_mc={e.num_mc}: must be >= 1")

    if len(problems) == 1:  # the usual case: one line
        raise ValueError(f"invalid config: {problems[0]}")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# TransformerConfig fields that do not come from the cfg.model key of the same name.
_DERIVED_MODEL_FIELDS = ("vocab_size", "causal", "diffusion_block", "target_positions", *DIMS)


def hardware_choices(cfg: ConfigDict, platform: str, vocab_rows: int,
                     objective: Objective) -> dict[str, str]:
    """attention_impl, loss_impl and dtype of the model, with "auto" chosen for `platform`
    ("tpu", "gpu" or "cpu": where the model runs, not where this process compiles).

    attention: splash on TPU when nothing needs the dense path (attention dropout 0, no token
    masking, no block-diffusion mask, seq_len a multiple of 128), else xla. loss: the fused
    pallas kernel on TPU; elsewhere chunked from CHUNKED_LOSS_MIN_VOCAB rows, else xla. dtype:
    float32 on CPU (no native bfloat16 matmul), else bfloat16. Explicit values are kept.
    """
    m, tpu = cfg.model, platform == "tpu"
    attention = m.attention_impl
    if attention == AUTO:
        dense_needed = (m.attention_dropout > 0 or cfg.ar.randmask_ratio > 0
                        or objective.diffusion_block > 0 or cfg.data.seq_len % 128 != 0)
        attention = "splash" if tpu and not dense_needed else "xla"
    loss = m.loss_impl
    if loss == AUTO:
        loss = "pallas" if tpu else "chunked" if vocab_rows >= CHUNKED_LOSS_MIN_VOCAB else "xla"
    dtype = m.dtype
    if dtype == AUTO:
        dtype = "float32" if platform == "cpu" else "bfloat16"
    return {"attention_impl": attention, "loss_impl": loss, "dtype": dtype}


def transformer_config(cfg: ConfigDict, tokenizer_vocab_size: int,
                       objective: Objective | None = None,
                       platform: str | None = None) -> TransformerConfig:
    """The model of this run (`cfg` validated). Every TransformerConfig field named like a
    cfg.model key takes its value; the objective (default: the config's) decides the attention
    mask; the vocabulary is padded to hold MASK; "auto" choices are made for `platform`
    (default: JAX's default backend here), see `hardware_choices`.
    """
    objective = objective_from_config(cfg) if objective is None else objective
    vocab_rows = padded_vocab_size(tokenizer_vocab_size)
    copied = {f.name: cfg.model[f.name] for f in dataclasses.fields(TransformerConfig)
              if f.name in cfg.model and f.name not in _DERIVED_MODEL_FIELDS}
    copied |= hardware_choices(cfg, platform or jax.default_backend(), vocab_rows, objective)
    return TransformerConfig(
        vocab_size=vocab_rows,
        causal=objective.causal,
        diffusion_block=objective.diffusion_block,
        # Targets sit at positions 1..seq_len: one row more than the sequence.
        target_positions=cfg.data.seq_len + 1 if cfg.ar.target_positions else 0,
        **model_dims(cfg.model),
        **copied,
    )
