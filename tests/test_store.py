"""Token stores: `prepare_store` writes them (resumably, with any number of workers), and
`TokenStore` reads them back by memory map; the training batches cut from a store."""

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dvar_jax.data.corpus import SourceSpec, iter_documents
from dvar_jax.data.pipeline import ArrayTokens, TrainBatches, check_stores, validation_windows
from dvar_jax.data.prepare import prepare_store
from dvar_jax.data.store import StoreError, TokenStore, read_index, write_index
from dvar_jax.data.tokenizer import open_tokenizer, train_sentencepiece

# Small shards (a few documents each), so that every test crosses shard boundaries.
SHARD_CHARS = 6_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, synthetic_documents) -> tuple[Path, list[str]]:
    """60 documents as C4-style gzipped JSON lines in three files, and their texts in order."""
    root = tmp_path_factory.mktemp("jsonl_corpus")
    texts = synthetic_documents(60, 30, seed=5)
    for f in range(3):
        with gzip.open(root / f"c4-train.{f:05d}-of-01024.json.gz", "wt") as out:
            for text in texts[f * 20:(f + 1) * 20]:
                out.write(json.dumps({"text": text, "url": "x"}) + "\n")
    return root, texts


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpus):
    root, _ = corpus
    model = train_sentencepiece(iter_documents(SourceSpec("text", "all", path=str(root))), 400,
                                "bpe")
    path = tmp_path_factory.mktemp("spm") / "t.model"
    path.write_bytes(model)
    return open_tokenizer(str(path))


def _prepare(source_root, tokenizer, out, **kwargs):
    kwargs.setdefault("shard_chars", SHARD_CHARS)
    kwargs.setdefault("command", "dvar prepare --source=text")
    kwargs.setdefault("workers", 1)
    return prepare_store(SourceSpec("text", "all", path=str(source_root)), tokenizer, out,
                         log=lambda line: None, **kwargs)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, corpus, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("stores") / "train"
    _prepare(corpus[0], tokenizer, out)
    return out


def _stream(tokenizer, texts) -> np.ndarray:
    """The independent reference: each text's ids, then end-of-document, concatenated."""
    return np.concatenate([np.array([*tokenizer.encode(t), tokenizer.eod_id]) for t in texts])


def test_store_holds_the_source_documents_in_order(store_dir, corpus, tokenizer):
    _, texts = corpus
    store = TokenStore(store_dir)
    assert len(store.shards) > 3  # several shards, so offsets are exercised
    assert store.num_documents == len(texts)
    np.testing.assert_array_equal(store.read(0, store.num_tokens), _stream(tokenizer, texts))
    decoded = [tokenizer.decode(doc[:-1].tolist()) for doc in store.documents()]
    assert decoded == texts
    assert all(doc[-1] == tokenizer.eod_id for doc in store.documents())
    # Reads that straddle shard boundaries equal the reference slice.
    reference = _stream(tokenizer, texts)
    for start in (int(s) - 3 for s in store.token_starts[1:-1]):
        np.testing.assert_array_equal(store.read(start, start + 7), reference[start:start + 7])
    # The store's own tokenizer is the one it was made with.
    assert store.tokenizer.fingerprint == tokenizer.fingerprint
    assert store.dtype == np.uint16


def test_manifest_counts_and_megatron_index(store_dir, tokenizer, corpus):
    _, texts = corpus
    manifest = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["tokens"] == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["documents"] == len(texts)
    first_tokens = [s["first_token"] for s in manifest["shards"]]
    assert first_tokens == list(np.cumsum([0] + [s["tokens"] for s in manifest["shards"]])[:-1])
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert len(manifest["source"]) and len(manifest["fingerprint"]) == 64
    # Each .idx, parsed independently with struct, matches the .bin and the document lengths.
    lengths = [len(tokenizer.encode(t)) + 1 for t in texts]
    seen = 0
    for shard in manifest["shards"]:
        data = (store_dir / "shards" / f"{shard['name']}.idx").read_bytes()
        assert data[:9] == b"MMIDIDX\x00\x00"
        version, code, sequences, documents = struct.unpack_from("<QBQQ", data, 9)
        assert (version, code, sequences, documents) == (1, 8, shard["documents"],
                                                         shard["documents"] + 1)
        sizes = struct.unpack_from(f"<{sequences}i", data, 34)
        assert list(sizes) == lengths[seen:seen + sequences]
        pointers = struct.unpack_from(f"<{sequences}q", data, 34 + 4 * sequences)
        assert list(pointers) == [2 * sum(sizes[:i]) for i in range(sequences)]
        seen += sequences
        assert (store_dir / "shards" / f"{shard['name']}.bin").stat().st_size == \
            2 * shard["tokens"]


