"""Byte-level BPE (GPT-2's tokenizer, the study's) from local files, without TensorFlow
(`ByteLevelBPE`; `bpe_vocabulary.ByteLevelBPEVocabulary` puts it behind seqio's interface).

A byte-level BPE spells every byte of UTF-8 text with one of 256 printable characters (GPT-2's
byte <-> unicode table) and merges those, so any text encodes without an unknown id and decodes
back exactly. It is written down either as GPT-2's `vocab.json` + `merges.txt` or as a HF
`tokenizer.json`; both load through HF `tokenizers`, offline, and the ids are that library's own:
no BOS, no prefix space, nothing added around the text.

One deliberate difference from the library's defaults: special tokens written out in the text
(a document quoting "<|endoftext|>") are encoded as the text they are, not as the special id, so
decode(encode(s)) == s for every string and no document can end itself early.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

END_OF_TEXT = "<|endoftext|>"
# The two ways a byte-level BPE is written down.
GPT2_FILES = ("vocab.json", "merges.txt")
HF_FILE = "tokenizer.json"
# Checked on every load: a tokenizer.json that normalises, adds a prefix space or is not
# byte-level fails it, rather than silently changing text or bits-per-byte.
_PROBE = ("Hi,  two  spaces\tand tabs\n\n\r\nCRLF; naïve e\u0301 日本語 🙂👩‍👧 \x00\x7f "
          f"{END_OF_TEXT} trailing ")


@functools.lru_cache(maxsize=1)
def byte_of_char() -> dict[str, int]:
    """GPT-2's byte -> printable-character table, inverted: each of the 256 characters that
    byte-level tokens are spelled with stands for one byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, soft
    hyphen, ...) are moved, in order, to characters 256, 257, ...
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + moved)] = b
            moved += 1
    return table


def bpe_files(path: str | Path) -> dict[str, Path]:
    """The files that define the byte-level BPE at `path`, by their canonical name: {"tokenizer.
    json": ...} for a tokenizer.json file or a folder holding one (preferred), else {"vocab.json":
    ..., "merges.txt": ...} for a folder holding GPT-2's pair. ValueError naming what is missing.
    """
    path = Path(path)
    if path.is_file():
        return {HF_FILE: path}
    if not path.is_dir():
        raise FileNotFoundError(f"byte-level BPE {str(path)!r} does not exist")
    if (path / HF_FILE).is_file():
        return {HF_FILE: path / HF_FILE}
    missing = [name for name in GPT2_FILES if not (path / name).is_file()]
    if len(missing) == len(GPT2_FILES):
        raise ValueError(
            f"byte-level BPE folder {str(path)!r} holds none of {HF_FILE}, "
            f"{', '.join(GPT2_FILES)}; allowed: a folder with {' + '.join(GPT2_FILES)} "
            f"(GPT-2's files) or with a {HF_FILE}")
    if missing:
        raise ValueError(
            f"byte-level BPE folder {str(path)!r} has no {HF_FILE} and lacks "
            f"{' and '.join(missing)}; allowed: a folder with {' + '.join(GPT2_FILES)} "
            f"(GPT-2's files) or with a {HF_FILE}")
    return {name: path / name for name in GPT2_FILES}


