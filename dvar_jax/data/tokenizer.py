"""Tokenizers behind one interface: SentencePiece (trained here or given) and byte-level BPE.

`Tokenizer` wraps a `seqio.Vocabulary`: a SentencePiece model (`seqio.SentencePieceVocabulary`)
or GPT-2's byte-level BPE (`bpe_vocabulary.ByteLevelBPEVocabulary`, the study's tokenizer).
Training, evaluation, sampling and the stores see only `Tokenizer`: ids, the end-of-document id,
`vocab_size` (MASK is the first id after it), bytes per id, and a fingerprint of the files.

SentencePiece models trained here preserve text exactly, decode(encode(s)) == s (DATA.md §2):
no normalisation, whitespace kept, "\\n" a piece of its own, unknown characters as bytes. Their
ids follow seqio's conventions: pad=0, eos=1 (our end-of-document separator), unk=2, no bos.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dvar_jax import import_quietly
from dvar_jax.data.corpus import Document
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


class _Counted:
    """The documents of an iterable, counted (documents, characters) as they stream past."""

    def __init__(self, docs: Iterable[Document]):
        self.docs, self.count, self.chars = docs, 0, 0

    def __iter__(self) -> Iterator[Document]:
        for doc in self.docs:
            self.count += 1
            self.chars += len(doc.text)
            yield doc


def train_sentencepiece(docs: Iterable[Document], vocab_size: int, tokenizer_type: str) -> bytes:
    """Serialized SentencePiece model trained on `docs` (streamed once); the same bytes on every
    run."""
    import sentencepiece as spm

    options = trainer_options(vocab_size, tokenizer_type)
    spm.set_random_generator_seed(_RANDOM_SEED)
    out = io.BytesIO()
    counted = _Counted(docs)
    try:
        # model_writer instead of model_prefix: the prefix would be recorded in the model
        # and a temporary path would make the bytes differ between runs.
        spm.SentencePieceTrainer.train(
            sentence_iterator=training_sentences(counted), model_writer=out, minloglevel=2,
            **options,
        )
    except RuntimeError as e:
        count, chars = counted.count, counted.chars
        # SentencePiece says how far it can go ("... a value <= 732."): pass that on plainly.
        reachable = re.search(r"Vocabulary size too high .*<= (\d+)", str(e))
        if reachable:
            raise ValueError(
                f"data.vocab_size={vocab_size} on {count} train documents ({chars} "
                f"characters) is more than a {tokenizer_type} tokenizer can reach: allowed at "
                f"most {reachable.group(1)}; lower data.vocab_size or add text"
            ) from None
        raise ValueError(
            f"SentencePiece could not train a {tokenizer_type} tokenizer with "
            f"data.vocab_size={vocab_size} on {count} train documents ({chars} characters):"
            f" {' '.join(str(e).split())}"
        ) from e
    return out.getvalue()


def sentencepiece_key(corpus_fingerprint: str, vocab_size: int, tokenizer_type: str) -> str:
    """Cache key of a model trained on the corpus with this fingerprint and these settings."""
    import sentencepiece as spm

    settings = dict(
        trainer_options(vocab_size, tokenizer_type),
        format_version=_FORMAT_VERSION,
        chunk_bytes=_CHUNK_BYTES,
        random_seed=_RANDOM_SEED,
        sentencepiece=spm.__version__,
        corpus=corpus_fingerprint,
    )
    blob = json.dumps(settings, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:32]


KINDS = ("sentencepiece", "bpe")
# A folder written by `Tokenizer.save` (a store's tokenizer/) is recognised by this file.
SAVED_FILE = "dvar_tokenizer.json"
# Bump when what `save` writes changes in a way older readers would misread.
_SAVED_FORMAT = 1
# A SentencePiece model keeps this name when saved, so its fingerprint does not depend on what
# the user called the file.
_SPM_FILE = "spm.model"
_ACCEPTED = ("a SentencePiece .model file, a tokenizer.json file, or a folder with GPT-2's "
             "vocab.json + merges.txt, a tokenizer.json, or a dvar_tokenizer.json (written by "
             "Tokenizer.save)")


def _read_saved(folder: Path) -> tuple[str, dict[str, Path], int]:
    """(kind, defining files by name, end-of-document id) that `save` recorded in `folder`."""
    from dvar_jax.data.bpe import GPT2_FILES, HF_FILE

    meta_path = folder / SAVED_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind, names, eod_id = meta["kind"], list(meta["files"]), meta["eod_id"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(meta_path)!r} is not a saved tokenizer description ({e!r}); "
                         "write it with Tokenizer.save") from None
    allowed = {"sentencepiece": [[_SPM_FILE]], "bpe": [[HF_FILE], sorted(GPT2_FILES)]}
    # Folders saved before "format" was recorded hold the same three fields.
    meta.setdefault("format", _SAVED_FORMAT)
    if (meta["format"] != _SAVED_FORMAT or str(kind) not in allowed
            or sorted(map(str, names)) not in allowed[str(kind)] or not isinstance(eod_id, int)):
        raise ValueError(
            f"{str(meta_path)!r} describes kind={kind!r}, files={names!r}, eod_id={eod_id!r}, "
            f"format={meta['format']!r}; allowed: format {_SAVED_FORMAT}, kind "
            f"'sentencepiece' with [{_SPM_FILE!r}] or 'bpe' with [{HF_FILE!r}] or "
            f"{list(GPT2_FILES)!r}, an integer eod_id")
    files = {name: folder / name for name in names}
    for name, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"saved tokenizer {str(folder)!r} lacks {name}, which "
                                    f"{SAVED_FILE} lists")
    if kind == "bpe":  # canonical order: vocab.json before merges.txt
        order = [HF_FILE, *GPT2_FILES]
        files = dict(sorted(files.items(), key=lambda item: order.index(item[0])))
    return kind, files, eod_id


def _resolve(path: Path) -> tuple[str, dict[str, Path], int]:
    """(kind, defining files by canonical name, end-of-document id: -1 = the tokenizer's own)
    of the tokenizer at `path`; FileNotFoundError or ValueError naming it otherwise."""
    from dvar_jax.data.bpe import GPT2_FILES, HF_FILE, bpe_files

    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist; allowed: {_ACCEPTED}")
    if path.is_file():
        if path.suffix == ".model":
            return "sentencepiece", {_SPM_FILE: path}, -1
        if path.suffix == ".json":
            return "bpe", {HF_FILE: path}, -1
        raise ValueError(f"tokenizer {str(path)!r} is neither a .model nor a .json file; "
                         f"allowed: {_ACCEPTED}")
    if (path / SAVED_FILE).is_file():
        return _read_saved(path)
    if not any((path / name).is_file() for name in (HF_FILE, *GPT2_FILES)):
        raise ValueError(f"tokenizer folder {str(path)!r} holds none of {HF_FILE}, "
                         f"{', '.join(GPT2_FILES)}, {SAVED_FILE}; allowed: {_ACCEPTED}")
    return "bpe", bpe_files(path), -1


def _sentencepiece_type(model: bytes) -> str:
    """"unigram", "bpe", ... as recorded in a serialized SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type
                                                              ).lower()


