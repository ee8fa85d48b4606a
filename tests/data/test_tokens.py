"""perfml.data.tokens: the packed token stream, its cache, and the train/val split."""

import pytest
import torch

from perfml.data import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    load_corpus,
    tokenize_corpus,
    train_val_split,
)
from perfml.data import tokens as tokens_module


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs = {"a.txt": "first doc\n", "b.txt": "caf\u00e9 second", "c/d.txt": "third " * 50}
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return load_corpus(root)


def test_stream_is_documents_joined_by_eos(corpus, tmp_path):
    tok = ByteTokenizer()
    tokens = tokenize_corpus(corpus, tok, cache_dir=tmp_path / "cache")
    assert tokens.dtype == torch.int32 and tokens.dim() == 1
    want = []
    for doc in corpus.documents():
        want += list(doc.encode("utf-8")) + [256]
    assert tokens.tolist() == want


def test_bpe_stream_decodes_to_the_documents(corpus, tmp_path):
    tok = BPETokenizer.train(corpus, 300, tmp_path)
    tokens = tokenize_corpus(corpus, tok, cache_dir=tmp_path)
    assert tok.decode(tokens.tolist()) == "".join(d + EOS_TOKEN for d in corpus.documents())


def test_stream_is_cached_by_corpus_and_tokenizer(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache)
    assert len(list(cache.glob("tokens-*.safetensors"))) == 1

    def no_encoding(*args):
        raise AssertionError("tokenized again instead of loading the cache")

    monkeypatch.setattr(tokens_module, "_encode", no_encoding)
    assert torch.equal(tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache), first)
    bpe = BPETokenizer.train(corpus, 300, tmp_path)
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_corpus(corpus, bpe, cache_dir=cache)  # another tokenizer is another entry
    (corpus.root / "a.txt").write_text("changed\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_corpus(load_corpus(corpus.root), ByteTokenizer(), cache_dir=cache)


def test_corrupt_cache_is_named(corpus, tmp_path):
    cache = tmp_path / "cache"
    tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache)
    (path,) = cache.glob("tokens-*.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=path.name):
        tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache)


def test_train_val_split_takes_the_tail():
    tokens = torch.arange(1000, dtype=torch.int32)
    train, val = train_val_split(tokens, 0.05)
    assert len(train) == 950 and len(val) == 50
    assert torch.equal(torch.cat([train, val]), tokens)
    assert val.data_ptr() == tokens[950:].data_ptr()  # views, not copies
    assert train_val_split(tokens)[1].shape == (50,)
    assert len(train_val_split(tokens, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(tokens, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        train_val_split(tokens.view(10, 100))
