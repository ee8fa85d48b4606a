"""Tokenizers trained and stored locally: bytes, or a byte-level BPE learned from the corpus.

ByteTokenizer   the UTF-8 bytes (ids 0-255) plus an end-of-text id 256: nothing to train,
                every string round-trips, sequences are ~3x longer than BPE's on code.
BPETokenizer    a byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, GPT-2's
                pre-tokenization regex, merges learned by HF `tokenizers`) with one special token,
                <|endoftext|>. Training on the default corpus takes a few seconds on two cores;
                the result is cached by corpus fingerprint and vocabulary size, so a second run
                (or a resumed one) loads it. Training is deterministic for a given corpus.

Both have vocab_size, eos_id, encode, encode_batch, decode, fingerprint, and save/load as JSON
only (the BPE file is HF's tokenizer.json, loadable by `tokenizers.Tokenizer.from_file`). decode
renders the end-of-text id as "<|endoftext|>"; in BPE a literal "<|endoftext|>" in the text also
encodes as that id (HF's special-token matching, as GPT-2's tokenizer with it allowed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from perfml.data.cache import atomic_path, resolve_cache_dir
from perfml.data.corpus import Corpus

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096
_BPE_CACHE_VERSION = "v1"

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end-of-text 256."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    @property
    def fingerprint(self) -> str:
        return _sha256(self.to_json())

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        parts, current = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                parts.append(current.decode("utf-8", errors="replace") + EOS_TOKEN)
                current = bytearray()
            elif 0 <= i < 256:
                current.append(i)
            else:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside [0, {self.vocab_size})")
        parts.append(current.decode("utf-8", errors="replace"))
        return "".join(parts)

    def to_json(self) -> str:
        return json.dumps({"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """A byte-level BPE from HF `tokenizers`, trained locally (see the module docstring)."""

    kind = "bpe"

    def __init__(self, tokenizer: HFTokenizer) -> None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"BPETokenizer: the tokenizer has no {EOS_TOKEN} token")
        self._tok = tokenizer
        self._eos_id = int(eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def fingerprint(self) -> str:
        return _sha256(self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(Path(path).read_text(encoding="utf-8")))
        except Exception as exc:  # tokenizers raises plain Exception on malformed JSON
            raise ValueError(f"BPETokenizer: cannot load {str(path)!r}: {exc}") from exc

    @classmethod
    def train(
        cls,
        corpus: Corpus,
        vocab_size: int = DEFAULT_BPE_VOCAB,
        cache_dir: str | Path | None = None,
    ) -> BPETokenizer:
        """Train on `corpus` or load the cached result of the same corpus and vocab_size.
        The vocabulary can end smaller than vocab_size when the corpus runs out of merges."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
            raise ValueError(
                f"BPETokenizer: vocab_size must be an int >= 258 (256 bytes, <|endoftext|>, one "
                f"merge), got {vocab_size!r}"
            )
        name = f"bpe-{_BPE_CACHE_VERSION}-{corpus.fingerprint[:16]}-{vocab_size}.json"
        path = resolve_cache_dir(cache_dir) / name
        if path.exists():
            return cls.load(path)
        tokenizer = cls(_train_bpe(corpus, vocab_size))
        with atomic_path(path) as tmp:
            tokenizer.save(tmp)
        return tokenizer

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _train_bpe(corpus: Corpus, vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # every byte is a token from the start, so no input is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.documents(), trainer)
    return tok


def load_tokenizer(path: str | Path) -> ByteTokenizer | BPETokenizer:
    """A tokenizer saved by `save` (JSON; no code runs)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read a tokenizer from {str(path)!r}: {exc}") from exc
    if isinstance(data, dict) and data.get("type") == "byte":
        return ByteTokenizer()
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return BPETokenizer.load(path)
    raise ValueError(f"{str(path)!r} is not a saved perfml tokenizer")


def get_tokenizer(
    name: str,
    corpus: Corpus | None = None,
    vocab_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer called `name`: "byte" (corpus and vocab_size unused) or "bpe" (trained on
    `corpus` with vocab_size, default 4096, cached under cache_dir)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if corpus is None:
            raise ValueError("get_tokenizer: 'bpe' is trained on a corpus; pass corpus=")
        return BPETokenizer.train(
            corpus, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size, cache_dir
        )
    raise ValueError(f"unknown tokenizer {name!r}; known: 'byte', 'bpe'")
