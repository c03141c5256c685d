"""The paper suites' data path on local data, with the Hub off: FineWeb-Edu streamed through
`datasets` (`hf:DATASET:CONFIG` corpora) and the SmolLM tokenizer loaded by name or path
through `transformers.AutoTokenizer` (`hf:NAME_OR_PATH` tokenizers).

Nothing here touches the network: the dataset is a local directory laid out like the
FineWeb-Edu repository (parquet shards, configs declared in its README), the tokenizer a
small BPE saved as a Hugging Face tokenizer, and loading it by its Hub name goes through a
Hugging Face cache directory built in the test (in a subprocess with HF_HUB_OFFLINE=1 and
HF_HOME pointing there, since both are read when the libraries are imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from evals.data.corpus import (  # noqa: E402
    DataSpec,
    load_documents,
    prepare_data,
    split_documents,
)
from evals.data.tokenizer import (  # noqa: E402
    EOS_TOKEN,
    HFTokenizer,
    build_tokenizer,
    tokenizer_from_spec,
    tokenizer_to_spec,
)
from evals.suite.spec import load_suite  # noqa: E402
from mor.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash for the fake cache
# FineWeb-Edu's dataset card declares its configs like this (data_files per config).
FINEWEB_README = textwrap.dedent("""\
    ---
    configs:
    - config_name: default
      data_files:
      - split: train
        path: data/*/*
    - config_name: sample-10BT
      data_files:
      - split: train
        path: sample/10BT/*
    ---
    # A local mirror laid out like HuggingFaceFW/fineweb-edu
    """)
WORDS = ["the", "cell", "divides", "and", "each", "daughter", "cell", "grows", "before", "it",
         "divides", "again", "while", "photosynthesis", "turns", "light", "water", "and",
         "carbon", "dioxide", "into", "sugar", "and", "oxygen"]


def _row(i: int) -> dict:
    text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(20 + i % 17)) + f" ({i})."
    return {"text": text, "id": f"<urn:uuid:{i:08x}-fw>", "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{i}", "score": 3.0 + (i % 5) / 10}


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory) -> Path:
    """A FineWeb-Edu-shaped directory: sample-10BT in two parquet shards of 60 rows, and a
    different 'default' config."""
    root = tmp_path_factory.mktemp("fineweb-edu")
    (root / "README.md").write_text(FINEWEB_README)
    shards = root / "sample" / "10BT"
    shards.mkdir(parents=True)
    rows = [_row(i) for i in range(120)]
    pq.write_table(pa.Table.from_pylist(rows[:60]), shards / "000_00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[60:]), shards / "001_00000.parquet")
    dump = root / "data" / "CC-MAIN-2024-10"
    dump.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{**_row(0), "text": "only in default",
                                          "id": "default-0"}]), dump / "000_00000.parquet")
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE with the SmolLM tokenizer's EOS, saved as a Hugging Face tokenizer
    (tokenizer.json + tokenizer_config.json) plus a model config.json, as the SmolLM repos
    hold them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator([_row(i)["text"] for i in range(200)], trainer)
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS_TOKEN).save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "vocab_size": tk.get_vocab_size()}))
    return out


@pytest.fixture
def hub_off(monkeypatch):
    """The Hub switched off for this process's libraries too (they read the variables at
    import, so set the constants they hold)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# --- FineWeb-Edu through `datasets` streaming ---------------------------------------------


def test_config_and_split_select_the_fineweb_shards(hub_off, fineweb: Path):
    docs = load_documents(f"hf:{fineweb}:sample-10BT", max_docs=100)
    assert len(docs) == 100
    expect = [_row(i) for i in range(100)]  # shard order, then row order
    assert [d.text for d in docs] == [r["text"] for r in expect]
    assert [d.id for d in docs] == [r["id"] for r in expect]  # FineWeb-Edu's own ids
    assert {d.source for d in docs} == {f"{fineweb}:sample-10BT"}
    # The explicit split, and the other config, go through the same path.
    assert load_documents(f"hf:{fineweb}:sample-10BT@train", max_docs=3)[2].text == \
        expect[2]["text"]
    assert [d.text for d in load_documents(f"hf:{fineweb}", max_docs=5)] == ["only in default"]


def test_downloaded_shard_folder_streams_the_same_documents(hub_off, fineweb: Path):
    """What `hf download ... --include "sample/10BT/*"` leaves on disk, named as a folder
    (docs/cluster.md): the same documents as the config of the full mirror."""
    by_config = load_documents(f"hf:{fineweb}:sample-10BT", max_docs=80)
    by_folder = load_documents(f"hf:{fineweb / 'sample' / '10BT'}", max_docs=80)
    assert [(d.id, d.text) for d in by_folder] == [(d.id, d.text) for d in by_config]


def test_streaming_reads_only_the_shards_it_needs(hub_off, fineweb: Path, tmp_path: Path):
    """A corrupt second shard is never opened while max_docs fits in the first: the rows
    are streamed, not downloaded or prepared as a whole."""
    broken = tmp_path / "fineweb-broken"
    (broken / "sample" / "10BT").mkdir(parents=True)
    (broken / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (broken / "README.md").write_text(FINEWEB_README)
    for f in (fineweb / "data" / "CC-MAIN-2024-10").iterdir():
        (broken / "data" / "CC-MAIN-2024-10" / f.name).write_bytes(f.read_bytes())
    src = fineweb / "sample" / "10BT" / "000_00000.parquet"
    (broken / "sample" / "10BT" / "000_00000.parquet").write_bytes(src.read_bytes())
    (broken / "sample" / "10BT" / "001_00000.parquet").write_bytes(b"not parquet")
    docs = load_documents(f"hf:{broken}:sample-10BT", max_docs=60)
    assert [d.id for d in docs] == [_row(i)["id"] for i in range(60)]
    with pytest.raises(DataError, match="cannot load corpus"):
        load_documents(f"hf:{broken}:sample-10BT", max_docs=61)


def test_unknown_config_and_missing_text_column_fail_clearly(hub_off, fineweb: Path,
                                                             tmp_path: Path):
    with pytest.raises(DataError, match="sample-350BT"):
        load_documents(f"hf:{fineweb}:sample-350BT", max_docs=1)
    no_text = tmp_path / "no-text"
    no_text.mkdir()
    pq.write_table(pa.Table.from_pylist([{"content": "x", "id": "a"}]),
                   no_text / "000.parquet")
    with pytest.raises(DataError, match="no string 'text' column"):
        load_documents(f"hf:{no_text}", max_docs=1)


# --- the SmolLM tokenizer by path and by name ------------------------------------------------


def test_tokenizer_from_a_local_directory(hub_off, tokenizer_dir: Path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(f"hf:{tokenizer_dir}", [], tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    ref = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == ref.convert_tokens_to_ids(EOS_TOKEN)
    text = _row(7)["text"]
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode())  # merges were learnt: not a byte tokenizer
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "cell"]) == [ids, tok.encode("cell")]
    again = tokenizer_from_spec(tokenizer_to_spec(tok))  # how a checkpoint reloads it
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def _fake_hub_cache(home: Path, repo: str, files_from: Path) -> None:
    """The layout huggingface_hub gives a downloaded model repo under HF_HOME."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(SNAPSHOT)


def _offline_python(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=240)


def test_tokenizer_by_hub_name_from_the_cache_offline(tokenizer_dir: Path, tmp_path: Path):
    """The paper suites' own spec, hf:HuggingFaceTB/SmolLM-135M, resolved from a Hugging
    Face cache with the Hub off (what compute nodes without network do); a name that is not
    in the cache fails with the command that fixes it."""
    spec = load_suite("paper-isoflop").data.tokenizer
    assert spec == "hf:HuggingFaceTB/SmolLM-135M"
    home = tmp_path / "hf-home"
    _fake_hub_cache(home, spec[3:], tokenizer_dir)
    code = textwrap.dedent(f"""\
        import json
        from evals.data.tokenizer import build_tokenizer
        from mor.errors import DataError
        tok = build_tokenizer({spec!r}, [], None)
        out = {{"name": tok.name, "vocab": tok.vocab_size, "eos": tok.eos_id,
                "ids": tok.encode({_row(3)["text"]!r})}}
        try:
            build_tokenizer("hf:HuggingFaceTB/SmolLM-360M", [], None)
        except DataError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
        """)
    proc = _offline_python(code, home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    local = build_tokenizer(f"hf:{tokenizer_dir}", [], tokenizer_dir)
    assert got["name"] == spec
    assert (got["vocab"], got["eos"]) == (local.vocab_size, local.eos_id)
    assert got["ids"] == local.encode(_row(3)["text"])
    assert "HF_HUB_OFFLINE" in got["missing"]
    assert "hf download HuggingFaceTB/SmolLM-360M" in got["missing"]


# --- the whole data path of a paper suite ----------------------------------------------------


def test_paper_suite_data_path_on_local_mirrors(hub_off, fineweb: Path, tokenizer_dir: Path,
                                                tmp_path: Path):
    """prepare_data with the paper suite's data settings, the corpus and tokenizer swapped
    for the local mirrors (as `--corpus` and a local tokenizer directory would): documents
    streamed, split, tokenized with the Hugging Face tokenizer and packed with EOS."""
    paper = load_suite("paper-isoflop").data
    spec = DataSpec(corpus=f"hf:{fineweb}:sample-10BT", tokenizer=f"hf:{tokenizer_dir}",
                    seq_len=32, val_fraction=paper.val_fraction, max_docs=120)
    prepared = prepare_data(spec, tmp_path / "cache")
    tok = prepared.tokenizer
    assert isinstance(tok, HFTokenizer)
    assert prepared.n_train_docs + prepared.n_val_docs == 120
    assert prepared.n_val_docs >= 1
    assert prepared.train.windows.shape[1] == 33
    stream = prepared.train.windows.flatten().tolist()
    assert max(stream) < tok.vocab_size
    # The training stream is the training documents, in order, each followed by EOS.
    train, _ = split_documents(load_documents(spec.corpus, max_docs=120), spec.val_fraction)
    assert len(train) == prepared.n_train_docs
    expect = [t for d in train for t in [*tok.encode(d.text), tok.eos_id]]
    assert prepared.train.n_tokens == len(expect)
    assert stream == expect[: len(stream)]
    assert len(expect) - len(stream) < 33  # only the tail short of a window is dropped
