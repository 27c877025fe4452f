"""Byte-level BPE behind seqio: a tiny GPT-2-style tokenizer trained in the test, loaded from
its vocab.json + merges.txt and from its tokenizer.json, with ids equal to the `tokenizers`
library's own, exact round trips and byte counts, fingerprints, save/load, and clear errors."""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tokenizers
from tokenizers import ByteLevelBPETokenizer

from dvar_jax.data.bpe import END_OF_TEXT, ByteLevelBPE
from dvar_jax.data.corpus import Document
from dvar_jax.data.tokenizer import (
    Tokenizer,
    load_saved_tokenizer,
    open_tokenizer,
    train_sentencepiece,
)

VOCAB = 600


def _lines(synthetic_documents) -> list[str]:
    """1,000 lines: synthetic verse, unicode, runs of spaces and newlines, an empty one."""
    lines = [line for doc in synthetic_documents(30, 40, seed=9) for line in doc.splitlines()]
    extra = ["", " ", "\n", "  two  spaces   three", "tab\there\n\nnewlines\n", "\r\nCRLF\r\n",
             "naïve café — “quoted”", "e\u0301 decomposed", "日本語のテキスト",
             "emoji 🙂 and ZWJ 👩‍👩‍👧", "trailing space ", "\x00\x7f control", "   ",
             "word\n\n\n   indented"]
    out = (extra + lines)[:1000]
    assert len(out) == 1000
    return out


