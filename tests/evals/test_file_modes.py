"""Files mor-bench writes through a temporary file and a rename (records, plans, the BPE
tokenizer cache) get the mode an ordinary `open()` gives under the umask -- not mkstemp's
0600, which made some outputs of a run unreadable to the group while others were not."""

from __future__ import annotations

import os
import stat

import pytest

from evals.data.synthetic import generate_documents
from evals.data.tokenizer import BPETokenizer
from evals.suite.record import file_mode, write_json_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_json_records_get_the_umask_mode(tmp_path, umask_022):
    write_json_atomic(tmp_path / "record.json", {"a": 1})
    (tmp_path / "plain.txt").write_text("x")  # what open() gives
    assert _mode(tmp_path / "record.json") == _mode(tmp_path / "plain.txt") == 0o644
    os.umask(0o077)
    assert file_mode() == 0o600
    write_json_atomic(tmp_path / "private.json", {"a": 1})
    assert _mode(tmp_path / "private.json") == 0o600


def test_cached_tokenizer_gets_the_umask_mode(tmp_path, umask_022):
    docs = generate_documents(40, seed=0)
    BPETokenizer.train_or_load(docs, 300, tmp_path)
    (path,) = tmp_path.glob("bpe-300-*.json")
    assert _mode(path) == 0o644
