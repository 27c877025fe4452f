"""`dvar train` on a tiny text corpus, as its own process (tests/test_checkpoint.py kills it).

argv: workdir corpus_dir [--config.KEY=VALUE ...]
"""

import sys

from dvar_jax.cli import main

TINY = ["--config.data.source=text", "--config.data.vocab_size=400",
        "--config.model.name=cpu-xs", "--config.model.attention_dropout=0.0",
        "--config.model.hidden_dropout=0.0", "--config.data.unique_tokens=4000",
        "--config.data.epochs=4", "--config.data.seq_len=32",
        "--config.data.validation_tokens=1000", "--config.train.batch_size=8",
        "--config.train.log_every=1", "--config.objective=diffusion",
        "--config.checkpoint.every_steps=6", "--progress=false"]

if __name__ == "__main__":
    workdir, corpus, *extra = sys.argv[1:]
    sys.exit(main(["dvar", "train", f"--workdir={workdir}", f"--config.data.path={corpus}",
                   *TINY, *extra]))
