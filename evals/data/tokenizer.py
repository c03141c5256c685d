"""Tokenizers behind one small interface: raw bytes, a trained byte-level BPE, or Hugging Face.

All tokenizers expose ``name``, ``vocab_size`` (the embedding-table size the model needs, special
tokens included), ``eos_id``, ``encode``/``decode`` and ``encode_with_classes``, which also maps
per-character difficulty classes (see :mod:`evals.data.synthetic`) onto tokens: a token's class
is the maximum class over the characters it covers, so a token that contains any part of a hard
answer counts as hard.

There is no BOS and no padding token: documents are packed back to back, separated by EOS.

A tokenizer can be turned into a JSON-serialisable spec with :func:`tokenizer_to_spec` and
rebuilt with :func:`tokenizer_from_spec`, so a checkpoint can be evaluated with exactly the
tokenizer it was trained with.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals.data.synthetic import Document
from evals.suite.record import file_mode
from mor.errors import DataError

EOS_TOKEN = "<|endoftext|>"
HF_INSTALL_HINT = "pip install 'mor-bench[hf]'"
TOKENIZER_SPEC_FORMS = "'bytes', 'bpe:VOCAB_SIZE' (e.g. 'bpe:8192') or 'hf:NAME_OR_PATH'"
# 256 byte symbols + EOS + at least one merge.
MIN_BPE_VOCAB = 258


def _token_classes(char_classes: bytes, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Per-token class = max class over the characters ``[start, end)`` the token covers.

    Vectorised: for each class level c, a prefix count of characters with class >= c tells in
    O(1) whether a span contains such a character. A token with an empty span (possible when a
    multi-byte character is split over several byte-level tokens) takes the class of the
    character at its start.
    """
    if not offsets:
        return []
    chars = np.frombuffer(char_classes, dtype=np.uint8)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = spans[:, 0], spans[:, 1]
    result = np.zeros(len(spans), dtype=np.int64)
    if len(chars) == 0:
        return result.tolist()
    for level in range(1, int(chars.max()) + 1):
        at_least = np.concatenate(([0], np.cumsum(chars >= level)))
        result[at_least[ends] - at_least[starts] > 0] = level
    empty = starts >= ends
    if empty.any():
        result[empty] = chars[np.clip(starts[empty], 0, len(chars) - 1)]
    return result.tolist()


def _check_classes(text: str, char_classes: bytes) -> None:
    if len(char_classes) != len(text):
        raise DataError(
            f"char_classes has {len(char_classes)} entries for a text of {len(text)} characters; "
            "pass exactly one class id per character"
        )