class Tokenizer:
    """A tokenizer behind one `seqio.Vocabulary`: a SentencePiece model
    (`seqio.SentencePieceVocabulary`) or a byte-level BPE
    (`bpe_vocabulary.ByteLevelBPEVocabulary`).

    `eod_id` separates documents (SentencePiece: its eos; BPE: <|endoftext|> unless given);
    MASK is `vocab_size`, the first id after the vocabulary. `vocab_size` is the tokenizer's own
    size; a model may pad its embedding table beyond it. `kind` is "sentencepiece" or "bpe".
    Equal `fingerprint`s mean equal ids for every text.
    """

    def __init__(self, path: str | Path, eod_id: int = -1):
        """`path`: a SentencePiece .model file; a tokenizer.json file; a folder with GPT-2's
        vocab.json + merges.txt or a tokenizer.json; or a folder written by `save`.
        `eod_id`: the end-of-document id, -1 for the tokenizer's own (SentencePiece: its eos,
        the only one allowed; BPE: <|endoftext|>; a saved folder: the one it was saved with)."""
        path = Path(path).expanduser()
        kind, files, saved_eod = _resolve(path)
        if not isinstance(eod_id, int) or eod_id < -1:
            raise ValueError(f"eod_id={eod_id!r}: allowed -1 (the tokenizer's own) or an id >= 0")
        if eod_id == -1:
            eod_id = saved_eod
        self.kind: str = kind
        # The bytes are read once: the fingerprint and `save` describe exactly what was loaded
        # (unless a file is replaced between this read and the library's, moments later).
        self._files: dict[str, bytes] = {name: p.read_bytes() for name, p in files.items()}
        # The library object is loaded here, without TensorFlow (`dvar prepare` and its workers
        # encode with it); the seqio vocabulary over it is made on first use (`vocabulary`).
        if kind == "sentencepiece":
            import sentencepiece as spm

            self.path = files[_SPM_FILE]
            self._library = spm.SentencePieceProcessor(model_proto=self._files[_SPM_FILE])
            eos = self._library.eos_id()
            if eos < 0:
                raise ValueError(f"SentencePiece model {str(self.path)!r} defines no eos id; "
                                 "allowed: a model trained with eos_id >= 0")
            if eod_id not in (-1, eos):
                raise ValueError(f"eod_id={eod_id}: a SentencePiece model separates documents "
                                 f"with its eos id ({eos}); allowed: -1 or {eos}")
            self._model_type = _sentencepiece_type(self._files[_SPM_FILE])
            self.eod_id: int = int(eos)
            self.vocab_size: int = int(self._library.get_piece_size())
        else:
            from dvar_jax.data.bpe import ByteLevelBPE, load_bpe

            self.path = path
            self._library = ByteLevelBPE(
                load_bpe(files), eod_id, source=" + ".join(str(p) for p in files.values()))
            self.eod_id = int(self._library.eod_id)
            self.vocab_size = int(self._library.vocab_size)
        self._vocab = None
        self._fingerprint = self._compute_fingerprint()

    @property
    def vocabulary(self) -> Any:
        """The `seqio.Vocabulary` every encode and decode goes through (made on first use:
        seqio imports TensorFlow)."""
        if self._vocab is None:
            if self.kind == "sentencepiece":
                seqio = import_quietly("seqio")  # loads TensorFlow
                self._vocab = seqio.SentencePieceVocabulary(str(self.path))
            else:
                from dvar_jax.data.bpe_vocabulary import ByteLevelBPEVocabulary

                self._vocab = ByteLevelBPEVocabulary(self._library)
        return self._vocab

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without an end-of-document id."""
        return list(self.vocabulary.encode(text))

    def encode_batch(self, texts: Sequence[str], num_threads: int = _NUM_THREADS
                     ) -> list[list[int]]:
        """`encode` of each text (the same ids), using up to `num_threads` threads.

        SentencePiece runs exactly `num_threads` threads. BPE with `num_threads` > 1 uses the
        `tokenizers` library's batch encoder on its Rayon pool, whose size the library fixes
        per process at first use ($RAYON_NUM_THREADS if set then, else all cores) and cannot
        be changed afterwards, so it is not touched here. With `num_threads` == 1 (a worker
        process among others) BPE encodes one text at a time on the calling thread, starting
        no pool at all.
        """
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads={num_threads!r}: allowed an integer >= 1")
        texts = list(texts)
        # The library the seqio vocabulary wraps, called directly: the same ids, and no
        # TensorFlow in `dvar prepare`'s processes.
        if self.kind == "sentencepiece":
            return self._library.encode(texts, num_threads=num_threads)
        if num_threads > 1:
            return self._library.encode_batch(texts)
        return [self._library._encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first end-of-document id (seqio's convention).

        seqio's Python path: its TF path strips leading spaces. Ids beyond the vocabulary
        (MASK, a padded embedding table) decode as unknown (SentencePiece) or to nothing (BPE).
        """
        return self.vocabulary.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes that each id `[vocab_size]` stands for, for bits per byte.

        SentencePiece: control ids (pad, eos, bos) and unknown 0, byte-fallback ids 1, other
        pieces their text with "\u2581" read as a space. BPE: the bytes its characters stand
        for through GPT-2's byte <-> unicode table; special tokens (<|endoftext|>) 0.
        """
        if self.kind == "bpe":
            return self._library.token_byte_lengths()
        sp = self._library
        lengths = []
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i):
                lengths.append(0)
            elif sp.is_byte(i):
                lengths.append(1)
            else:
                lengths.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode()))
        return lengths

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(f"dvar-tokenizer\0{self.kind}\0{self.eod_id}\0".encode())
        for name in sorted(self._files):
            data = self._files[name]
            h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(hashlib.sha256(data).digest())
        return h.hexdigest()

    @property
    def fingerprint(self) -> str:
        """sha256 hex over the kind, the end-of-document id and the defining files' names
        (canonical: vocab.json, merges.txt, tokenizer.json, spm.model) and bytes: the same on
        any machine and path for the same files."""
        return self._fingerprint

    @property
    def description(self) -> str:
        """One line naming the tokenizer, for messages that compare two."""
        digest = f"sha256 {self.fingerprint[:12]}"
        if self.kind == "sentencepiece":
            return (f"SentencePiece {self._model_type} model (vocab {self.vocab_size}, "
                    f"eos {self.eod_id}, {digest})")
        return (f"byte-level BPE from {'+'.join(self._files)} (vocab {self.vocab_size}, "
                f"end-of-document {self.eod_id}, {digest})")

    def save(self, folder: str | Path) -> None:
        """Writes the defining files and `dvar_tokenizer.json` (kind, eod_id, file names) into
        `folder`, each atomically, so that `load_saved_tokenizer(folder)` gives an equal
        tokenizer (same fingerprint, same ids)."""
        folder = Path(folder)
        # The description goes last and any older one first: a folder whose save was
        # interrupted is not taken for a saved tokenizer.
        (folder / SAVED_FILE).unlink(missing_ok=True)
        for name, data in self._files.items():
            write_atomically(folder / name, data)
        meta = {"format": _SAVED_FORMAT, "kind": self.kind, "eod_id": self.eod_id,
                "files": list(self._files), "fingerprint": self.fingerprint,
                "description": self.description}
        write_atomically(folder / SAVED_FILE, json.dumps(meta, indent=1) + "\n")

    def __eq__(self, other: object) -> bool:
        """Equal fingerprints: the same kind, end-of-document id and files, wherever they lie."""
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, {self.description})"


def open_tokenizer(path: str | Path, eod_id: int = -1) -> Tokenizer:
    """The tokenizer at `path`: a SentencePiece .model file, a tokenizer.json file, a folder
    with GPT-2's vocab.json + merges.txt or a tokenizer.json, or a folder written by
    `Tokenizer.save` (a store's tokenizer/). `eod_id` -1: the tokenizer's own (SentencePiece:
    its eos; BPE: <|endoftext|>). FileNotFoundError or ValueError naming the path and what is
    accepted otherwise."""
    return Tokenizer(path, eod_id)


def load_saved_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer `Tokenizer.save` wrote into `folder` (equal fingerprint and ids)."""
    if not (Path(folder) / SAVED_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no saved tokenizer ({SAVED_FILE}); "
                                "write one with Tokenizer.save")
    return Tokenizer(folder)
