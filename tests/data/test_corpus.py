"""perfml.data.corpus: the default standard-library corpus, paths, and fingerprints."""

import shutil

import pytest

from perfml.data import corpus_fingerprint, default_corpus_files, load_corpus
from perfml.data.corpus import stdlib_dir


def write_tree(root, files):
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return root


def test_default_corpus_is_the_stdlib_sources():
    files = default_corpus_files()
    root = stdlib_dir()
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "os.py" in names and "json/__init__.py" in names
    assert all(name.endswith(".py") for name in names)
    for skipped in ("site-packages", "test", "idlelib", "encodings"):
        assert not any(skipped in name.split("/")[:-1] for name in names), skipped
    size = sum(f.stat().st_size for f in files)
    assert 1e6 < size < 3e7  # a few MB of real text
    assert default_corpus_files() == files


def test_load_default_corpus():
    corpus = load_corpus(None)
    assert corpus.source == "stdlib"
    assert corpus.files == tuple(default_corpus_files())
    assert len(corpus.fingerprint) == 64
    assert corpus.fingerprint == corpus_fingerprint(list(corpus.files), corpus.root)
    record = corpus.describe()
    assert record["files"] == len(corpus.files) and record["fingerprint"] == corpus.fingerprint


def test_fingerprint_follows_names_sizes_and_contents(tmp_path):
    a = write_tree(tmp_path / "a", {"x.txt": "hello", "sub/y.txt": "world"})
    first = load_corpus(a).fingerprint
    assert load_corpus(a).fingerprint == first
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, copy)
    assert load_corpus(copy).fingerprint == first  # names are relative to the corpus root
    (copy / "x.txt").write_text("jello")  # same size, other bytes
    assert load_corpus(copy).fingerprint != first
    (copy / "x.txt").write_text("hello")
    assert load_corpus(copy).fingerprint == first
    (copy / "x.txt").rename(copy / "z.txt")
    assert load_corpus(copy).fingerprint != first
    (copy / "z.txt").rename(copy / "x.txt")
    (copy / "more.txt").write_text("!")
    assert load_corpus(copy).fingerprint != first


def test_folder_takes_text_files_sorted_and_skips_the_rest(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "b.txt": "bee",
            "a/z.md": "zed",
            "a/b.py": "print(1)",
            "blob.bin": b"\x00\x01\x02",
            "latin1.txt": b"caf\xe9 au lait",
            ".hidden": "secret",
            ".git/config": "[core]",
            # a two-byte character cut by the 8 KiB sniff window is still text
            "long.txt": "x" * 8191 + "\u00e9",
        },
    )
    corpus = load_corpus(root)
    assert [f.relative_to(root).as_posix() for f in corpus.files] == [
        "a/b.py",
        "a/z.md",
        "b.txt",
        "long.txt",
    ]
    docs = list(corpus.documents())
    assert docs[:3] == ["print(1)", "zed", "bee"]
    assert corpus.text == "\n\n".join(docs)
    assert corpus.num_bytes == 8 + 3 + 3 + 8193


def test_single_file_and_undecodable_bytes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"caf\xe9")
    corpus = load_corpus(str(path))
    assert corpus.files == (path.resolve(),)
    assert list(corpus.documents()) == ["caf\ufffd"]
    assert corpus.source == str(path)


def test_missing_or_empty_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/place"):
        load_corpus(tmp_path / "no/such/place")
    write_tree(tmp_path / "binary", {"x.bin": b"\x00"})
    with pytest.raises(ValueError, match="contains no text files"):
        load_corpus(tmp_path / "binary")
