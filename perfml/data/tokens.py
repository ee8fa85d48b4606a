"""A corpus as one packed token stream, cached on disk, and its train/validation split.

The stream is every document's tokens followed by the end-of-text id, in corpus order:
doc0 <eos> doc1 <eos> ... docN <eos>. Windows cut from it (perfml.data.loader) cross document
boundaries freely, as in GPT-2's and nanoGPT's packing; the eos token tells the model where one
document ends. Ids are stored as int32 (half of int64's memory; the loader widens each batch).

Cache: safetensors under the cache folder (see perfml.data.cache), keyed by the corpus and
tokenizer fingerprints, so a changed file or a retrained tokenizer never reads stale tokens.
"""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from perfml.data.cache import atomic_path, resolve_cache_dir
from perfml.data.corpus import Corpus
from perfml.data.tokenizer import Tokenizer

_CACHE_VERSION = "v1"
_ENCODE_BATCH_DOCS = 64  # documents per encode_batch call: bounds the Python lists alive at once


def _encode(corpus: Corpus, tokenizer: Tokenizer) -> Tensor:
    pieces = []
    docs = corpus.documents()
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    while chunk := list(itertools.islice(docs, _ENCODE_BATCH_DOCS)):
        for ids in tokenizer.encode_batch(chunk):
            pieces += [np.asarray(ids, dtype=np.int32), eos]
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.int32)


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path | None = None
) -> Tensor:
    """The corpus's packed token stream, 1-D int32; loaded from the cache when present."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(f"{corpus.fingerprint}:{tokenizer.fingerprint}".encode()).hexdigest()
    path = resolve_cache_dir(cache_dir) / f"tokens-{_CACHE_VERSION}-{key[:20]}.safetensors"
    if path.exists():
        try:
            return load_file(path)["tokens"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise ValueError(
                f"tokenize_corpus: the cached token file {str(path)!r} is unreadable ({exc}); "
                "delete it to re-tokenize"
            ) from exc
    tokens = _encode(corpus, tokenizer)
    metadata = {
        "corpus_fingerprint": corpus.fingerprint,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "eos_id": str(tokenizer.eos_id),
    }
    with atomic_path(path) as tmp:
        save_file({"tokens": tokens}, tmp, metadata=metadata)
    return tokens


def train_val_split(tokens: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """(train, val): the last round(len * val_fraction) tokens are validation. Views, no copy.
    The cut falls wherever the count says, possibly inside a document."""
    if tokens.dim() != 1:
        raise ValueError(f"train_val_split: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(len(tokens) * val_fraction)
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]