@pytest.fixture(scope="module")
def bpe_root(tmp_path_factory, synthetic_documents):
    """A 600-id byte-level BPE with <|endoftext|>, written down both ways.

    tokenizer.json: as the library saves it (<|endoftext|> id 0, special tokens first).
    gpt2/: vocab.json + merges.txt laid out like GPT-2's, <|endoftext|> last (id 599).
    """
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(synthetic_documents(40, 40), vocab_size=VOCAB,
                            special_tokens=[END_OF_TEXT], show_progress=False)
    root = tmp_path_factory.mktemp("bpe")
    bpe.save(str(root / "tokenizer.json"))
    (root / "gpt2").mkdir()
    bpe.save_model(str(root / "gpt2"))
    # Merges name tokens by their text, so renumbering the vocabulary keeps the same BPE.
    order = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in order if t != END_OF_TEXT] + [END_OF_TEXT]
    (root / "gpt2" / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    return root


def _reference(bpe_root, form: str):
    """The library's own tokenizer for the same files, built without our loader."""
    if form == "gpt2":
        return ByteLevelBPETokenizer.from_file(str(bpe_root / "gpt2" / "vocab.json"),
                                               str(bpe_root / "gpt2" / "merges.txt"),
                                               add_prefix_space=False)
    return tokenizers.Tokenizer.from_file(str(bpe_root / "tokenizer.json"))


@pytest.mark.parametrize("form, eod", [("gpt2", VOCAB - 1), ("tokenizer.json", 0)])
def test_ids_equal_the_library_and_round_trip(bpe_root, synthetic_documents, form, eod):
    tok = open_tokenizer(bpe_root / form)
    reference = _reference(bpe_root, form)
    assert tok.kind == "bpe"
    assert tok.vocab_size == reference.get_vocab_size() == VOCAB
    assert tok.eod_id == reference.token_to_id(END_OF_TEXT) == eod
    lines = _lines(synthetic_documents)
    for line in lines:
        ids = tok.encode(line)
        assert ids == reference.encode(line, add_special_tokens=False).ids, line
        assert tok.decode(ids) == line
    expected = [tok.encode(line) for line in lines]
    assert tok.encode_batch(lines, num_threads=1) == expected
    assert tok.encode_batch(lines, num_threads=2) == expected
    # seqio's decode stops at the end-of-document id.
    assert tok.decode([*tok.encode("before"), eod, *tok.encode("after")]) == "before"
    # MASK (= vocab_size) and ids of a padded embedding table decode to nothing.
    assert tok.decode([*tok.encode("a"), VOCAB, VOCAB + 7, *tok.encode("b")]) == "ab"


def test_written_out_special_token_stays_text(bpe_root):
    """A document quoting <|endoftext|> round-trips and is not cut short."""
    tok = open_tokenizer(bpe_root / "gpt2")
    text = f"the string {END_OF_TEXT} in a document"
    ids = tok.encode(text)
    assert tok.eod_id not in ids and tok.decode(ids) == text
    assert sum(tok.token_byte_lengths()[i] for i in ids) == len(text.encode())


def test_seqio_tensorflow_paths(bpe_root):
    tok = open_tokenizer(bpe_root / "gpt2")
    vocab = tok.vocabulary
    text = "  Wilwil roordo,\n oranba!"
    ids = vocab.encode_tf(tf.constant(text))
    assert ids.dtype == tf.int32 and ids.shape.rank == 1
    assert ids.numpy().tolist() == tok.encode(text)
    one, two = tok.encode(" one\n"), tok.encode("two  three")
    filler = tok.encode("ignored")
    width = max(len(one), len(two)) + len(filler) + 1
    rows = [[*one, tok.eod_id, *filler], [*two, tok.eod_id, *filler]]
    batch = tf.constant([row[:width] + [tok.eod_id] * (width - len(row)) for row in rows])
    assert vocab.decode_tf(batch).numpy().tolist() == [b" one\n", b"two  three"]
    assert vocab.decode_tf(tf.constant(two)).numpy() == b"two  three"


def test_token_byte_lengths_count_utf8_bytes(bpe_root, synthetic_documents):
    for form in ("gpt2", "tokenizer.json"):
        tok = open_tokenizer(bpe_root / form)
        lengths = np.asarray(tok.token_byte_lengths())
        assert lengths.shape == (tok.vocab_size,) and lengths[tok.eod_id] == 0
        assert lengths.min() == 0 and (lengths > 0).sum() == VOCAB - 1
        for line in _lines(synthetic_documents):
            assert lengths[tok.encode(line)].sum() == len(line.encode("utf-8")), line


def test_fingerprint_description_and_save(bpe_root, tmp_path):
    tok = open_tokenizer(bpe_root / "gpt2")
    assert len(tok.fingerprint) == 64
    assert tok.description.startswith(
        f"byte-level BPE from vocab.json+merges.txt (vocab {VOCAB}, end-of-document "
        f"{VOCAB - 1}, sha256 {tok.fingerprint[:12]}")
    shutil.copytree(bpe_root / "gpt2", tmp_path / "elsewhere")
    moved = open_tokenizer(tmp_path / "elsewhere")
    assert moved.fingerprint == tok.fingerprint and moved == tok
    assert moved.vocabulary == tok.vocabulary  # seqio-level equality: by content too
    assert open_tokenizer(tmp_path / "elsewhere", eod_id=5).fingerprint != tok.fingerprint
    # The same BPE written as tokenizer.json is another set of files: another fingerprint.
    assert open_tokenizer(bpe_root / "tokenizer.json").fingerprint != tok.fingerprint
    merges = tmp_path / "elsewhere" / "merges.txt"
    merges.write_text("\n".join(merges.read_text().splitlines()[:-1]) + "\n")
    fewer = open_tokenizer(tmp_path / "elsewhere")
    assert fewer.fingerprint != tok.fingerprint and fewer.vocabulary != tok.vocabulary

    for form in ("gpt2", "tokenizer.json"):
        original = open_tokenizer(bpe_root / form)
        original.save(tmp_path / "saved" / form)
        again = load_saved_tokenizer(tmp_path / "saved" / form)
        assert (again.fingerprint, again.kind, again.eod_id, again.vocab_size) == (
            original.fingerprint, "bpe", original.eod_id, original.vocab_size)
        assert again.encode("Wilwil roordo, oranba!\n") == original.encode(
            "Wilwil roordo, oranba!\n")
        assert open_tokenizer(tmp_path / "saved" / form).fingerprint == original.fingerprint
    # A saved eod id that is not the vocabulary's own is kept.
    open_tokenizer(bpe_root / "gpt2", eod_id=5).save(tmp_path / "eod5")
    assert load_saved_tokenizer(tmp_path / "eod5").eod_id == 5


def test_bad_tokenizer_files(bpe_root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' holds none of tokenizer.json, vocab.json, "
                                         r"merges.txt.*allowed: a SentencePiece .model file"):
        open_tokenizer(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    shutil.copy(bpe_root / "gpt2" / "vocab.json", tmp_path / "half")
    with pytest.raises(ValueError, match=r"'.*half' has no tokenizer.json and lacks merges.txt; "
                                         r"allowed: a folder with vocab.json \+ merges.txt"):
        open_tokenizer(tmp_path / "half")
    with pytest.raises(ValueError, match=r"eod_id=600 is outside the vocabulary of .*vocab.json"
                                         r".*allowed -1 \(its <\|endoftext\|>\) or \[0, 600\)"):
        open_tokenizer(bpe_root / "gpt2", eod_id=VOCAB)
    with pytest.raises(ValueError, match=r"eod_id=-2: allowed -1"):
        open_tokenizer(bpe_root / "gpt2", eod_id=-2)
    (tmp_path / "noeot").mkdir()
    vocab = json.loads((bpe_root / "gpt2" / "vocab.json").read_text())
    del vocab[END_OF_TEXT]
    (tmp_path / "noeot" / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(bpe_root / "gpt2" / "merges.txt", tmp_path / "noeot")
    with pytest.raises(ValueError, match=r"noeot/vocab.json .* has no <\|endoftext\|> token .*"
                                         r"pass its end-of-document id .* \[0, 599\)"):
        open_tokenizer(tmp_path / "noeot")
    assert open_tokenizer(tmp_path / "noeot", eod_id=3).eod_id == 3
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' does not exist; allowed: "):
        open_tokenizer(tmp_path / "nowhere")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*x.txt' is neither a .model nor a .json file; "
                                         r"allowed: "):
        open_tokenizer(tmp_path / "x.txt")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json could not be read"):
        open_tokenizer(tmp_path / "broken.json")


def _edited(bpe_root, tmp_path, name: str, edit) -> str:
    spec = json.loads((bpe_root / "tokenizer.json").read_text())
    edit(spec)
    (tmp_path / name).write_text(json.dumps(spec))
    return str(tmp_path / name)


def test_tokenizer_json_that_changes_text_is_refused(bpe_root, tmp_path):
    def prefix_space(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    def lowercase(spec):
        spec["normalizer"] = {"type": "Lowercase"}

    for name, edit in (("prefix.json", prefix_space), ("lower.json", lowercase)):
        with pytest.raises(ValueError, match=rf"{name} does not reproduce text exactly.*allowed:"
                                             r" a byte-level BPE without normalisation"):
            open_tokenizer(_edited(bpe_root, tmp_path, name, edit))

    def truncate(spec):  # a training-time setting that must not cut documents
        spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                              "stride": 0}

    tok = open_tokenizer(_edited(bpe_root, tmp_path, "truncating.json", truncate))
    assert len(tok.encode("a much longer line than four tokens")) > 4
    with pytest.raises(ValueError, match=r"dropout"):
        ByteLevelBPE(tokenizers.Tokenizer(tokenizers.models.BPE(dropout=0.5)), 0)


def test_bad_saved_folder_and_threads(bpe_root, tmp_path):
    tok = open_tokenizer(bpe_root / "gpt2")
    tok.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "dvar_tokenizer.json").read_text())
    (tmp_path / "saved" / "dvar_tokenizer.json").write_text(json.dumps({**meta, "kind": "wp"}))
    with pytest.raises(ValueError, match=r"describes kind='wp'.*allowed: format 1, kind "
                                         r"'sentencepiece'"):
        load_saved_tokenizer(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match=r"holds no saved tokenizer"):
        load_saved_tokenizer(bpe_root / "gpt2")
    with pytest.raises(ValueError, match=r"num_threads=0: allowed an integer >= 1"):
        tok.encode_batch(["a"], num_threads=0)


