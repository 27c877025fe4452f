"""Tokenizer: exact round trip, deterministic training, caching, user-supplied models."""

import pytest
import sentencepiece as spm

from dvar_jax.configs.base import get_config
from dvar_jax.data import pipeline
from dvar_jax.data import tokenizer as tok_lib
from dvar_jax.data.corpus import Document, SourceSpec, iter_documents
from dvar_jax.data.pipeline import open_run_data

ROUND_TRIP = [
    "HAMLET. To be, or not to be: that is the question:\n",
    "    Whether 'tis nobler in the mind to suffer\n\n\n  The slings and arrows",
    "runs  of   spaces     here",
    "\n\nblank lines first\n\n",
    "tabs\tand\t\tmore tabs\t",
    "Café crème — naïve façade; 日本語; emoji 🎭👑 via bytes",
    "",
    " ",
    "   starts and ends with spaces   ",
    "\n",
    "trailing newline\n",
]


@pytest.fixture(scope="module")
def corpus(text_data_cfg) -> dict[str, list[Document]]:
    """The synthetic corpus's documents by split, as the run splits them."""
    return {split: list(iter_documents(SourceSpec(
        "text", split, path=text_data_cfg.path,
        validation_fraction=text_data_cfg.validation_fraction)))
        for split in ("train", "validation")}


@pytest.fixture(scope="module")
def tokenizer(text_data_cfg):
    return open_run_data(text_data_cfg).tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_of_whole_documents(tokenizer, corpus):
    for doc in corpus["validation"]:
        assert tokenizer.decode(tokenizer.encode(doc.text)) == doc.text
    texts = [d.text for d in corpus["train"][:5]]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_ids_follow_seqio_conventions(tokenizer, text_data_cfg):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert tokenizer.eod_id == 1
    assert tokenizer.vocab_size == text_data_cfg.vocab_size == sp.get_piece_size()
    # No bos/eos is added by encode; decode stops at the first end-of-document id.
    ids = tokenizer.encode("to be")
    assert tokenizer.eod_id not in ids
    assert tokenizer.decode([*ids, tokenizer.eod_id, *tokenizer.encode(" more")]) == "to be"
    # Ids of a padded embedding table decode as unknown rather than failing.
    assert isinstance(tokenizer.decode([tokenizer.vocab_size + 5]), str)


def test_newline_is_its_own_piece(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.path))
    assert sp.piece_to_id("\n") in tokenizer.encode("a\nb")


@pytest.mark.parametrize("tokenizer_type", ["unigram", "bpe"])
def test_training_is_byte_identical_on_rerun(tokenizer_type, synthetic_documents):
    docs = [Document(str(i), t) for i, t in enumerate(synthetic_documents(30, 30, seed=1))]
    first = tok_lib.train_sentencepiece(docs, 400, tokenizer_type)
    second = tok_lib.train_sentencepiece(docs, 400, tokenizer_type)
    assert first == second


def test_trained_model_is_cached_by_corpus_and_settings(text_data_cfg, tokenizer, monkeypatch):
    from dvar_jax.data.corpus import cache_dir

    assert list((cache_dir(text_data_cfg) / "tokenizers").glob("*/dvar_tokenizer.json"))

    def no_training(*args):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(pipeline, "train_sentencepiece", no_training)
    assert open_run_data(text_data_cfg).tokenizer.fingerprint == tokenizer.fingerprint
    other = tok_lib.sentencepiece_key("corpus", 500, "unigram")
    assert other != tok_lib.sentencepiece_key("corpus", 400, "unigram")
    assert other != tok_lib.sentencepiece_key("corpus", 500, "bpe")
    assert other != tok_lib.sentencepiece_key("another corpus", 500, "unigram")


def test_training_sentences_are_lossless_and_bounded():
    long_line = " ".join(["wörd"] * 300) + "\n"
    no_spaces = "é" * 900
    doc = Document("d", "short line\n" * 50 + long_line + no_spaces + "\nend")
    chunks = list(tok_lib.training_sentences([doc], limit=256))
    assert "".join(chunks) == doc.text
    assert all(0 < len(c.encode()) <= 256 for c in chunks)
    # Long lines are cut after a space where possible, so no word is split.
    assert all(c.endswith((" ", "\n")) for c in chunks if "wörd" in c and "é" not in c)


def test_user_tokenizer_path(tmp_path, text_data_cfg, tokenizer):
    cfg = get_config().data
    cfg.source, cfg.path = "text", text_data_cfg.path
    cfg.validation_fraction = text_data_cfg.validation_fraction
    cfg.tokenizer_path = str(tokenizer.path)
    cfg.cache_dir = str(tmp_path)
    assert open_run_data(cfg).tokenizer.fingerprint == tokenizer.fingerprint
    assert not (tmp_path / "tokenizers").exists()
    cfg.tokenizer_path = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer_path=.*missing.model"):
        open_run_data(cfg)


def test_bad_settings_give_clear_errors(corpus):
    with pytest.raises(ValueError, match=r"tokenizer_type='wordpiece' is not one of"):
        tok_lib.trainer_options(4096, "wordpiece")
    with pytest.raises(ValueError, match=r"vocab_size=0 must be a positive integer"):
        tok_lib.trainer_options(0, "unigram")
    with pytest.raises(ValueError, match=r"data.vocab_size=100000 on \d+ train documents"):
        tok_lib.train_sentencepiece(corpus["train"], 100_000, "unigram")