def test_index_round_trip_and_int32(tmp_path):
    lengths = np.array([3, 1, 5], np.int64)
    write_index(tmp_path / "a.idx", lengths, np.dtype(np.int32))
    index = read_index((tmp_path / "a.idx").read_bytes(), "a.idx")
    assert index.dtype == np.int32
    np.testing.assert_array_equal(index.sequence_pointers, [0, 12, 16])
    np.testing.assert_array_equal(index.document_token_ends(), [3, 4, 9])
    with pytest.raises(StoreError, match="truncated"):
        read_index((tmp_path / "a.idx").read_bytes()[:-3], "a.idx")
    with pytest.raises(StoreError, match="not a Megatron"):
        read_index(b"garbage", "b.idx")


@pytest.mark.parametrize("workers", [2, 3])
def test_workers_keep_the_source_order(store_dir, corpus, tokenizer, tmp_path, workers):
    """The prefix-and-order property holds for any number of workers: the same store."""
    out = tmp_path / f"w{workers}"
    manifest = _prepare(corpus[0], tokenizer, out, workers=workers)
    reference = json.loads((store_dir / "manifest.json").read_text())
    assert manifest["fingerprint"] == reference["fingerprint"]
    assert [s["bin_sha256"] for s in manifest["shards"]] == \
        [s["bin_sha256"] for s in reference["shards"]]


def test_first_documents_are_a_prefix(store_dir, corpus, tokenizer, tmp_path):
    """A store of the first 20 documents is a prefix of the store of all 60."""
    root, texts = corpus
    head = tmp_path / "head"
    head.mkdir()
    (head / "c4-train.00000-of-01024.json.gz").write_bytes(
        (root / "c4-train.00000-of-01024.json.gz").read_bytes())
    _prepare(head, tokenizer, tmp_path / "small")
    small, full = TokenStore(tmp_path / "small"), TokenStore(store_dir)
    assert small.num_documents == 20
    np.testing.assert_array_equal(small.read(0, small.num_tokens), full.read(0, small.num_tokens))
    assert full.tokens_in_documents(20) == small.num_tokens
    assert full.tokens_in_documents(0) == 0
    k = 37
    assert full.tokens_in_documents(k) == len(_stream(tokenizer, texts[:k]))


def test_resume_skips_finished_shards_and_repairs_damage(store_dir, corpus, tokenizer,
                                                         tmp_path):
    out = tmp_path / "store"
    reference = _prepare(corpus[0], tokenizer, out)
    lines = []
    again = prepare_store(SourceSpec("text", "all", path=str(corpus[0])), tokenizer, out,
                          shard_chars=SHARD_CHARS, workers=1, log=lines.append)
    assert again == reference and "nothing to do" in lines[-1]
    # An interrupted run: no manifest, one shard never finished, one truncated.
    (out / "manifest.json").unlink()
    with pytest.raises(StoreError, match="unfinished"):
        TokenStore(out)
    (out / "shards" / "00002.json").unlink()
    bin3 = out / "shards" / "00003.bin"
    bin3.write_bytes(bin3.read_bytes()[:10])
    finished = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.bin")
                if p.name not in ("00002.bin", "00003.bin")}
    lines.clear()
    resumed = prepare_store(SourceSpec("text", "all", path=str(corpus[0])), tokenizer, out,
                            shard_chars=SHARD_CHARS, workers=1, log=lines.append)
    assert resumed["fingerprint"] == reference["fingerprint"]
    assert f"({len(reference['shards']) - 2} already done)" in lines[-1]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # not rewritten


