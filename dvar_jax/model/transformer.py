"""One Llama-style transformer for both objectives (PAPER.md §1.1).

Pre-norm RMSNorm (eps 1e-5), RoPE (theta 1e4, rotate-half), SwiGLU, no biases, tied input and
output embeddings, N(0, 0.02) init with the attention-out and MLP-down projections scaled by
1/sqrt(2 * n_layers). The model knows little about the objective: `causal`, and for the
ablations a block-diffusion block size (`diffusion_block`, inputs [noisy; clean]) and an optional
target-position table (`target_positions`, sigma-GPT style). Per-call inputs the objectives may
pass: RoPE position ids, target positions and a dense attention mask.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `mlp`, ...) so that a
rule table can map them onto a device mesh.

Memory and compile time (`remat`, `scan_layers`): each block is applied through one pure
function of (its parameters, inputs), which `remat` wraps in `jax.checkpoint` with a policy.
Unrolled, the blocks are a list of modules. Scanned, they are one module whose parameters are
stacked along a leading layer axis (logical name None: never sharded), so the block, its gradient
and the optimizer's update of its parameters are each traced and compiled once whatever the
depth. The initial parameters are the same in both layouts (built block by block, then stacked),
and checkpoints always hold the unrolled layout (`dvar_jax.checkpoint.relayout_blocks`), so a run
may resume scanned or not.
"""

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from dvar_jax.model.attention import ATTENTION_IMPLS, apply_rope, attention, rope_tables
from dvar_jax.model.output import LOSS_IMPLS, kernel_sequence_losses, logits_sequence_losses
from dvar_jax.sharding import constrain

# Logical names of the residual stream [batch, seq, d_model] at block boundaries.
RESIDUAL_AXES = ("batch", "seq", "activation_embed")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# What the backward pass may keep from the forward pass of a block (`model.remat`):
#   none: everything (no recomputation; the most memory);
#   full: only the block's input (the forward is recomputed in the backward);
#   dots: also the outputs of matmuls without batch dimensions, i.e. the q/k/v, attention-out
#         and MLP projections; attention scores and elementwise results are recomputed.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def ffn_hidden_size(d_model: int) -> int:
    """SwiGLU width h_f = int(8 d / 3 / 64) * 64, as Megatron computes it (PAPER.md §1.1)."""
    return int((4 * d_model * 2 / 3) / 64) * 64


def padded_vocab_size(tokenizer_vocab_size: int, multiple: int = 128) -> int:
    """Rows of the embedding: the tokenizer's ids, then MASK (= tokenizer_vocab_size), rounded up.

    GPT-2's 50257 gives 50304, as in the study; a 4096-token SentencePiece model gives 4224.
    """
    return -(-(tokenizer_vocab_size + 1) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of the model. `vocab_size` is the padded embedding row count."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    causal: bool
    # > 0: block diffusion (Arriola et al. 2025); inputs are [noisy; clean] halves and attention
    # follows kernels/masks.py's block_diffusion_allowed with this block size.
    diffusion_block: int = 0
    # > 0: rows of a learned table of target positions (which position each input predicts),
    # added to the input embeddings: the sigma-GPT variant of N-ordering AR. 0 = none.
    target_positions: int = 0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    dtype: str = "float32"
    attention_impl: str = "xla"
    attention_block_q: int = 128
    attention_block_k: int = 128
    loss_impl: str = "xla"
    loss_block_t: int = 256
    loss_block_v: int = 512
    remat: str = "none"
    scan_layers: bool = False
    rope_theta: float = 1e4
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.diffusion_block < 0 or self.target_positions < 0:
            raise ValueError(f"model diffusion_block={self.diffusion_block} and target_positions="
                             f"{self.target_positions} must be >= 0")
        if self.diffusion_block and self.causal:
            raise ValueError(f"model diffusion_block={self.diffusion_block} needs causal=False")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model {name} must be in [0, 1), got {getattr(self, name)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"model attention_impl must be one of {ATTENTION_IMPLS}, "
                             f"got {self.attention_impl!r}")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"model loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model remat must be one of {list(REMAT_POLICIES)}, "
                             f"got {self.remat!r}")

    @property
    def ffn_hidden(self) -> int:
        return ffn_hidden_size(self.d_model)


def _param_meta(*axes: str) -> dict:
    # Logical names only: placing them on a mesh is the sharding layer's job, so no eager sharding.
    return {"out_sharding": axes, "eager_sharding": False}