class Tokenizer(ABC):
    """The interface every tokenizer implements."""

    name: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS/BOS added)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; EOS is rendered as ``<|endoftext|>``."""

    @abstractmethod
    def encode_with_classes(self, text: str, char_classes: bytes) -> tuple[list[int], list[int]]:
        """Token ids and, per token, the max difficulty class of the characters it covers."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; subclasses override this when they can do it faster."""
        return [self.encode(text) for text in texts]

    def encode_batch_with_classes(
        self, texts: Sequence[str], char_classes: Sequence[bytes]
    ) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode_with_classes` for many texts."""
        return [self.encode_with_classes(t, c) for t, c in zip(texts, char_classes, strict=True)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255, EOS = 256, vocabulary of 257."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        # Decode the bytes between EOS tokens separately so a document's broken trailing
        # UTF-8 sequence cannot swallow the start of the next one.
        parts: list[str] = []
        chunk = bytearray()
        for token in ids:
            token = int(token)
            if token == self.eos_id:
                parts.append(chunk.decode("utf-8", errors="replace") + EOS_TOKEN)
                chunk.clear()
            elif 0 <= token < 256:
                chunk.append(token)
            else:
                raise DataError(f"token id {token} is outside the byte tokenizer's range 0..256")
        parts.append(chunk.decode("utf-8", errors="replace"))
        return "".join(parts)

    @staticmethod
    def byte_classes(text: str, char_classes: bytes) -> np.ndarray:
        """Class per UTF-8 byte of ``text`` (each byte inherits its character's class)."""
        _check_classes(text, char_classes)
        classes = np.frombuffer(char_classes, dtype=np.uint8)
        if text.isascii():
            return classes
        widths = [len(ch.encode("utf-8")) for ch in text]
        return np.repeat(classes, widths)

    def encode_with_classes(self, text: str, char_classes: bytes) -> tuple[list[int], list[int]]:
        return self.encode(text), self.byte_classes(text, char_classes).tolist()


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained with the ``tokenizers`` library, with ``<|endoftext|>`` as EOS.

    ``name`` is ``bpe-<vocab size>-<first 12 hex of sha256 of the tokenizer JSON>``, so two
    tokenizers with the same name are the same tokenizer. The vocabulary size in the name is
    the real one, which can be below the requested size on a small training corpus.
    """

    def __init__(self, tokenizer: Any, *, loaded_from_cache: bool = False) -> None:
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(
                f"BPE tokenizer has no {EOS_TOKEN!r} token; train it with BPETokenizer.train"
            )
        self._tk = tokenizer
        self.eos_id = int(eos_id)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        digest = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
        self.name = f"bpe-{self.vocab_size}-{digest[:12]}"
        self.loaded_from_cache = loaded_from_cache

    @property
    def core(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (e.g. to wrap for Hugging Face)."""
        return self._tk

    @classmethod
    def train(cls, train_docs: Sequence[Document], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE on the texts of ``train_docs``."""
        from tokenizers import Tokenizer as HFTokenizerCore
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < MIN_BPE_VOCAB:
            raise DataError(
                f"BPE vocab_size {vocab_size} is too small; use at least {MIN_BPE_VOCAB} "
                "(256 byte symbols + EOS + merges), e.g. 'bpe:8192'"
            )
        if not train_docs:
            raise DataError("cannot train a BPE tokenizer on an empty training split")
        tk = HFTokenizerCore(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # Seed all 256 byte symbols so any text (also unseen characters) stays encodable.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator((d.text for d in train_docs), trainer, length=len(train_docs))
        return cls(tk)

    @classmethod
    def train_or_load(
        cls, train_docs: Sequence[Document], vocab_size: int, cache_dir: Path
    ) -> BPETokenizer:
        """Load ``cache_dir/bpe-{vocab_size}-{fingerprint}.json`` or train and write it.

        The cache key is the requested vocabulary size and :func:`corpus_fingerprint` of the
        training documents, so a different corpus or split never reuses a stale tokenizer.
        """
        path = Path(cache_dir) / f"bpe-{vocab_size}-{corpus_fingerprint(train_docs)}.json"
        if path.is_file():
            tok = cls.from_file(path)
            tok.loaded_from_cache = True
            return tok
        tok = cls.train(train_docs, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so concurrent runs never read half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.fchmod(fd, file_mode())  # mkstemp makes 0600: give it the mode open() would
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tok.to_json())
        os.replace(tmp, path)
        return tok

    @classmethod
    def from_json(cls, json_str: str) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizerCore

        try:
            return cls(HFTokenizerCore.from_str(json_str))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise DataError(f"invalid BPE tokenizer JSON ({_first_line(exc)})") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        path = Path(path)
        try:
            json_str = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot read tokenizer file '{path}': {exc.strerror}") from exc
        try:
            return cls.from_json(json_str)
        except DataError as exc:
            raise DataError(f"tokenizer file '{path}': {exc}; delete it to retrain") from exc

    def to_json(self) -> str:
        return self._tk.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust batch encoder runs in parallel, much faster than a Python loop.
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_with_classes(self, text: str, char_classes: bytes) -> tuple[list[int], list[int]]:
        return self.encode_batch_with_classes([text], [char_classes])[0]

    def encode_batch_with_classes(
        self, texts: Sequence[str], char_classes: Sequence[bytes]
    ) -> list[tuple[list[int], list[int]]]:
        encodings = self._tk.encode_batch(list(texts), add_special_tokens=False)
        out = []
        for text, classes, enc in zip(texts, char_classes, encodings, strict=True):
            _check_classes(text, classes)
            # Offsets from the byte-level pipeline are character offsets into `text`.
            out.append((enc.ids, _token_classes(classes, enc.offsets)))
        return out


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer loaded with ``transformers.AutoTokenizer.from_pretrained``."""

    def __init__(self, name_or_path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise DataError(
                f"tokenizer 'hf:{name_or_path}' needs transformers; run {HF_INSTALL_HINT}"
            ) from exc
        try:
            tok = AutoTokenizer.from_pretrained(name_or_path)
        except Exception as exc:  # network, missing repo, bad files: all surface the same way
            raise DataError(
                f"cannot load tokenizer 'hf:{name_or_path}' ({_first_line(exc)}); "
                f"{_hub_hint(name_or_path)}"
            ) from exc
        if tok.eos_token_id is None:
            raise DataError(
                f"tokenizer 'hf:{name_or_path}' has no eos_token; choose one that defines it"
            )
        # Documents are encoded whole and windowed later; silence the max-length warning.
        tok.model_max_length = sys.maxsize
        self._tok = tok
        self.hf_name = name_or_path
        self.name = f"hf:{name_or_path}"
        self.vocab_size = len(tok)
        self.eos_id = int(tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def encode_with_classes(self, text: str, char_classes: bytes) -> tuple[list[int], list[int]]:
        _check_classes(text, char_classes)
        if not getattr(self._tok, "is_fast", False):
            raise DataError(
                f"tokenizer '{self.name}' is not a fast tokenizer, so it has no character "
                "offsets for difficulty classes; use a fast tokenizer or a real-text corpus"
            )
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), _token_classes(char_classes, enc["offset_mapping"])


def _hub_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_hint(name_or_path: str) -> str:
    """What to do when a Hugging Face tokenizer does not load: offline (compute nodes without
    network, docs/cluster.md), a Hub name must already be in the Hugging Face cache."""
    if _hub_offline() and not Path(name_or_path).exists():
        return ("the Hub is off (HF_HUB_OFFLINE) and it is not in the Hugging Face cache: "
                f"run `hf download {name_or_path} --include '*.json'` where there is network "
                "(same HF_HOME), or pass a local directory")
    return "check the model name or local path"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """16 hex chars of a SHA-256 over the ids and texts of ``docs`` (in order)."""
    h = hashlib.sha256()
    for doc in docs:
        for field in (doc.id, doc.text):
            data = field.encode("utf-8")
            # Length-prefix each field so ("ab", "c") and ("a", "bc") hash differently.
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:16]


def build_tokenizer(spec: str, train_docs: Sequence[Document], cache_dir: Path) -> Tokenizer:
    """Build the tokenizer named by ``spec``: 'bytes', 'bpe:N' or 'hf:NAME_OR_PATH'.

    BPE tokenizers are trained on ``train_docs`` (the training split only, so validation text
    never leaks into the vocabulary) and cached under ``cache_dir``.
    """
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise DataError(
                f"tokenizer spec '{spec}': vocab size must be an integer, e.g. bpe:8192"
            )
        return BPETokenizer.train_or_load(train_docs, int(size), cache_dir)
    if spec.startswith("hf:") and len(spec) > 3:
        return HFTokenizer(spec[3:])
    raise DataError(f"unknown tokenizer spec '{spec}'; use {TOKENIZER_SPEC_FORMS}")


def tokenizer_to_spec(tok: Tokenizer) -> dict[str, str]:
    """A JSON-serialisable description from which :func:`tokenizer_from_spec` rebuilds ``tok``."""
    if isinstance(tok, ByteTokenizer):
        return {"kind": "bytes"}
    if isinstance(tok, BPETokenizer):
        return {"kind": "bpe", "json": tok.to_json()}
    if isinstance(tok, HFTokenizer):
        return {"kind": "hf", "name": tok.hf_name}
    raise TypeError(f"cannot serialise tokenizer of type {type(tok).__name__}")


def tokenizer_from_spec(spec: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved with :func:`tokenizer_to_spec`."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe" and isinstance(spec.get("json"), str):
        return BPETokenizer.from_json(spec["json"])
    if kind == "hf" and isinstance(spec.get("name"), str):
        return HFTokenizer(spec["name"])
    raise DataError(
        f"invalid saved tokenizer spec (kind={kind!r}); expected kind 'bytes', 'bpe' with "
        "'json', or 'hf' with 'name' - was the checkpoint written by mor-bench?"
    )