def test_damaged_shard_is_named_and_repaired(store_dir, corpus, tokenizer, tmp_path):
    out = tmp_path / "store"
    _prepare(corpus[0], tokenizer, out)
    (out / "shards" / "00001.bin").write_bytes(b"\x00" * 6)
    store = TokenStore(out)
    with pytest.raises(StoreError, match=r"shard .*00001\.bin .* truncated or damaged: 6 bytes"):
        store.read(0, store.num_tokens)
    with pytest.raises(StoreError, match=r"00001\.bin"):
        store.check_shards()
    store.check_shards(int(store.token_starts[1]))  # the prefix before it is whole
    (out / "shards" / "00004.bin").unlink()
    assert re.search(r"00004\.bin of store .* is missing; run `dvar prepare --",
                     TokenStore(out).shard_problem(4))
    _prepare(corpus[0], tokenizer, out)
    TokenStore(out).check_shards()


def test_out_holding_another_store_is_refused(store_dir, tmp_path, synthetic_documents,
                                              tokenizer):
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("another corpus\n")
    before = sorted(p.name for p in store_dir.rglob("*"))
    with pytest.raises(StoreError, match=r"holds a store of another source"):
        _prepare(other, tokenizer, store_dir)
    assert sorted(p.name for p in store_dir.rglob("*")) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a token store"):
        _prepare(other, tokenizer, tmp_path / "busy")


def test_batches_from_a_store_equal_batches_from_the_array(store_dir, tokenizer, corpus):
    """Same permutation, windows and host rows as the in-memory reference."""
    store = TokenStore(store_dir)
    tokens = store.read(0, store.num_tokens)
    kwargs = dict(seq_len=16, unique_tokens=3001, epochs=2.5, batch_size=8, seed=4)
    from_store, from_array = TrainBatches(store, **kwargs), TrainBatches(tokens, **kwargs)
    for step in (0, 7, from_store.num_steps - 1):
        np.testing.assert_array_equal(from_store.batch(step), from_array.batch(step))
        ids = from_store.global_window_ids(step)
        starts = ids[:, None] * 16 + np.arange(17)
        np.testing.assert_array_equal(from_store.batch(step), tokens[starts])
    np.testing.assert_array_equal(validation_windows(store, 16, 500),
                                  validation_windows(ArrayTokens(tokens), 16, 500))


_ROWS_SCRIPT = """
import sys, numpy as np
from dvar_jax.data.pipeline import TrainBatches
from dvar_jax.data.store import TokenStore
p = int(sys.argv[2])
b = TrainBatches(TokenStore(sys.argv[1]), seq_len=16, unique_tokens=3001, epochs=2, batch_size=8,
                 seed=4, process_index=p, process_count=2)
np.save(sys.argv[3], np.stack([b.batch(s) for s in range(b.num_steps)]))
"""


def test_two_processes_read_disjoint_rows_of_one_global_batch(store_dir, tmp_path):
    for p in (0, 1):
        subprocess.run([sys.executable, "-c", _ROWS_SCRIPT, str(store_dir), str(p),
                        str(tmp_path / f"p{p}.npy")], check=True, env=os.environ)
    rows = [np.load(tmp_path / f"p{p}.npy") for p in (0, 1)]
    whole = TrainBatches(TokenStore(store_dir), seq_len=16, unique_tokens=3001, epochs=2,
                         batch_size=8, seed=4)
    for step in range(whole.num_steps):
        np.testing.assert_array_equal(np.concatenate([rows[0][step], rows[1][step]]),
                                      whole.batch(step))
        ids = whole.global_window_ids(step)
        assert not set(ids[:4]) & set(ids[4:]) or whole.num_windows < 8


def _store_cfg(store_dir, **data):
    from dvar_jax.configs.base import get_config

    cfg = get_config()
    cfg.data.source, cfg.data.train_store, cfg.data.validation_store = \
        "store", str(store_dir), str(store_dir)
    cfg.data.vocab_size = 400
    for key, value in data.items():
        cfg.data[key] = value
    return cfg