class Block(nnx.Module):
    """Pre-norm attention + SwiGLU MLP, each on a residual branch."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        width = cfg.n_heads * cfg.head_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))

        def linear(n_in, n_out, kernel_init, axes):
            return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, kernel_init=kernel_init,
                              kernel_metadata=_param_meta(*axes), rngs=rngs)

        def norm():
            return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                               scale_metadata=_param_meta("norm"), rngs=rngs)

        self.attn_norm = norm()
        # q, k and v in one matmul: one large GEMM is faster than three small ones on every backend.
        self.qkv = linear(cfg.d_model, 3 * width, init, ("embed", "qkv"))
        self.attn_out = linear(width, cfg.d_model, out_init, ("heads", "embed"))
        self.mlp_norm = norm()
        # SwiGLU's gate and up projections fused the same way: [d, 2 * h_f] -> silu(x1) * x2.
        self.mlp_in = linear(cfg.d_model, 2 * cfg.ffn_hidden, init, ("embed", "mlp"))
        self.mlp_out = linear(cfg.ffn_hidden, cfg.d_model, out_init, ("mlp", "embed"))
        self.dropout = nnx.Dropout(cfg.hidden_dropout)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
                 dropout_keys: jax.Array | None, mask: jax.Array | None = None) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]; mask: [batch, seq, seq] or None.

        dropout_keys: None (deterministic) or [3] keys: attention, then the two residual
        branches (see `block_dropout_keys`).
        """
        cfg = self.cfg
        batch, seq, _ = x.shape
        deterministic = dropout_keys is None
        keys = (None, None, None) if deterministic else tuple(dropout_keys)

        qkv = self.qkv(self.attn_norm(x)).reshape(batch, seq, 3, cfg.n_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = attention(
            q, k, v, impl=cfg.attention_impl, causal=cfg.causal,
            diffusion_block=cfg.diffusion_block, mask=mask,
            dropout_rate=cfg.attention_dropout, dropout_rng=keys[0],
            blocks=(cfg.attention_block_q, cfg.attention_block_k))
        attn = self.attn_out(attn.reshape(batch, seq, cfg.n_heads * cfg.head_dim))
        x = x + self.dropout(attn, deterministic=deterministic, rngs=keys[1])

        gate, up = jnp.split(self.mlp_in(self.mlp_norm(x)), 2, axis=-1)
        mlp = self.mlp_out(jax.nn.silu(gate) * up)
        return x + self.dropout(mlp, deterministic=deterministic, rngs=keys[2])


def block_dropout_keys(cfg: TransformerConfig, dropout_rng: jax.Array) -> tuple[jax.Array,
                                                                                jax.Array]:
    """(embedding key, [n_layers, 3] block keys) for one dropout-on forward pass.

    The keys are those an `nnx.Rngs(dropout=dropout_rng)` stream hands out when the embedding
    dropout and then every block draw from it in order (fold_in(rng, count), and nnx's Dropout
    draws nothing at rate 0), so runs keep the numbers they had before blocks took explicit
    keys. Explicit keys are what lets a scan over layers give each layer its own.
    """
    hidden = cfg.hidden_dropout > 0
    first = 1 if hidden else 0  # the embedding's draw
    per_block = 3 if hidden else 1  # attention always draws; the two branches only if hidden
    layer = jnp.arange(cfg.n_layers)[:, None]
    counts = first + per_block * layer + jnp.minimum(jnp.arange(3), per_block - 1)[None, :]
    fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), in_axes=(None, 0))
    return jax.random.fold_in(dropout_rng, 0), fold(dropout_rng, counts)


def _apply_block(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, cos: jax.Array,
                 sin: jax.Array, keys: jax.Array | None, mask: jax.Array | None) -> jax.Array:
    """One block as a pure function of its parameters: what remat and scan transform."""
    x = constrain(x, RESIDUAL_AXES)
    return constrain(nnx.merge(graphdef, params)(x, cos, sin, keys, mask), RESIDUAL_AXES)


def stack_blocks(blocks: Sequence[Block]) -> Block:
    """One Block whose parameters are `blocks`' stacked along a new leading layer axis
    ([n_layers, ...] leaves, logical axis None in front of each parameter's own names): the
    layout a scan over layers runs over."""
    def stack(*variables: nnx.Variable) -> nnx.Variable:
        first = variables[0]
        return first.replace(jnp.stack([v.get_value() for v in variables]),
                             out_sharding=(None, *first.get_metadata()["out_sharding"]))

    states = [nnx.state(block) for block in blocks]
    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(nnx.graphdef(blocks[0]), stacked)