def load_bpe(files: dict[str, Path]) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` from `bpe_files`'s answer, offline. GPT-2's pair gets GPT-2's
    settings (byte-level pre-tokenizer with its regex and no prefix space, byte-level decoder)
    and, if the vocabulary has one, <|endoftext|> as a special token, as in HF's own GPT-2
    tokenizer.json. ValueError naming the file if the library cannot read it."""
    try:
        if HF_FILE in files:
            return tokenizers.Tokenizer.from_file(str(files[HF_FILE]))
        bpe = tokenizers.Tokenizer(
            models.BPE.from_file(str(files["vocab.json"]), str(files["merges.txt"])))
    except Exception as e:  # the library raises plain Exception on malformed files
        raise ValueError(f"byte-level BPE {' + '.join(str(p) for p in files.values())} could "
                         f"not be read: {e}") from None
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    if bpe.token_to_id(END_OF_TEXT) is not None:
        bpe.add_special_tokens([END_OF_TEXT])  # already in the vocabulary: adds no id
    return bpe


class ByteLevelBPE:
    """A byte-level BPE, checked to reproduce text exactly (TensorFlow-free: what `dvar prepare`'s
    workers encode with; `bpe_vocabulary.ByteLevelBPEVocabulary` wraps it for seqio).

    `eos_id` is the end-of-document id (default: the vocabulary's <|endoftext|>); there is no
    unknown id (every byte has a token) and no extra ids. `vocab_size` is one more than the
    largest id. seqio's `pad_id` stays 0, which is an ordinary token here ("!" in GPT-2): this
    vocabulary never pads. Ids at or beyond `vocab_size` (MASK, a padded embedding table)
    decode to nothing.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eod_id: int = -1, source: str = ""):
        """`tokenizer`: a byte-level BPE (copied: the caller's object is left as it is).
        `eod_id`: the end-of-document id, or -1 for the id of <|endoftext|>. `source` names
        the tokenizer's files in error messages."""
        source = source or "the given tokenizers.Tokenizer"
        # A copy, so that switching off truncation and padding below touches only ours.
        tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        if not isinstance(tok.model, models.BPE):
            raise ValueError(f"{source} is a {type(tok.model).__name__} model; allowed: a "
                             "byte-level BPE (GPT-2 style)")
        if tok.model.dropout:
            raise ValueError(f"{source} has BPE dropout {tok.model.dropout}, which makes ids "
                             "random; allowed: no dropout")
        # A tokenizer.json may carry training-time truncation or padding: ids must cover the
        # whole text and nothing else.
        tok.no_truncation()
        tok.no_padding()
        # Special tokens quoted in text stay text (module docstring).
        tok.encode_special_tokens = True
        self.tokenizer = tok
        self.source = source
        vocab = tok.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0
        if eod_id == -1:
            found = tok.token_to_id(END_OF_TEXT)
            if found is None:
                raise ValueError(
                    f"{source} has no {END_OF_TEXT} token to end documents with: pass its "
                    f"end-of-document id (eod_id; data.eod_id / --eod_id), allowed [0, "
                    f"{self._size})")
            eod_id = found
        if not 0 <= eod_id < self._size:
            raise ValueError(f"eod_id={eod_id} is outside the vocabulary of {source}: allowed "
                             f"-1 (its {END_OF_TEXT}) or [0, {self._size})")
        self._eod_id = int(eod_id)
        self._byte_lengths = self._count_byte_lengths()
        self._check_exact(source)

    @classmethod
    def from_path(cls, path: str | Path, eod_id: int = -1) -> ByteLevelBPE:
        """The byte-level BPE at `path`: a tokenizer.json file, or a folder with GPT-2's
        vocab.json + merges.txt or a tokenizer.json (`bpe_files`)."""
        files = bpe_files(path)
        return cls(load_bpe(files), eod_id, source=" + ".join(str(p) for p in files.values()))

    def _count_byte_lengths(self) -> tuple[int, ...]:
        """UTF-8 bytes of each id: its characters read back through GPT-2's table; special
        tokens 0; other added tokens (matched in raw text) their own UTF-8 length."""
        table = byte_of_char()
        added = self.tokenizer.get_added_tokens_decoder()
        lengths = [0] * self._size
        for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items():
            if i in added:
                lengths[i] = 0 if added[i].special else len(token.encode("utf-8"))
            else:
                # A character outside the table is not byte-level: counted as its own UTF-8
                # so that `_check_exact` can notice the mismatch.
                lengths[i] = sum(1 if c in table else len(c.encode("utf-8")) for c in token)
        return tuple(lengths)

    def _check_exact(self, source: str) -> None:
        """ValueError unless the probe text round-trips and its tokens count its bytes."""
        ids = self._encode(_PROBE)
        back = self.tokenizer.decode(ids, skip_special_tokens=False)
        counted = sum(self._byte_lengths[i] for i in ids)
        if back != _PROBE or counted != len(_PROBE.encode("utf-8")):
            raise ValueError(
                f"{source} does not reproduce text exactly (decode(encode({_PROBE!r})) = "
                f"{back!r}, {counted} bytes counted for {len(_PROBE.encode('utf-8'))}); "
                "allowed: a byte-level BPE without normalisation or prefix space (GPT-2 style)")

    @property
    def eod_id(self) -> int:
        return self._eod_id

    @property
    def vocab_size(self) -> int:
        """One more than the largest id."""
        return self._size

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel on the library's Rayon thread pool (its size is
        fixed per process when first used: $RAYON_NUM_THREADS, else all cores)."""
        # _fast: the same ids without character offsets, which nothing here reads.
        encodings = self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def _decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        # seqio's `decode` cuts after the first end-of-document and keeps it; the text ends
        # before it. (An <|endoftext|> would otherwise come back spelled out.)
        if self._eod_id in ids:
            ids = ids[:ids.index(self._eod_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id `[vocab_size]` stands for: a byte-level token's characters read
        back through GPT-2's table; special tokens such as <|endoftext|> 0."""
        return list(self._byte_lengths)

    @functools.cached_property
    def _digest(self) -> str:
        """sha256 of the tokenizer's own serialisation: equal for equal tokenizers."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ByteLevelBPE):
            return NotImplemented
        return self._eod_id == other._eod_id and self._digest == other._digest

    def __hash__(self) -> int:
        return hash((self._eod_id, self._digest))

    def __repr__(self) -> str:
        return (f"ByteLevelBPE({self.source!r}, vocab_size={self._size}, "
                f"eod_id={self._eod_id})")