def test_store_too_small_gives_both_numbers(store_dir):
    store = TokenStore(store_dir)
    cfg = _store_cfg(store_dir, unique_tokens=store.num_tokens + 1)
    with pytest.raises(StoreError, match=rf"data.unique_tokens={store.num_tokens + 1:,} exceeds "
                                         rf"the {store.num_tokens:,} tokens"):
        check_stores(cfg.data)
    cfg = _store_cfg(store_dir, unique_tokens=0, unique_documents=61)
    with pytest.raises(StoreError, match=r"data.unique_documents=61 exceeds the 60 documents"):
        check_stores(cfg.data)
    check_stores(_store_cfg(store_dir, unique_tokens=0, unique_documents=60).data)


def test_store_of_another_tokenizer_is_refused(store_dir, tmp_path, corpus):
    other = train_sentencepiece(iter_documents(SourceSpec("text", "all", path=str(corpus[0]))),
                                380, "bpe")
    (tmp_path / "o.model").write_bytes(other)
    cfg = _store_cfg(store_dir, tokenizer_path=str(tmp_path / "o.model"))
    with pytest.raises(StoreError, match=r"was made with .*vocab 400.* but the run's "
                                         r"data.tokenizer_path=.*o\.model is .*vocab 380"):
        check_stores(cfg.data)
    with pytest.raises(StoreError, match=r"data.vocab_size=4096; set data.vocab_size=400"):
        check_stores(_store_cfg(store_dir, vocab_size=4096).data)
    with pytest.raises(StoreError, match="not a token store"):
        check_stores(_store_cfg(tmp_path).data)


def test_a_gs_store_is_read_through_epath_into_a_local_cache(store_dir, tmp_path, monkeypatch):
    """gs:// paths go through etils.epath (here its test double, serving a bucket from a local
    folder); shards are copied once into the shard cache, then memory-mapped."""
    from etils import epath
    from etils.epath import testing as epath_testing

    bucket = tmp_path / "bucket"
    shutil.copytree(store_dir, bucket / "stores" / "train")
    opened = []

    def local(path) -> str:
        text = os.fspath(path)
        if text.startswith("gs://"):
            opened.append(text)
            return str(bucket / text.removeprefix("gs://bucket/"))
        return text

    os_backend = epath.backend.os_backend
    # With TensorFlow installed (seqio's dependency), epath serves gs:// through tf.io.gfile,
    # which the test double does not replace: route it to the double.
    monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False)
    with epath_testing.mock_epath(
            open=lambda _, p, *a, **k: os_backend.open(local(p), *a, **k),
            exists=lambda _, p: os_backend.exists(local(p)),
            isdir=lambda _, p: os_backend.isdir(local(p)),
            listdir=lambda _, p: os_backend.listdir(local(p)),
            stat=lambda _, p: os_backend.stat(local(p))):
        store = TokenStore("gs://bucket/stores/train", shard_cache=tmp_path / "cache")
        tokens = store.read(0, store.num_tokens)
        assert store.tokenizer.fingerprint == TokenStore(store_dir).tokenizer_fingerprint
        reads = len(opened)
        store.read(0, store.num_tokens)
        assert len(opened) == reads  # the second read is served from the local copies
    np.testing.assert_array_equal(tokens, TokenStore(store_dir).read(0, store.num_tokens))
    cached = list((tmp_path / "cache").rglob("*.bin"))
    assert len(cached) == len(store.shards)


def test_a_gs_store_is_read_from_the_gcs_emulator(store_dir, tmp_path, gcs_bucket):
    """The same through the real gs:// path (etils.epath over gcsfs, dvar_jax.storage) against
    the GCS emulator: the store is uploaded, read into the shard cache, and equals the local."""
    from dvar_jax import storage

    for path in sorted(p for p in store_dir.rglob("*") if p.is_file()):
        storage.path(f"{gcs_bucket}/stores/train/{path.relative_to(store_dir).as_posix()}") \
            .write_bytes(path.read_bytes())
    store = TokenStore(f"{gcs_bucket}/stores/train", shard_cache=tmp_path / "cache")
    assert store.tokenizer.fingerprint == TokenStore(store_dir).tokenizer_fingerprint
    np.testing.assert_array_equal(store.read(0, store.num_tokens),
                                  TokenStore(store_dir).read(0, store.num_tokens))
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == len(store.shards)
