"""perfml.data.tokenizer: bytes, the locally trained BPE and its cache, JSON save/load."""

import json
import shutil

import pytest

from perfml.data import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    get_tokenizer,
    load_corpus,
    load_tokenizer,
)
from perfml.data import tokenizer as tokenizer_module
from perfml.data.corpus import stdlib_dir

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "caf\u00e9 \u6f22\u5b57 \U0001f600 tabs\tand  spaces",
    "",
    "<|endoftext|> in the middle",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Five standard-library modules (~100 KB): enough merges for a 512-entry vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("argparse.py", "bisect.py", "calendar.py", "colorsys.py", "fnmatch.py"):
        shutil.copy(stdlib_dir() / name, root / name)
    return load_corpus(root)


@pytest.fixture(scope="module")
def bpe(small_corpus, tmp_path_factory):
    return BPETokenizer.train(small_corpus, 512, tmp_path_factory.mktemp("cache"))


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode([104, 105, 256, 33]) == "hi" + EOS_TOKEN + "!"
    with pytest.raises(ValueError, match="id 257"):
        tok.decode([257])


def test_bpe_round_trips_and_compresses(bpe, small_corpus):
    assert bpe.vocab_size == 512
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    for text in TEXTS:
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode(EOS_TOKEN) == [bpe.eos_id]
    assert bpe.encode_batch(TEXTS) == [bpe.encode(t) for t in TEXTS]
    doc = next(small_corpus.documents())
    ids = bpe.encode(doc)
    assert len(ids) < len(doc.encode()) / 2.5  # merges learned from Python source
    assert all(0 <= i < bpe.vocab_size for i in ids)


def test_bpe_is_cached_by_corpus_and_vocab_size(small_corpus, tmp_path, monkeypatch):
    first = BPETokenizer.train(small_corpus, 400, tmp_path)
    files = list(tmp_path.glob("bpe-*.json"))
    assert len(files) == 1 and small_corpus.fingerprint[:16] in files[0].name

    def no_training(*args):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tokenizer_module, "_train_bpe", no_training)
    second = get_tokenizer("bpe", small_corpus, vocab_size=400, cache_dir=tmp_path)
    assert second.fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="trained again"):
        BPETokenizer.train(small_corpus, 401, tmp_path)  # another size is another entry


def test_bpe_training_is_deterministic(small_corpus, bpe, tmp_path):
    again = BPETokenizer.train(small_corpus, 512, tmp_path)
    assert again.fingerprint == bpe.fingerprint


def test_save_and_load_are_json(bpe, tmp_path):
    for tok in (ByteTokenizer(), bpe):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        json.loads(path.read_text())
        loaded = load_tokenizer(path)
        assert type(loaded) is type(tok) and loaded.fingerprint == tok.fingerprint
        assert loaded.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(tmp_path / "bpe.json"))  # the file is HF's tokenizer.json
    assert hf.encode(TEXTS[0]).ids == bpe.encode(TEXTS[0])


def test_bad_files_and_names(small_corpus, tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        load_tokenizer(garbage)
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a saved perfml tokenizer"):
        load_tokenizer(other)
    corrupt = tmp_path / f"bpe-v1-{small_corpus.fingerprint[:16]}-300.json"
    corrupt.write_text('{"model": {"type": "BPE"}, "truncated')
    with pytest.raises(ValueError, match=corrupt.name):
        BPETokenizer.train(small_corpus, 300, tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer 'wordpiece'"):
        get_tokenizer("wordpiece", small_corpus)
    with pytest.raises(ValueError, match="pass corpus="):
        get_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 258"):
        get_tokenizer("bpe", small_corpus, vocab_size=100, cache_dir=tmp_path)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
