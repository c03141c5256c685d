"""Tests for the data pipeline: synthetic corpus, tokenizers, loading, splitting, packing."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch

from evals.data.corpus import (
    DataSpec,
    iterate_batches,
    load_documents,
    pack_documents,
    prepare_data,
    split_documents,
)
from evals.data.synthetic import DIFFICULTY_CLASSES, Document, generate_documents
from evals.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    HFTokenizer,
    build_tokenizer,
    corpus_fingerprint,
    tokenizer_from_spec,
    tokenizer_to_spec,
)
from mor.errors import DataError

REAL_CORPUS = Path(__file__).resolve().parents[4] / "shared/data/corpus/prose_en.jsonl.gz"
HAS_DATASETS = importlib.util.find_spec("datasets") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
CLASS = {name: i for i, name in enumerate(DIFFICULTY_CLASSES)}


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return generate_documents(60, seed=0)


@pytest.fixture(scope="module")
def bpe(docs: list[Document], tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    return BPETokenizer.train_or_load(docs, 400, tmp_path_factory.mktemp("bpe"))


def _doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, text, "test")


def _write_jsonl(path: Path, records: list[dict], compress: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")


# --- synthetic corpus ------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    a, b = generate_documents(30, seed=1), generate_documents(30, seed=1)
    assert a == b
    other = generate_documents(30, seed=2)
    assert [d.text for d in a] != [d.text for d in other]
    assert len({d.id for d in a}) == 30
    # Documents depend only on (seed, index): a shorter corpus is a prefix of a longer one.
    assert generate_documents(10, seed=1) == a[:10]


def test_synthetic_documents_are_ascii_with_aligned_classes(docs: list[Document]) -> None:
    for doc in docs:
        assert doc.text.isascii()
        assert doc.char_classes is not None and len(doc.char_classes) == len(doc.text)
        assert 300 <= len(doc.text) <= 1500
        assert max(doc.char_classes) < len(DIFFICULTY_CLASSES)
    all_classes = set(b"".join(d.char_classes for d in docs))
    assert all_classes == set(range(len(DIFFICULTY_CLASSES)))


def test_synthetic_answers_are_correct_and_classed(docs: list[Document]) -> None:
    """Every arithmetic answer is right and exactly its digits carry the 'arithmetic' class."""
    checked = 0
    for doc in docs:
        for m in re.finditer(r"(\d+) ([-+*]) (\d+) = (\d+)\.", doc.text):
            a, op, b, answer = int(m[1]), m[2], int(m[3]), m[4]
            assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert set(doc.char_classes[m.start(4) : m.end(4)]) == {CLASS["arithmetic"]}
            assert set(doc.char_classes[m.start(1) : m.end(3)]) == {CLASS["structure"]}
            checked += 1
        for m in re.finditer(r"k(\d+)\? (\d+)\.", doc.text):
            # The queried key's value was given earlier in the same document.
            assert re.search(rf"\bk{m[1]}={m[2]}\b", doc.text[: m.start()])
            assert set(doc.char_classes[m.start(2) : m.end(2)]) == {CLASS["recall"]}
    assert checked > 10


def test_synthetic_tracking_answers_are_correct(docs: list[Document]) -> None:
    """Replaying the variable assignments in order reproduces every tracking answer."""
    statement = re.compile(r"\b([a-z])=([a-z]|\d+)(?:([+-])(\d+))?\.|\b([a-z])\? (\d+)\.")
    env: dict[str, int] = {}
    queries = 0
    for doc in docs:
        for m in statement.finditer(doc.text):
            if m[1]:
                value = env[m[2]] if m[2].isalpha() else int(m[2])
                if m[3]:
                    value += int(m[4]) if m[3] == "+" else -int(m[4])
                env[m[1]] = value
            else:
                assert env[m[5]] == int(m[6])
                assert set(doc.char_classes[m.start(6) : m.end(6)]) == {CLASS["tracking"]}
                queries += 1
    assert queries > 10


def test_synthetic_generation_is_fast_enough() -> None:
    import time

    start = time.perf_counter()
    assert len(generate_documents(4000, seed=3)) == 4000
    assert time.perf_counter() - start < 2.0


# --- splitting -------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_complete_and_order_independent() -> None:
    many = generate_documents(400, seed=5)
    train, val = split_documents(many, 0.1)
    assert split_documents(many, 0.1) == (train, val)
    train_ids, val_ids = {d.id for d in train}, {d.id for d in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {d.id for d in many}
    assert 10 < len(val) < 80  # about 10% of 400
    shuffled = list(many)
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.1)
    assert {d.id for d in val2} == val_ids and {d.id for d in train2} == train_ids
    # A different salt gives a different split.
    assert {d.id for d in split_documents(many, 0.1, salt="other")[1]} != val_ids


def test_split_tiny_corpus_still_has_validation() -> None:
    pair = [_doc("a", "x"), _doc("b", "y")]
    train, val = split_documents(pair, 0.0)
    assert len(train) == 1 and len(val) == 1
    assert split_documents([_doc("a", "x")], 0.0) == ([_doc("a", "x")], [])
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(pair, 1.5)


# --- packing ---------------------------------------------------------------------------------


def test_pack_shapes_eos_placement_and_remainder() -> None:
    tok = ByteTokenizer()
    docs = [_doc("a", "abc"), _doc("b", "de"), _doc("c", "fghij")]
    packed = pack_documents(docs, tok, seq_len=3)
    # Stream: a b c EOS d e EOS f g h i j EOS -> 13 tokens -> 3 windows of 4; the final EOS
    # is the dropped remainder.
    assert packed.n_tokens == 13
    assert packed.n_bytes == 10
    assert packed.windows.dtype == torch.long and packed.windows.shape == (3, 4)
    flat = packed.windows.flatten().tolist()
    assert flat == [*b"abc", 256, *b"de", 256, *b"fghij"]
    assert packed.windows[1].tolist() == [*b"de", 256, ord("f")]  # windows cross doc borders
    assert packed.classes is None  # real text has no difficulty classes


def test_pack_too_few_tokens_raises() -> None:
    with pytest.raises(DataError, match=r"only 4 tokens.*smaller --seq-len"):
        pack_documents([_doc("a", "abc")], ByteTokenizer(), seq_len=8)


def test_pack_non_ascii_bytes_and_classes() -> None:
    text = "h\u00e9!"  # 'é' is two UTF-8 bytes
    doc = Document("u", text, "test", bytes([0, 3, 1]))
    packed = pack_documents([doc, doc], ByteTokenizer(), seq_len=4)
    assert packed.windows[0].tolist() == [*text.encode(), 256]
    assert packed.classes[0].tolist() == [0, 3, 3, 1, 0]


def test_byte_classes_aligned_with_tokens(docs: list[Document]) -> None:
    tok = ByteTokenizer()
    packed = pack_documents(docs[:5], tok, seq_len=63)
    assert packed.classes is not None and packed.classes.dtype == torch.uint8
    assert packed.classes.shape == packed.windows.shape
    flat_tokens = packed.windows.flatten()
    flat_classes = packed.classes.flatten()
    assert (flat_classes[flat_tokens == tok.eos_id] == 0).all()
    expected = b"\x00".join(d.char_classes for d in docs[:5])
    assert flat_classes.tolist() == list(expected[: len(flat_classes)])


def test_bpe_classes_are_max_over_covered_chars(docs: list[Document], bpe: BPETokenizer) -> None:
    doc = docs[0]
    ids, classes = bpe.encode_with_classes(doc.text, doc.char_classes)
    assert ids == bpe.encode(doc.text) and len(classes) == len(ids)
    # Walk the tokens' decoded text to recover each token's character span.
    pos = 0
    for token, cls in zip(ids, classes, strict=True):
        piece = bpe.decode([token])
        assert doc.text.startswith(piece, pos)
        assert cls == max(doc.char_classes[pos : pos + len(piece)])
        pos += len(piece)
    assert pos == len(doc.text)
    assert {CLASS["filler"], CLASS["structure"]} <= set(classes)
    packed = pack_documents(docs[:3], bpe, seq_len=31)
    first_len = len(bpe.encode(docs[0].text))
    assert packed.windows.flatten()[first_len] == bpe.eos_id
    assert packed.classes.flatten()[:first_len].tolist() == classes[:first_len]


# --- tokenizers ------------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip() -> None:
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "bytes")
    text = "Hello, w\u00f6rld \u65e5\u672c"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.decode([*b"ab", 256, *b"c"]) == "ab<|endoftext|>c"


def test_bpe_cache_roundtrip(docs: list[Document], tmp_path: Path) -> None:
    first = BPETokenizer.train_or_load(docs, 350, tmp_path)
    assert not first.loaded_from_cache
    cached = tmp_path / f"bpe-350-{corpus_fingerprint(docs)}.json"
    assert cached.is_file()
    second = BPETokenizer.train_or_load(docs, 350, tmp_path)
    assert second.loaded_from_cache and second.name == first.name
    assert second.encode(docs[1].text) == first.encode(docs[1].text)
    assert first.decode(first.encode(docs[1].text)) == docs[1].text
    assert first.vocab_size <= 350 and first.decode([first.eos_id]) == "<|endoftext|>"
    third = BPETokenizer.train_or_load(docs, 380, tmp_path)
    assert not third.loaded_from_cache
    assert (tmp_path / f"bpe-380-{corpus_fingerprint(docs)}.json").is_file()
    assert BPETokenizer.from_file(cached).name == first.name


def test_corpus_fingerprint_depends_on_ids_and_texts() -> None:
    base = corpus_fingerprint([_doc("a", "xy")])
    assert len(base) == 16 and base == corpus_fingerprint([_doc("a", "xy")])
    assert base != corpus_fingerprint([_doc("b", "xy")])
    assert base != corpus_fingerprint([_doc("a", "xz")])
    assert base != corpus_fingerprint([_doc("ax", "y")])


def test_tokenizer_spec_roundtrip(docs: list[Document], bpe: BPETokenizer) -> None:
    for tok in (ByteTokenizer(), bpe):
        spec = json.loads(json.dumps(tokenizer_to_spec(tok)))
        restored = tokenizer_from_spec(spec)
        assert type(restored) is type(tok)
        assert (restored.name, restored.vocab_size, restored.eos_id) == (
            tok.name,
            tok.vocab_size,
            tok.eos_id,
        )
        assert restored.encode(docs[2].text) == tok.encode(docs[2].text)
    with pytest.raises(DataError, match="invalid saved tokenizer spec"):
        tokenizer_from_spec({"kind": "sentencepiece"})


def test_build_tokenizer_specs(docs: list[Document], tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("bytes", docs, tmp_path), ByteTokenizer)
    assert isinstance(build_tokenizer("bpe:300", docs, tmp_path), BPETokenizer)
    for bad in ("gpt2", "bpe:lots", "bpe:", "hf:", ""):
        with pytest.raises(DataError, match=r"tokenizer spec '.*'.*bpe:8192"):
            build_tokenizer(bad, docs, tmp_path)
    with pytest.raises(DataError, match="too small"):
        build_tokenizer("bpe:100", docs, tmp_path)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_hf_tokenizer_from_local_directory(bpe: BPETokenizer, docs, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    # Save our BPE as a Hugging Face tokenizer directory so the test needs no network.
    raw = tmp_path / "raw.json"
    raw.write_text(bpe.to_json(), encoding="utf-8")
    fast = PreTrainedTokenizerFast(tokenizer_file=str(raw), eos_token="<|endoftext|>")
    fast.save_pretrained(tmp_path)
    tok = build_tokenizer(f"hf:{tmp_path}", [], tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (bpe.vocab_size, bpe.eos_id)
    doc = docs[3]
    assert tok.encode_with_classes(doc.text, doc.char_classes) == bpe.encode_with_classes(
        doc.text, doc.char_classes
    )
    assert tokenizer_to_spec(tok) == {"kind": "hf", "name": str(tmp_path)}
    with pytest.raises(DataError, match="cannot load tokenizer"):
        HFTokenizer(str(tmp_path / "missing"))


# --- loading ---------------------------------------------------------------------------------


def test_load_synthetic_forms() -> None:
    assert len(load_documents("synthetic", synthetic_docs=7)) == 7
    assert len(load_documents("synthetic:5", seed=2)) == 5
    assert len(load_documents("synthetic:50", max_docs=3)) == 3
    assert load_documents("synthetic:4", seed=9) == generate_documents(4, seed=9)
    with pytest.raises(DataError, match="synthetic:N"):
        load_documents("synthetic:zero")


def test_load_txt_file(tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    (doc,) = load_documents(str(path))
    assert doc.id == "story.txt" and doc.text.startswith("First") and doc.char_classes is None


def test_load_large_txt_is_chunked_on_blank_lines(tmp_path: Path) -> None:
    paragraph = "word " * 2000  # ~10 KB
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join([paragraph] * 120), encoding="utf-8")  # ~1.2 MB
    docs = load_documents(str(path))
    assert 8 <= len(docs) <= 14
    assert len({d.id for d in docs}) == len(docs)
    assert sum(len(d.text) for d in docs) + 2 * (len(docs) - 1) == len(path.read_text())


def test_load_jsonl_and_gz(tmp_path: Path) -> None:
    records = [{"text": "alpha", "id": "doc-1", "source": "wiki"}, {"text": "beta"}]
    _write_jsonl(tmp_path / "c.jsonl", records)
    _write_jsonl(tmp_path / "c.jsonl.gz", records, compress=True)
    for name in ("c.jsonl", "c.jsonl.gz"):
        docs = load_documents(str(tmp_path / name))
        assert [d.text for d in docs] == ["alpha", "beta"]
        assert docs[0].id == "doc-1" and docs[0].source == "wiki"
        assert docs[1].id == f"{name}:2" and docs[1].source == name
    assert len(load_documents(str(tmp_path / "c.jsonl"), max_docs=1)) == 1


def test_load_jsonl_line_without_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"text": "ok"}, {"body": "no text here"}])
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2: missing string field 'text'"):
        load_documents(str(path))


def test_load_directory_and_glob(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("sub bee", encoding="utf-8")
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "ay"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    docs = load_documents(str(tmp_path))
    assert [d.text for d in docs] == ["ay", "bee", "sub bee"]
    assert [d.id for d in docs] == ["a.jsonl:1", "b.txt", "sub/b.txt"]
    globbed = load_documents(str(tmp_path / "*.txt"))
    assert [d.text for d in globbed] == ["bee"]
    recursive = load_documents(str(tmp_path / "**" / "*.txt"))
    assert [d.text for d in recursive] == ["bee", "sub bee"]


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"corpus path '.*nope' does not exist; pass --corpus"):
        load_documents(str(tmp_path / "nope"))
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="contains no documents"):
        load_documents(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="matches no"):
        load_documents(str(tmp_path / "*.txt"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz' cannot be read"):
        load_documents(str(tmp_path / "broken.jsonl.gz"))


@pytest.mark.skipif(not HAS_DATASETS, reason="the datasets package is not installed")
def test_load_hf_local_directory(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "data.jsonl", [{"text": f"row {i}"} for i in range(5)])
    docs = load_documents(f"hf:{tmp_path}", max_docs=3)
    assert [d.text for d in docs] == ["row 0", "row 1", "row 2"]
    assert len({d.id for d in docs}) == 3
    with pytest.raises(DataError, match="cannot load corpus"):
        load_documents(f"hf:{tmp_path}@nosuchsplit")


@pytest.mark.skipif(not REAL_CORPUS.is_file(), reason=f"real corpus not present at {REAL_CORPUS}")
def test_real_corpus_prepares(tmp_path: Path) -> None:
    docs = load_documents(str(REAL_CORPUS), max_docs=200)
    assert len(docs) == 200 and len({d.id for d in docs}) == 200
    assert all(d.text and d.char_classes is None for d in docs)
    train, val = split_documents(docs)
    assert val and train
    packed = pack_documents(val, ByteTokenizer(), seq_len=256)
    assert packed.classes is None and packed.windows.shape[1] == 257
    assert packed.n_bytes == sum(len(d.text.encode()) for d in val)


# --- prepared data and batches ---------------------------------------------------------------


def test_prepare_data_synthetic(tmp_path: Path) -> None:
    spec = DataSpec(corpus="synthetic:80", tokenizer="bytes", seq_len=64, val_fraction=0.1)
    data = prepare_data(spec, tmp_path)
    assert data.n_train_docs + data.n_val_docs == 80 and data.n_val_docs > 0
    assert data.train.windows.shape[1] == 65 and data.val.windows.shape[1] == 65
    assert data.train.classes is not None
    assert data.fingerprint == corpus_fingerprint(generate_documents(80))
    assert prepare_data(spec, tmp_path).train.windows.equal(data.train.windows)


def test_iterate_batches_deterministic() -> None:
    windows = torch.arange(10 * 5).reshape(10, 5)
    first = iterate_batches(windows, 4, seed=7)
    batches = [next(first) for _ in range(6)]  # 24 rows: spans 3 epochs
    again = iterate_batches(windows, 4, seed=7)
    for x, y in batches:
        x2, y2 = next(again)
        assert x.equal(x2) and y.equal(y2)
        assert x.shape == (4, 4) and y.shape == (4, 4)
        assert x[:, 1:].equal(y[:, :-1])
    rows = torch.cat([x[:, 0] // 5 for x, _ in batches]).tolist()
    assert sorted(rows[:10]) == list(range(10))  # first epoch is a permutation
    assert sorted(rows[10:20]) == list(range(10))
    gen = torch.Generator().manual_seed(7 * 1_000_003)
    assert rows[:10] == torch.randperm(10, generator=gen).tolist()
    other = next(iterate_batches(windows, 4, seed=8))[0]
    assert not other.equal(batches[0][0])
    # Seeds are independent streams: seed 8's first epoch is not seed 7's second epoch.
    seed8 = iterate_batches(windows, 10, seed=8)
    assert next(seed8)[0][:, 0].tolist() != rows[10:20]