def stacked_over_layers(path: Sequence) -> bool:
    """Whether the parameter at `path` (a pytree path into the model's parameter State, as
    jax.tree_util gives it) is stacked along a leading layer axis: under `blocks` without a layer
    index, i.e. a scanned model's."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if "blocks" not in names:
        return False
    after = names.index("blocks") + 1
    return after < len(names) and not names[after].isdigit()


class Transformer(nnx.Module):
    """Token ids [batch, seq] -> logits [batch, seq, vocab_size] (float32)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = DTYPES[cfg.dtype]
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype,
                               embedding_init=nnx.initializers.normal(cfg.init_std),
                               embedding_metadata=_param_meta("vocab", "embed"), rngs=rngs)
        if cfg.target_positions:
            self.target_embed = nnx.Embed(
                cfg.target_positions, cfg.d_model, dtype=dtype,
                embedding_init=nnx.initializers.normal(cfg.init_std),
                embedding_metadata=_param_meta(None, "embed"), rngs=rngs)
        # Built one by one in both layouts, so that a seed gives the same initial parameters.
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype,
                                      scale_metadata=_param_meta("norm"), rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """tokens [batch, seq] int -> embeddings [batch, seq, d_model], on the residual stream's
        sharding.

        The table is gathered whole along `embed` before the lookup, as FSDP gathers every
        weight before use. Looked up from a table split on `embed` over fsdp, the rows come out
        split on `embed`, and XLA can only reach the batch-split residual stream (and the
        gradient the way back) by replicating them first: the "involuntary full
        rematerialization" it warns about on meshes with both fsdp and data or tensor.
        """
        (table,) = self.embed.promote_dtype((self.embed.embedding[...],), dtype=self.embed.dtype,
                                            inexact=False)
        table = constrain(table, ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0), RESIDUAL_AXES)

    def hidden_states(self, x: jax.Array, positions: jax.Array | None = None,
                      dropout_rng: jax.Array | None = None, *,
                      target_positions: jax.Array | None = None,
                      attention_mask: jax.Array | None = None) -> jax.Array:
        """Embedded inputs [batch, seq, d_model] -> final normed states [batch, seq, d_model].

        positions: [batch or 1, seq] RoPE position ids (default 0..seq-1). dropout_rng: a key turns
        dropout on (training); None is the deterministic model (evaluation).
        target_positions: [batch or 1, seq] the position each input predicts, for a model with a
        target-position table (default 1..seq: left to right); ignored without one.
        attention_mask: [batch, seq, seq] bool, True where a query may attend a key, AND-ed with
        the model's own mask (xla attention only).
        """
        if positions is None:  # one table row shared by the batch, not recomputed per row
            positions = jnp.arange(x.shape[1])[None, :]
        if self.cfg.target_positions:
            if target_positions is None:
                target_positions = jnp.arange(1, x.shape[1] + 1)[None, :]
            x = x + self.target_embed(target_positions)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        keys = None
        if dropout_rng is not None:
            embed_key, keys = block_dropout_keys(self.cfg, dropout_rng)
            x = self.dropout(x, deterministic=False, rngs=embed_key)
        return self.final_norm(self._blocks(x, cos, sin, keys, attention_mask))

    def _blocks(self, x: jax.Array, cos: jax.Array, sin: jax.Array, keys: jax.Array | None,
                mask: jax.Array | None) -> jax.Array:
        """Every block in order, unrolled or scanned, each under the remat policy."""
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)  # [n_layers, ...] leaves
        else:
            graphdef = nnx.graphdef(self.blocks[0])  # every block has the same structure
        apply = partial(_apply_block, graphdef)
        if self.cfg.remat != "none":
            # Under scan the body is not inlined twice, so XLA's CSE cannot undo the remat.
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat],
                                   prevent_cse=not self.cfg.scan_layers)
        if not self.cfg.scan_layers:
            for i, block in enumerate(self.blocks):
                x = apply(nnx.state(block), x, cos, sin, None if keys is None else keys[i], mask)
            return x

        def body(x, layer):
            params, layer_keys = layer
            return apply(params, x, cos, sin, layer_keys, mask), None

        x, _ = jax.lax.scan(body, x, (stacked, keys))
        return x

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """tokens: [batch, seq] int -> logits [batch, seq, vocab_size] float32."""
        h = self.hidden_states(self.embed_tokens(tokens), positions, dropout_rng)
        return self.embed.attend(h).astype(jnp.float32)

    def sequence_losses(self, tokens: jax.Array, targets: jax.Array, weights: jax.Array,
                        positions: jax.Array | None = None,
                        dropout_rng: jax.Array | None = None, *,
                        target_positions: jax.Array | None = None,
                        attention_mask: jax.Array | None = None) -> jax.Array:
        """sum_s weights[b, s] * CE(logits[b, s], targets[b, s]) per sequence -> [batch] float32.

        tokens: [batch, seq] int; targets: [batch, n] int and weights: [batch, n] float for the
        first n <= seq positions (block diffusion scores only its noisy half; the rest are never
        projected onto the vocabulary). positions, target_positions, attention_mask: as
        `hidden_states`. The objectives' one entry point: with `loss_impl` chunked or pallas the
        [batch, n, vocab] logits are never built (model/output.py).
        """
        h = self.hidden_states(self.embed_tokens(tokens), positions, dropout_rng,
                               target_positions=target_positions, attention_mask=attention_mask)
        h = h[:, :targets.shape[1]]
        if self.cfg.loss_impl == "xla":
            return logits_sequence_losses(self.embed.attend(h), targets, weights)
        return kernel_sequence_losses(h, self.embed.embedding[...], targets, weights,
                                      impl=self.cfg.loss_impl, block_t=self.cfg.loss_block_t,
                                      block_v=self.cfg.loss_block_v)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters actually in the model (tied embedding counted once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
