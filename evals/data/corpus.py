"""Corpora, the train/validation split, token packing and the prepared dataset.

Pipeline used by training and evaluation (:func:`prepare_data`):

1. :func:`load_documents` reads a corpus: the embedded synthetic one, local ``.txt`` /
   ``.jsonl`` / ``.jsonl.gz`` files (a file, a directory or a glob), or a Hugging Face dataset.
2. :func:`split_documents` assigns whole documents to train or validation by a salted hash of
   the document id, so the split does not depend on order and never changes when documents
   are added.
3. The tokenizer is built (BPE is trained on the training split only).
4. :func:`pack_documents` concatenates each split's documents, each followed by EOS, and cuts
   the stream into windows of ``seq_len + 1`` tokens (inputs ``w[:, :-1]``, targets
   ``w[:, 1:]``). As in the Mixture-of-Recursions paper, attention crosses document borders.
5. :func:`iterate_batches` yields shuffled training batches forever, deterministically per seed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evals.data.synthetic import Document, generate_documents
from evals.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, corpus_fingerprint
from mor.errors import DataError

CORPUS_FORMS = "synthetic, a .txt/.jsonl/.jsonl.gz file, a directory, a glob, or hf:DATASET"
CORPUS_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
HF_DEFAULT_MAX_DOCS = 20_000
# A .txt file longer than this (characters, ~1 MB) is split on blank lines into chunks of about
# TXT_CHUNK_CHARS, so that the document-level split has some granularity for one big file.
TXT_SPLIT_THRESHOLD = 1_000_000
TXT_CHUNK_CHARS = 100_000
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_documents(
    source: str, *, synthetic_docs: int = 4000, seed: int = 0, max_docs: int | None = None
) -> list[Document]:
    """Read the corpus named by ``source``; ``max_docs`` keeps only the first documents.

    ``source`` is ``synthetic`` / ``synthetic:N``, a local file, directory or glob of
    ``.txt``/``.jsonl``/``.jsonl.gz`` files, or ``hf:DATASET[:CONFIG][@SPLIT]``.
    """
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max_docs must be a positive integer, got {max_docs}")
    if source == "synthetic" or source.startswith("synthetic:"):
        n = synthetic_docs
        if source != "synthetic":
            count = source.split(":", 1)[1]
            if not count.isdigit() or int(count) < 1:
                raise DataError(f"corpus '{source}': N in synthetic:N must be a positive integer")
            n = int(count)
        if max_docs is not None:
            n = min(n, max_docs)
        docs = generate_documents(n, seed)
    elif source.startswith("hf:"):
        docs = _load_hf(source, HF_DEFAULT_MAX_DOCS if max_docs is None else max_docs)
    else:
        docs = list(itertools.islice(_iter_local(source), max_docs))
    if not docs:
        raise DataError(f"corpus '{source}' contains no documents; pass a non-empty corpus")
    return docs


def check_corpus(source: str) -> None:
    """Fail fast (DataError) on a corpus that cannot be read, reading at most one document:
    a missing path, an empty directory or glob, a bad synthetic:N, a missing `datasets`
    package for hf: sources. Hub datasets themselves are only checked when loaded."""
    if source == "synthetic" or source.startswith("synthetic:"):
        load_documents(source, max_docs=1)
    elif source.startswith("hf:"):
        _import_datasets(source)
    elif next(_iter_local(source), None) is None:
        raise DataError(f"corpus '{source}' contains no documents; pass a non-empty corpus")


def _iter_local(source: str) -> Iterator[Document]:
    """Documents from a local file, directory or glob, files in sorted order."""
    path = Path(source)
    if path.is_file():
        if not path.name.endswith(CORPUS_SUFFIXES):
            raise DataError(
                f"corpus file '{source}' has an unsupported type; use .txt, .jsonl or .jsonl.gz"
            )
        yield from _iter_file(path, path.name)
        return
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name.endswith(CORPUS_SUFFIXES)
        )
        if not files:
            raise DataError(f"corpus directory '{source}' holds no .txt, .jsonl or .jsonl.gz files")
        root = path
    elif glob.has_magic(source):
        files = sorted(
            Path(p) for p in glob.glob(source, recursive=True)
            if os.path.isfile(p) and p.endswith(CORPUS_SUFFIXES)
        )  # fmt: skip
        if not files:
            raise DataError(f"corpus glob '{source}' matches no .txt, .jsonl or .jsonl.gz files")
        root = Path(os.path.commonpath([p.parent for p in files]))
    else:
        raise DataError(f"corpus path '{source}' does not exist; pass --corpus {CORPUS_FORMS}")
    # Name files relative to the collection root: stable wherever the corpus lives (document
    # ids feed the train/val split) yet unique for same-named files in different folders.
    for file in files:
        yield from _iter_file(file, file.relative_to(root).as_posix())


def _iter_file(path: Path, name: str) -> Iterator[Document]:
    if path.name.endswith(".txt"):
        yield from _read_txt(path, name)
    else:
        yield from _read_jsonl(path, name)


def _read_txt(path: Path, name: str) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus file '{path}' is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read corpus file '{path}': {exc.strerror}") from exc
    if not text:
        return
    if len(text) <= TXT_SPLIT_THRESHOLD:
        yield Document(name, text, name)
        return
    chunk: list[str] = []
    size = 0
    index = 0
    for paragraph in _BLANK_LINES.split(text):
        chunk.append(paragraph)
        size += len(paragraph) + 2
        if size >= TXT_CHUNK_CHARS:
            yield Document(f"{name}#{index}", "\n\n".join(chunk), name)
            chunk, size, index = [], 0, index + 1
    if chunk:
        yield Document(f"{name}#{index}", "\n\n".join(chunk), name)


def _read_jsonl(path: Path, name: str) -> Iterator[Document]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"corpus file '{path}' line {lineno}: invalid JSON ({exc.msg}); "
                        "write one JSON object per line"
                    ) from exc
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"corpus file '{path}' line {lineno}: missing string field 'text'; "
                        'each line must be an object like {"text": "..."}'
                    )
                doc_id = record.get("id")
                source = record.get("source")
                yield Document(
                    id=f"{name}:{lineno}" if doc_id is None else str(doc_id),
                    text=text,
                    source=name if source is None else str(source),
                )
    except (UnicodeDecodeError, OSError, EOFError) as exc:  # OSError includes BadGzipFile
        raise DataError(
            f"corpus file '{path}' cannot be read ({type(exc).__name__}); "
            "it must be UTF-8 JSON lines, gzip-compressed if it ends in .gz"
        ) from exc


def _import_datasets(source: str = "hf:..."):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"corpus '{source}' needs the datasets package; run pip install 'mor-bench[hf]'"
        ) from exc
    return datasets


def _load_hf(source: str, max_docs: int) -> list[Document]:
    """``hf:DATASET[:CONFIG][@SPLIT]`` streamed with ``datasets.load_dataset``."""
    datasets = _import_datasets(source)
    rest, _, split = source[3:].partition("@")
    dataset, _, config = rest.partition(":")
    split = split or "train"
    if not dataset:
        raise DataError(f"corpus '{source}' names no dataset; use hf:DATASET[:CONFIG][@SPLIT]")
    try:
        stream = datasets.load_dataset(dataset, config or None, split=split, streaming=True)
        rows = list(itertools.islice(iter(stream), max_docs))
    except Exception as exc:  # network, missing dataset, bad split: surface one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(
            f"cannot load corpus '{source}' ({first}); check the dataset name, config and split"
        ) from exc
    label = dataset if not config else f"{dataset}:{config}"
    docs = []
    for i, row in enumerate(rows):
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(
                f"corpus '{source}' row {i}: no string 'text' column (columns: "
                f"{', '.join(map(str, row))}); pick a dataset with a text column"
            )
        doc_id = row.get("id")
        docs.append(
            Document(f"{label}@{split}:{i}" if doc_id is None else str(doc_id), text, label)
        )
    return docs


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def _split_hash(salt: str, doc_id: str) -> float:
    digest = hashlib.sha256((salt + doc_id).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05, salt: str = "mor-bench"
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, validation) by a salted hash of each document's id.

    A document goes to validation iff ``int(sha256(salt + id)[:8], 16) / 2**32 < val_fraction``,
    so membership does not depend on document order and adding documents never moves existing
    ones. Both lists keep the input order.

    Tiny corpora: if validation ends up empty although there are at least 2 documents, the
    document with the smallest hash is moved to validation; symmetrically, if training ends up
    empty, the one with the largest hash is moved to training. So with >= 2 documents both
    splits are non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    hashes = [_split_hash(salt, d.id) for d in docs]
    in_val = [h < val_fraction for h in hashes]
    if len(docs) >= 2:
        if not any(in_val):
            in_val[min(range(len(docs)), key=hashes.__getitem__)] = True
        if all(in_val):
            in_val[max(range(len(docs)), key=hashes.__getitem__)] = False
    train = [d for d, v in zip(docs, in_val, strict=True) if not v]
    val = [d for d, v in zip(docs, in_val, strict=True) if v]
    return train, val


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedTokens:
    """A token stream cut into windows of ``seq_len + 1`` tokens.

    ``classes`` holds the difficulty class of each token (EOS is class 0) when every packed
    document has ``char_classes``, else ``None``. ``n_tokens`` counts the tokens before the
    remainder was dropped; ``n_bytes`` the UTF-8 bytes of all texts (for bits per byte).
    """

    windows: torch.Tensor  # int64 [N, seq_len + 1]
    classes: torch.Tensor | None  # uint8 [N, seq_len + 1]
    n_tokens: int
    n_bytes: int

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1] - 1


def _byte_stream(
    docs: Sequence[Document], eos_id: int, with_classes: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Fast path for the byte tokenizer: all documents' bytes and EOS in a few numpy ops."""
    encoded = [d.text.encode("utf-8") for d in docs]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    total = int(lengths.sum()) + len(docs)
    eos_positions = np.cumsum(lengths + 1) - 1
    is_eos = np.zeros(total, dtype=bool)
    is_eos[eos_positions] = True
    tokens = np.empty(total, dtype=np.int64)
    tokens[is_eos] = eos_id
    tokens[~is_eos] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    if not with_classes:
        return tokens, None
    classes = np.zeros(total, dtype=np.uint8)
    per_doc = [ByteTokenizer.byte_classes(d.text, d.char_classes or b"") for d in docs]
    classes[~is_eos] = np.concatenate(per_doc) if per_doc else []
    return tokens, classes


