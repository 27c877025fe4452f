"""A tiny run for tests, benchmarks and smoke checks: cpu-xs on 4,000 unique tokens of a text
corpus for 2 epochs of 32-token windows (about 15 s on 2 cores), evaluated every epoch.

`get_config()` uses the synthetic corpus path given by --config.data.path; `tiny_config(...)`
is the same from Python.
"""

from ml_collections import ConfigDict

from configs.base import get_config as base_config


def tiny_config(objective: str = "ar", corpus_dir: str = "", cache_dir: str = "") -> ConfigDict:
    cfg = base_config()
    cfg.objective = objective
    cfg.data.source, cfg.data.path = "text", corpus_dir
    cfg.data.validation_fraction, cfg.data.vocab_size = 0.2, 400
    cfg.data.cache_dir = cache_dir
    cfg.model.name = "cpu-xs"
    cfg.model.attention_dropout = cfg.model.hidden_dropout = 0.0
    cfg.data.unique_tokens, cfg.data.epochs, cfg.data.seq_len = 4_000, 2.0, 32
    cfg.data.validation_tokens = 1_000
    cfg.train.batch_size, cfg.train.peak_lr = 8, 3e-3
    cfg.eval.every_epochs, cfg.eval.num_mc = 1.0, 4
    return cfg


def get_config() -> ConfigDict:
    return tiny_config()