def test_sentencepiece_and_bpe_share_one_interface(tmp_path, synthetic_documents):
    """The SentencePiece tokenizer keeps its ids and gains the same fingerprint/save API;
    training streams its documents (a generator, no len())."""
    model = train_sentencepiece((Document(str(i), t) for i, t in
                                 enumerate(synthetic_documents(20, 20))), 400, "bpe")
    (tmp_path / "m.model").write_bytes(model)
    sp = Tokenizer(tmp_path / "m.model")
    assert sp.kind == "sentencepiece" and sp.eod_id == 1 and sp.vocab_size == 400
    assert sp.description == f"SentencePiece bpe model (vocab 400, eos 1, sha256 " \
                             f"{sp.fingerprint[:12]})"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "renamed.model").write_bytes(model)
    assert open_tokenizer(tmp_path / "other" / "renamed.model").fingerprint == sp.fingerprint
    sp.save(tmp_path / "saved")
    again = load_saved_tokenizer(tmp_path / "saved")
    assert again.fingerprint == sp.fingerprint and again == sp and again.path != sp.path
    texts = ["Wilwil roordo,\n  oranba!", ""]
    assert again.encode_batch(texts, num_threads=1) == sp.encode_batch(texts) == \
        [sp.encode(t) for t in texts]
    with pytest.raises(ValueError, match=r"eod_id=7: a SentencePiece model separates"):
        Tokenizer(tmp_path / "m.model", eod_id=7)