def _generic_stream(
    docs: Sequence[Document], tokenizer: Tokenizer, with_classes: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    texts = [d.text for d in docs]
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    zero = np.zeros(1, dtype=np.uint8)
    token_parts: list[np.ndarray] = []
    class_parts: list[np.ndarray] = []
    if with_classes:
        encoded = tokenizer.encode_batch_with_classes(texts, [d.char_classes for d in docs])
        for ids, classes in encoded:
            token_parts += [np.asarray(ids, dtype=np.int64), eos]
            class_parts += [np.asarray(classes, dtype=np.uint8), zero]
    else:
        for ids in tokenizer.encode_batch(texts):
            token_parts += [np.asarray(ids, dtype=np.int64), eos]
    tokens = np.concatenate(token_parts) if token_parts else np.empty(0, np.int64)
    return tokens, (np.concatenate(class_parts) if with_classes else None)


def pack_documents(
    docs: Sequence[Document], tokenizer: Tokenizer, seq_len: int, *, label: str = "documents"
) -> PackedTokens:
    """Tokenize ``docs``, append EOS after each and cut into windows of ``seq_len + 1`` tokens.

    The trailing tokens that do not fill a window are dropped. ``label`` names the documents in
    error messages (e.g. "validation split").
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len}")
    for doc in docs:
        if doc.char_classes is not None and len(doc.char_classes) != len(doc.text):
            raise DataError(
                f"document '{doc.id}' has {len(doc.char_classes)} char_classes for "
                f"{len(doc.text)} characters; give exactly one class per character"
            )
    with_classes = bool(docs) and all(d.char_classes is not None for d in docs)
    if isinstance(tokenizer, ByteTokenizer):
        tokens, classes = _byte_stream(docs, tokenizer.eos_id, with_classes)
    else:
        tokens, classes = _generic_stream(docs, tokenizer, with_classes)
    window = seq_len + 1
    n_windows = len(tokens) // window
    if n_windows == 0:
        raise DataError(
            f"{label}: only {len(tokens)} tokens ({len(docs)} docs), fewer than one window of "
            f"seq_len+1={window}; use a smaller --seq-len or more documents"
        )
    keep = n_windows * window
    # Views, not copies: the stream can be hundreds of MB and the dropped tail is tiny.
    windows = torch.from_numpy(tokens[:keep].reshape(n_windows, window))
    class_windows = None
    if classes is not None:
        class_windows = torch.from_numpy(classes[:keep].reshape(n_windows, window))
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    return PackedTokens(windows, class_windows, n_tokens=len(tokens), n_bytes=n_bytes)


# ---------------------------------------------------------------------------------------------
# Prepared dataset
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the prepared data (stored with runs for reproducibility)."""

    corpus: str = "synthetic"
    """"synthetic[:N]", a local .txt/.jsonl/.jsonl.gz file, directory or glob, or
    hf:DATASET[:CONFIG][@SPLIT]."""
    tokenizer: str = "bytes"
    """"bytes", "bpe:VOCAB" (trained on the training split, cached) or "hf:NAME_OR_PATH"."""
    seq_len: int = 128
    val_fraction: float = 0.05
    synthetic_docs: int = 4000
    max_docs: int | None = None
    seed: int = 0


@dataclass
class PreparedData:
    """Tokenizer plus packed train/validation windows for one :class:`DataSpec`.

    ``fingerprint`` is :func:`corpus_fingerprint` over all loaded documents (both splits).
    """

    spec: DataSpec
    tokenizer: Tokenizer
    train: PackedTokens
    val: PackedTokens
    fingerprint: str
    n_train_docs: int
    n_val_docs: int


def prepare_data(spec: DataSpec, cache_dir: Path) -> PreparedData:
    """Load, split, tokenize and pack the corpus described by ``spec``.

    ``cache_dir`` holds trained BPE tokenizers (see :meth:`BPETokenizer.train_or_load`).
    """
    docs = load_documents(
        spec.corpus, synthetic_docs=spec.synthetic_docs, seed=spec.seed, max_docs=spec.max_docs
    )
    train_docs, val_docs = split_documents(docs, spec.val_fraction)
    if not train_docs or not val_docs:
        raise DataError(
            f"corpus '{spec.corpus}' has {len(docs)} document(s); need at least 2 to make "
            "both a training and a validation split"
        )
    tokenizer = build_tokenizer(spec.tokenizer, train_docs, Path(cache_dir))
    return PreparedData(
        spec=spec,
        tokenizer=tokenizer,
        train=pack_documents(train_docs, tokenizer, spec.seq_len, label="training split"),
        val=pack_documents(val_docs, tokenizer, spec.seq_len, label="validation split"),
        fingerprint=corpus_fingerprint(docs),
        n_train_docs=len(train_docs),
        n_val_docs=len(val_docs),
    )


def iterate_batches(
    windows: torch.Tensor, batch_size: int, seed: int, *, start: int = 0, rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y) = (w[:, :-1], w[:, 1:])`` batches forever, deterministically for ``seed``.

    Epoch ``e`` visits the windows in the order of a permutation drawn from
    ``torch.Generator().manual_seed(seed * 1_000_003 + e)``. GLOBAL batches of
    ``batch_size * world_size`` windows are consecutive slices of the concatenated epoch
    orders, so every batch is full and no window is skipped (a batch may straddle two
    epochs, and with fewer windows than a batch it spans several).

    Data parallelism: process ``rank`` of ``world_size`` takes rows ``rank * batch_size``
    to ``(rank + 1) * batch_size`` of every global batch -- disjoint shards whose union is
    exactly what one process with the global batch reads. ``start`` skips that many global
    batches (a resumed run's data position); skipping costs index arithmetic only.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if start < 0:
        raise DataError(f"start must be >= 0, got {start}")
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(
            f"need a non-empty [N, seq_len+1] tensor of windows, got shape {tuple(windows.shape)}"
        )
    global_batch = batch_size * world_size
    n = windows.shape[0]
    skip = start * global_batch
    epoch, offset = divmod(skip, n)
    indices = itertools.islice(_epoch_indices(n, seed, first_epoch=epoch), offset, None)
    for batch in _batched(indices, global_batch):
        mine = batch[rank * batch_size:(rank + 1) * batch_size]
        # Windows may be stored compactly (uint16/int32); models take int64 ids.
        w = windows[torch.tensor(mine, dtype=torch.long)].long()
        yield w[:, :-1], w[:, 1:]


@dataclass(frozen=True)
class Batches:
    """`iterate_batches` as a function of the start position (global micro-batches
    already consumed): what `evals.training.loop.train` needs to resume a run."""

    windows: torch.Tensor
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    def __call__(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate_batches(self.windows, self.batch_size, self.seed, start=start,
                               rank=self.rank, world_size=self.world_size)


def data_position(n_windows: int, batch_size: int, world_size: int, consumed: int) -> dict:
    """Where `consumed` global batches leave the window order: for checkpoints and
    records (which windows of which epoch come next)."""
    epoch, offset = divmod(consumed * batch_size * world_size, n_windows)
    return {"global_batches": consumed, "epoch": epoch, "window_offset": offset,
            "windows_per_global_batch": batch_size * world_size}


def _epoch_indices(n: int, seed: int, first_epoch: int = 0) -> Iterator[int]:
    for epoch in itertools.count(first_epoch):
        # seed * a large prime + epoch: seed s's epoch 1 is not seed s+1's epoch 0.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        yield from torch.randperm(n, generator=gen).tolist()


def _batched(items: Iterable[int], size: int) -> Iterator[list[int]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
