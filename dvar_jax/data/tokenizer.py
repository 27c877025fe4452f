"""SentencePiece tokenizer: trained deterministically on the train split, used through seqio.

The training settings preserve text exactly, decode(encode(s)) == s (DATA.md §2): no
normalisation, whitespace kept, "\\n" a piece of its own, unknown characters as bytes.
Ids follow seqio's conventions: pad=0, eos=1 (our end-of-document separator), unk=2, no bos.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dvar_jax.data.corpus import Corpus, Document, cache_dir
from dvar_jax.files import write_atomically

TOKENIZER_TYPES = ("unigram", "bpe")

# Bump when the way training sentences are built changes, so cached models are retrained.
_FORMAT_VERSION = 1
# Training "sentences" are runs of whole lines (newlines included) of at most this many
# UTF-8 bytes. Keeping the newlines makes training text look like what `encode` sees (whole
# documents): a word after "\n" has no leading "▁" there, and with line-by-line training
# such words would only be seen with one (8% more tokens on the Shakespeare corpus).
_CHUNK_BYTES = 2048
# SentencePiece silently skips longer sentences; chunks are built to stay below it.
_MAX_SENTENCE_BYTES = 4192
# The unigram trainer's result depends on its thread count (sums are split per thread), so
# it is pinned rather than taken from the machine.
_NUM_THREADS = 4
_RANDOM_SEED = 0
# Beyond this many chunks (about 2 GB of text) SentencePiece samples, seeded.
_MAX_TRAINING_CHUNKS = 1_000_000

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1


def trainer_options(vocab_size: int, tokenizer_type: str) -> dict[str, Any]:
    """SentencePieceTrainer options (besides the input) for a model that round-trips text."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"data.tokenizer_type={tokenizer_type!r} is not one of {TOKENIZER_TYPES}"
        )
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"data.vocab_size={vocab_size!r} must be a positive integer")
    return dict(
        model_type=tokenizer_type,
        vocab_size=vocab_size,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=_NUM_THREADS,
        input_sentence_size=_MAX_TRAINING_CHUNKS,
        shuffle_input_sentence=True,
    )


def _split_long_line(line: str, limit: int) -> Iterator[str]:
    """Pieces of at most `limit` UTF-8 bytes, cut after a space where one is in reach."""
    data = line.encode("utf-8")
    start = 0
    while len(data) - start > limit:
        cut = start + limit
        # Back off continuation bytes (0b10xxxxxx) so the cut falls between characters.
        while data[cut] & 0xC0 == 0x80:
            cut -= 1
        space = data.rfind(b" ", start, cut)
        if space > start:
            cut = space + 1
        yield data[start:cut].decode("utf-8")
        start = cut
    if start < len(data):
        yield data[start:].decode("utf-8")


def training_sentences(docs: Iterable[Document], limit: int = _CHUNK_BYTES) -> Iterator[str]:
    """Each document cut into runs of whole lines of at most `limit` UTF-8 bytes."""
    for doc in docs:
        chunk, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            for piece in _split_long_line(line, limit):
                n = len(piece.encode("utf-8"))
                if size + n > limit:
                    yield "".join(chunk)
                    chunk, size = [], 0
                chunk.append(piece)
                size += n
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(docs: Sequence[Document], vocab_size: int, tokenizer_type: str) -> bytes:
    """Serialized SentencePiece model trained on `docs`; the same bytes on every run."""
    import sentencepiece as spm

    options = trainer_options(vocab_size, tokenizer_type)
    spm.set_random_generator_seed(_RANDOM_SEED)
    out = io.BytesIO()
    try:
        # model_writer instead of model_prefix: the prefix would be recorded in the model
        # and a temporary path would make the bytes differ between runs.
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(docs), model_writer=out, minloglevel=2,
            **options,
        )
    except RuntimeError as e:
        chars = sum(len(d.text) for d in docs)
        # SentencePiece says how far it can go ("... a value <= 732."): pass that on plainly.
        reachable = re.search(r"Vocabulary size too high .*<= (\d+)", str(e))
        if reachable:
            raise ValueError(
                f"data.vocab_size={vocab_size} on {len(docs)} train documents ({chars} "
                f"characters) is more than a {tokenizer_type} tokenizer can reach: allowed at "
                f"most {reachable.group(1)}; lower data.vocab_size or add text"
            ) from None
        raise ValueError(
            f"SentencePiece could not train a {tokenizer_type} tokenizer with "
            f"data.vocab_size={vocab_size} on {len(docs)} train documents ({chars} characters):"
            f" {' '.join(str(e).split())}"
        ) from e
    return out.getvalue()


def tokenizer_key(corpus: Corpus, vocab_size: int, tokenizer_type: str) -> str:
    import sentencepiece as spm

    settings = dict(
        trainer_options(vocab_size, tokenizer_type),
        format_version=_FORMAT_VERSION,
        chunk_bytes=_CHUNK_BYTES,
        random_seed=_RANDOM_SEED,
        sentencepiece=spm.__version__,
        corpus=corpus.fingerprint,
    )
    blob = json.dumps(settings, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


def trained_tokenizer_path(data_cfg: Any, corpus: Corpus) -> Path:
    """`<cache>/tokenizers/<key>.model`, trained on the train split unless already cached."""
    key = tokenizer_key(corpus, data_cfg.vocab_size, data_cfg.tokenizer_type)
    path = cache_dir(data_cfg) / "tokenizers" / f"{key}.model"
    if not path.exists():
        model = train_sentencepiece(corpus.train, data_cfg.vocab_size, data_cfg.tokenizer_type)
        write_atomically(path, lambda f: f.write(model))
    return path


class Tokenizer:
    """A SentencePiece model behind `seqio.SentencePieceVocabulary`.

    `vocab_size` is the model's own size; a model may pad its embedding table beyond it.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist")
        # seqio imports TensorFlow (slow, so only here), whose C++ start-up chatter about
        # CUDA and oneDNN says nothing about this program: keep it quiet unless asked for.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import seqio

        self.path = path
        self._vocab = seqio.SentencePieceVocabulary(str(path))
        eos = self._vocab.eos_id
        if eos is None or eos < 0:
            raise ValueError(f"SentencePiece model {str(path)!r} defines no eos id")
        self.eod_id: int = int(eos)
        self.vocab_size: int = int(self._vocab.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without an end-of-document id."""
        return list(self._vocab.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel inside SentencePiece (same model and output)."""
        return self._vocab.tokenizer.encode(list(texts), num_threads=_NUM_THREADS)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first end-of-document id (seqio's convention).

        seqio's Python path: its TF path strips leading spaces. Ids beyond the vocabulary
        (a padded embedding table) decode as unknown.
        """
        return self._vocab.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes that each id stands for, for bits per byte: control ids (pad, eos, bos)
        and unknown 0, byte-fallback ids 1, other pieces their text with "\u2581" read as a
        space."""
        sp = self._vocab.tokenizer
        lengths = []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                lengths.append(0)
            elif sp.is_byte(i):
                lengths.append(1)
            else:
                lengths.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode()))
        return lengths

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(data_cfg: Any, corpus: Corpus) -> Tokenizer:
    """`data.tokenizer_path` if given, else a model trained on `corpus.train` (cached)."""
    if data_cfg.tokenizer_path:
        path = Path(data_cfg.tokenizer_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"data.tokenizer_path={data_cfg.tokenizer_path!r} does not exist; give a "
                'SentencePiece .model file, or "" to train one on the train split'
            )
        return Tokenizer(path)
    return Tokenizer(trained_tokenizer_path(data_cfg, corpus))
