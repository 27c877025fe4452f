"""`dvar prepare` from the command line, a run trained from the stores it makes, and every
wrong argument: one clear line (exit 2) and nothing written."""

import json
from pathlib import Path

import pytest

from dvar_jax.cli import main
from dvar_jax.data.store import TokenStore


@pytest.fixture(scope="module")
def stores(tmp_path_factory, text_corpus_dir) -> dict[str, Path]:
    """A train and a validation store of the synthetic text corpus (hash split 0.2), the first
    training its SentencePiece model, the second reusing the train store's tokenizer."""
    root = tmp_path_factory.mktemp("prepared")
    common = ["--source=text", f"--path={text_corpus_dir}", "--validation_fraction=0.2",
              "--workers=1", "--shard_chars=20000"]
    assert main(["dvar", "prepare", *common, "--split=train", "--vocab_size=400",
                 "--tokenizer_type=bpe", f"--out={root / 'train'}"]) == 0
    assert main(["dvar", "prepare", *common, "--split=validation",
                 f"--tokenizer={root / 'train' / 'tokenizer'}",
                 f"--out={root / 'validation'}"]) == 0
    return {"train": root / "train", "validation": root / "validation", "root": root}


def test_prepare_writes_stores_and_a_rerun_does_nothing(stores, capsys, text_corpus_dir):
    train, validation = TokenStore(stores["train"]), TokenStore(stores["validation"])
    assert train.tokenizer_fingerprint == validation.tokenizer_fingerprint
    assert train.num_documents + validation.num_documents == 40
    assert len(train.shards) > 1
    manifest = json.loads((stores["train"] / "manifest.json").read_text())
    assert manifest["command"].startswith("dvar prepare --source=text")
    capsys.readouterr()
    assert main(["dvar", "prepare", "--source=text", f"--path={text_corpus_dir}",
                 "--validation_fraction=0.2", "--workers=1", "--shard_chars=20000",
                 "--split=validation", f"--tokenizer={stores['train'] / 'tokenizer'}",
                 f"--out={stores['validation']}"]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_train_reads_the_stores(stores, tmp_path, capsys):
    """A tiny run from explicit stores, with the study's rule: the first K documents."""
    k = 12
    argv = ["dvar", "train", f"--workdir={tmp_path / 'run'}", "--config.data.source=store",
            f"--config.data.train_store={stores['train']}",
            f"--config.data.validation_store={stores['validation']}",
            "--config.data.vocab_size=400", "--config.data.unique_tokens=0",
            f"--config.data.unique_documents={k}", "--config.model.name=cpu-xs",
            "--config.data.seq_len=32", "--config.data.epochs=1",
            "--config.data.validation_tokens=500", "--config.train.batch_size=8",
            "--config.eval.batch_size=8", "--progress=false"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    unique = TokenStore(stores["train"]).tokens_in_documents(k)
    assert summary["unique_tokens"] == unique
    assert summary["tokens"] == summary["steps"] * 8 * 32
    assert summary["steps"] == ((unique - 1) // 32) // 8


def _error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(["dvar", "prepare", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or not err[-1].startswith("dvar"), err
    return err[-1]


def test_wrong_arguments(stores, tmp_path, capsys, text_corpus_dir):
    out = tmp_path / "out"
    tokenizer = f"--tokenizer={stores['train'] / 'tokenizer'}"
    text = ["--source=text", f"--path={text_corpus_dir}", tokenizer, "--workers=1"]
    cases = [
        (["--source=web", f"--out={out}"],
         "--source='web'; allowed: shakespeare, text, tfds, megatron"),
        (["--source=text"], "--out is required"),
        ([*text, "--out=gs://bucket/store"], "writes a local folder"),
        ([*text, "--validation_fraction=0.1", f"--out={out}"], "choose --split=train or"),
        (["--source=text", f"--path={text_corpus_dir}", "--tokenizer=/no/such.model",
          f"--out={out}"], "/no/such.model"),
        ([*text, "--workers=-1", f"--out={out}"], "--workers=-1"),
        ([*text, "--shard_chars=0", f"--out={out}"], "--shard_chars=0"),
        (["--source=text", f"--path={tmp_path / 'none'}", tokenizer, f"--out={out}"],
         str(tmp_path / "none")),
        (["--source=tfds", "--tfds_name=dvar_not_prepared", f"--tfds_data_dir={tmp_path}",
          tokenizer, f"--out={out}"], "not prepared"),
    ]
    for argv, message in cases:
        line = _error(argv, capsys)
        assert message in line, (argv, line)
        assert not out.exists(), argv


def test_missing_text_field_names_file_and_line(tmp_path, capsys, stores):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    line = _error(["--source=text", f"--path={tmp_path / 'c'}", "--workers=1",
                   f"--tokenizer={stores['train'] / 'tokenizer'}", f"--out={tmp_path / 's'}"],
                  capsys)
    assert "a.jsonl:2" in line and "'text'" in line
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_out_of_another_source_is_refused(stores, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("other text\n")
    before = sorted(p.name for p in stores["train"].rglob("*"))
    line = _error(["--source=text", f"--path={tmp_path / 'c'}", "--workers=1",
                   f"--tokenizer={stores['train'] / 'tokenizer'}", f"--out={stores['train']}"],
                  capsys)
    assert "holds a store of another source" in line
    assert sorted(p.name for p in stores["train"].rglob("*")) == before


def _megatron_pair(prefix: Path, documents: list[list[int]], sentences_of_first: int = 1) -> None:
    """A Megatron indexed dataset written with struct alone (the format's independent
    reference): uint16 tokens, the first document split into `sentences_of_first` sequences, as
    Megatron's sentence splitting does."""
    import struct

    sequences = []
    for d, doc in enumerate(documents):
        if d == 0 and sentences_of_first > 1:
            cut = len(doc) // sentences_of_first
            sequences += [doc[:cut], doc[cut:]]
        else:
            sequences.append(doc)
    doc_idx = [0]
    for d, _ in enumerate(documents):
        doc_idx.append(doc_idx[-1] + (sentences_of_first if d == 0 else 1))
    prefix.with_suffix(".bin").write_bytes(b"".join(struct.pack(f"<{len(s)}H", *s)
                                                    for s in sequences))
    pointers, offset = [], 0
    for seq in sequences:
        pointers.append(offset)
        offset += 2 * len(seq)
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(sequences), len(doc_idx))
           + struct.pack(f"<{len(sequences)}i", *map(len, sequences))
           + struct.pack(f"<{len(sequences)}q", *pointers)
           + struct.pack(f"<{len(doc_idx)}q", *doc_idx))
    prefix.with_suffix(".idx").write_bytes(idx)


def test_megatron_data_is_read_as_a_store(stores, tmp_path, capsys):
    """The study's released format: PREFIX.bin/.idx become a store without re-tokenizing."""
    from dvar_jax.data.tokenizer import load_saved_tokenizer

    tokenizer = load_saved_tokenizer(stores["train"] / "tokenizer")
    texts = ["first document, in two sentences. Here.", "second", "third one\n"]
    documents = [[*tokenizer.encode(t), tokenizer.eod_id] for t in texts]
    _megatron_pair(tmp_path / "c4_text_document", documents, sentences_of_first=2)
    tok = f"--tokenizer={stores['train'] / 'tokenizer'}"
    assert main(["dvar", "prepare", "--source=megatron", f"--path={tmp_path / 'c4_text_document'}",
                 tok, f"--out={tmp_path / 'store'}"]) == 0
    store = TokenStore(tmp_path / "store")
    assert store.num_documents == 3 and store.num_tokens == sum(map(len, documents))
    assert [tokenizer.decode(d[:-1].tolist()) for d in store.documents()] == texts
    assert store.tokens_in_documents(1) == len(documents[0])
    assert store.tokenizer_fingerprint == tokenizer.fingerprint
    # Wrong arguments: one line each, nothing written.
    _megatron_pair(tmp_path / "big", [[0, 1, 5000, 1]])
    _megatron_pair(tmp_path / "cut", documents)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "cut.bin").read_bytes()[:-2])
    for argv, message in [
        ([f"--path={tmp_path / 'nothing'}", tok], "nothing.bin does not exist"),
        ([f"--path={tmp_path / 'c4_text_document'}"], "--source=megatron needs --path=PREFIX"),
        ([f"--path={tmp_path / 'big'}", tok], "holds id 5000 (near token 0), beyond the 400 ids"),
        ([f"--path={tmp_path / 'cut'}", tok], "cut.idx promises"),
    ]:
        line = _error(["--source=megatron", *argv, f"--out={tmp_path / 'bad'}"], capsys)
        assert message in line, line
        assert not (tmp_path / "bad").exists()
