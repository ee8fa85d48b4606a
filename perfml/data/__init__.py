"""Local data for the training loop: corpora (the standard library's sources by default),
tokenizers (bytes or a locally trained BPE, cached), packed token streams and a resumable loader.

    corpus = load_corpus(None)                                  # or a file / folder path
    tok = get_tokenizer("bpe", corpus, vocab_size=4096)         # cached by corpus fingerprint
    train, val = train_val_split(tokenize_corpus(corpus, tok))
    loader = TokenLoader(train, batch_size=8, seq_len=256, seed=0)
    input_ids, labels = next(loader)                            # labels already shifted
"""

from perfml.data.cache import default_cache_dir
from perfml.data.corpus import Corpus, corpus_fingerprint, default_corpus_files, load_corpus
from perfml.data.loader import TokenLoader
from perfml.data.tokenizer import (
    EOS_TOKEN,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
)
from perfml.data.tokens import tokenize_corpus, train_val_split

__all__ = [
    "EOS_TOKEN",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "TokenLoader",
    "Tokenizer",
    "corpus_fingerprint",
    "default_cache_dir",
    "default_corpus_files",
    "get_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "tokenize_corpus",
    "train_val_split",
]
