"""Base configuration: the study's settings (PAPER.md §1, §4, §5) at a size chosen by name.

Every field is documented here; `dvar train --config=configs/base.py --config.KEY=VALUE`
overrides any of them. The config is locked: an unknown key is an error.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    # "ar" (next-token prediction, causal attention), "diffusion" (masked diffusion,
    # bidirectional attention) or "block_diffusion" (AR over blocks, diffusion within each;
    # see block_diffusion below). The objective decides the attention mask.
    c.objective = "ar"
    # Seed for parameter init, data order, masking and dropout (Megatron default 1234).
    c.seed = 1234
    # The run's family in a scaling study, i.e. which step of `dvar fit` its results record
    # feeds (docs/scaling_laws.md): "isoflop" (one epoch on fresh data: step 1),
    # "data_constrained" (a fixed unique budget U at any epochs: step 2), or "" (none: the fit
    # classifies the record by its rule for older records). Set by the grids; it does not change
    # training.
    c.family = ""

    c.model = ConfigDict()
    # A size from configs/models.py (e.g. "140M", "cpu-s"), or "custom" with the dims below.
    c.model.name = "7M"
    c.model.d_model = config_dict.placeholder(int)  # only with name="custom"
    c.model.n_layers = config_dict.placeholder(int)  # only with name="custom"
    c.model.n_heads = config_dict.placeholder(int)  # only with name="custom"
    # Only with name="custom"; optional there: left out, it is d_model // n_heads (which must
    # divide evenly). Given, n_heads * head_dim may differ from d_model (as the study's 20M).
    c.model.head_dim = config_dict.placeholder(int)
    # Dropout on attention probabilities and on residual branches + embeddings. The study's
    # code runs Megatron's defaults (0.1 / 0.1); its paper is silent (PAPER.md §12.1).
    c.model.attention_dropout = 0.1
    c.model.hidden_dropout = 0.1
    # Compute dtype of activations and matmuls; parameters and optimizer state stay float32.
    # "auto": bfloat16 on TPU and GPU, float32 on CPU (no native bfloat16 matmul there).
    c.model.dtype = "auto"  # "auto" | "float32" | "bfloat16"
    # "xla" (reference), "pallas" (our flash attention kernel) or "splash" (JAX's TPU splash
    # kernel); both kernels need attention_dropout = 0 and run in interpret mode on CPU.
    # "auto": splash on TPU when attention_dropout is 0 (and the objective allows it: no
    # token masking, no block diffusion; seq_len a multiple of 128), otherwise xla.
    c.model.attention_impl = "auto"
    c.model.attention_block_q = 128  # pallas query block: a multiple of 8 (TPU: of 128)
    c.model.attention_block_k = 128  # pallas key block: a multiple of 8 (TPU: of 128)
    # Output layer + cross-entropy: "xla" (full [batch, seq, vocab] logits), "chunked" (pure JAX
    # over vocabulary blocks) or "pallas" (fused kernel); the last two never build the logits.
    # "auto": pallas on TPU; elsewhere chunked from 16,384 vocabulary rows up, else xla.
    c.model.loss_impl = "auto"
    c.model.loss_block_t = 256  # pallas token block: a multiple of 8
    c.model.loss_block_v = 512  # vocabulary block (chunked and pallas): a multiple of 8
    # What the backward pass keeps of each block's forward: "none" (everything), "full" (the
    # block's input only: recompute the rest) or "dots" (also the outputs of the projections,
    # jax.checkpoint_policies.dots_with_no_batch_dims_saveable). Numbers do not change.
    c.model.remat = "none"
    # Run the blocks under jax.lax.scan, their parameters stored stacked [n_layers, ...]: one
    # block and its optimizer update are compiled whatever the depth. Initial parameters,
    # checkpoints (always saved unrolled) and sharding rules are the unrolled model's.
    c.model.scan_layers = False

    # The study's AR ablations (PAPER.md §8); objective="ar" only. The defaults are plain AR.
    # Attention dropout, the third, is model.attention_dropout.
    c.ar = ConfigDict()
    # Token masking (the study's randmask): each query position is selected with this
    # probability; a selected query draws t ~ U(1e-3, 1) and blocks each earlier key with
    # probability t (diagonal kept). 0 = off. Needs model.attention_impl="xla".
    c.ar.randmask_ratio = 0.0
    # N token orders fixed before training from `seed`; each sequence trains in one chosen
    # uniformly (inputs keep their RoPE positions, labels are the next token in that order).
    # 1 = left to right. Evaluation is always left to right.
    c.ar.num_orders = 1
    # How orders 1..N-1 are drawn: "local" (the study's noisy local perturbations,
    # argsort(arange(L) + N(0, i^2))) or "random" (uniform permutations).
    c.ar.order_kind = "local"
    # sigma-GPT variant: tell the model which position comes next (a learned target-position
    # embedding added to the input). The study's ablation does not (False).
    c.ar.target_positions = False

    # Masked diffusion; objective="diffusion" only.
    c.diffusion = ConfigDict()
    # How the batch's noise levels are drawn: "independent" (t ~ U(0, 1) per sequence, the
    # study's code) or "stratified" (one t per stratum [k/B, (k+1)/B) of the global batch of B
    # sequences, shifted by one shared uniform: MDLM's low-discrepancy sampler). Each t is
    # uniform either way, so the loss's expectation is the same; its variance is lower.
    c.diffusion.noise_sampling = "independent"

    # Block diffusion (Arriola et al., ICLR 2025); objective="block_diffusion" only.
    c.block_diffusion = ConfigDict()
    # Tokens per block, dividing data.seq_len: 1 is AR-like, seq_len is masked diffusion.
    c.block_diffusion.block_size = 16

    c.data = ConfigDict()
    # "shakespeare": the embedded default corpus (DATA.md §1).
    # "text": the user's corpus at data.path (a folder of .txt, or .jsonl with data.text_field).
    # Both are tokenized into token stores under data.cache_dir on first use.
    # "store": token stores made by `dvar prepare` (data.train_store, data.validation_store).
    c.data.source = "shakespeare"
    c.data.path = ""
    c.data.text_field = "text"
    # Share of a user corpus's documents held out for validation (whole documents).
    c.data.validation_fraction = 0.1
    # data.source="store": the stores' folders (local or gs://), from `dvar prepare`.
    c.data.train_store = ""
    c.data.validation_store = ""
    # U: the first U tokens of the train stream are all the model ever sees.
    c.data.unique_tokens = 1_000_000
    # The study's rule instead: U = the tokens of the first K documents (K > 0; then
    # data.unique_tokens must be 0). Needs data.source="store".
    c.data.unique_documents = 0
    # E: passes over those U tokens (the learning-rate schedule stretches with E).
    c.data.epochs = 4.0
    c.data.seq_len = 128  # tokens per training sequence (windows of seq_len + 1)
    # Validation tokens used (the first ones of the fixed validation stream); 0 = all.
    c.data.validation_tokens = 0
    # Tokenizer to use: a SentencePiece .model, a tokenizer.json, or a folder with GPT-2's
    # vocab.json + merges.txt; "" = the store's own, or (shakespeare/text) a SentencePiece
    # model trained on the train split (DATA.md §2).
    c.data.tokenizer_path = ""
    # End-of-document id of a byte-level BPE tokenizer; -1 = its <|endoftext|> (GPT-2: 50256).
    c.data.eod_id = -1
    c.data.vocab_size = 4096  # SentencePiece vocabulary size when training one
    c.data.tokenizer_type = "unigram"  # "unigram" | "bpe"
    # Where the corpus, tokenizer and implicit token stores are cached; "" = $DVAR_CACHE or
    # ~/.cache/dvar_jax.
    c.data.cache_dir = ""

    c.train = ConfigDict()
    c.train.batch_size = 32  # global batch, in sequences
    # Gradient accumulation: the batch is cut into this many slices inside the step, one
    # slice's activations at a time, one optimizer update. Must divide batch_size (and leave
    # each slice divisible by the mesh's data x fsdp devices). Same updates up to float error.
    c.train.microbatches = 1
    c.train.peak_lr = 2e-4  # AdamW learning rate after warmup
    c.train.min_lr_ratio = 0.1  # cosine decays to peak_lr * min_lr_ratio over the whole run
    c.train.warmup_fraction = 0.01  # of all steps
    c.train.weight_decay = 0.1  # on parameters with ndim >= 2 only
    c.train.b1 = 0.9  # AdamW beta1
    c.train.b2 = 0.95  # AdamW beta2
    c.train.eps = 1e-8  # AdamW epsilon
    c.train.grad_clip = 1.0  # global norm
    # Polyak averaging: validation, checkpoint selection and `dvar eval` use an exponential
    # moving average of the parameters, updated after every step with decay
    # min(ema_decay, (1 + n) / (10 + n)) at step n. 0 = off (the study's runs keep none).
    c.train.ema_decay = 0.0
    c.train.log_every = 10  # steps
    # A non-finite loss or gradient norm stops the run (naming the step and the last good
    # checkpoint); True skips such steps instead (no update), counting them as `skipped`.
    c.train.skip_nonfinite = False

    c.checkpoint = ConfigDict()
    # Save every this many steps; 0 = at every evaluation. Always at the end and on SIGTERM.
    c.checkpoint.every_steps = 0
    c.checkpoint.keep = 2  # the latest `keep`, plus the best by validation loss

    c.mesh = ConfigDict()
    # Device mesh (data, fsdp, tensor); one axis may be -1 = all remaining devices. The product
    # must equal the number of devices (of all hosts).
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # Logical axis -> mesh axes (or None = replicated): the one place sharding is decided.
    # Parameters: vocab/embed/qkv/heads/mlp/norm; activations: batch/seq/activation_embed.
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("seq", None),
        ("activation_embed", None),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("qkv", "tensor"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("norm", None),
    )
    # Multi-host start-up: "auto" calls jax.distributed.initialize() when the environment names
    # a coordinator or several TPU workers; "on" always; "off" never.
    c.distributed = "auto"

    c.eval = ConfigDict()
    c.eval.every_epochs = 1.0  # validation cadence, in (fractional) epochs
    c.eval.batch_size = 32  # validation sequences per batch
    # Diffusion validation: K draws per sequence at stratified masked counts (the same
    # expectation as the training loss, less variance: docs/diffusion_validation.md).
    c.eval.num_mc = 8
    c.eval.seed = 0  # fixed, so curves are comparable across runs

    c.lock()
    return c
