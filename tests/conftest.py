"""Shared fixtures for the training, CLI and report tests.

Everything here is small enough for 2 CPU cores: the `micro` preset, 32-token windows and a
synthetic corpus of a couple of hundred documents (bytes tokenizer, nothing downloaded).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from evals.data.corpus import DataSpec, PreparedData, prepare_data

SEQ_LEN = 32
SYNTHETIC_DOCS = 200

# A two-model CPU suite (vanilla vs MoR N_r=2) that trains in a few seconds. Tests append or
# substitute lines to make variants (bad inputs, tiny budgets).
MICRO_SUITE = textwrap.dedent(f"""\
    name = "micro"
    description = "test suite: micro preset, a few steps"
    seeds = [0]

    [data]
    corpus = "synthetic"
    tokenizer = "bytes"
    seq_len = {SEQ_LEN}
    synthetic_docs = {SYNTHETIC_DOCS}
    val_windows = 8

    [budget]
    tokens = [1024]

    [train]
    batch_size = 4
    lr = 3e-3
    log_every = 2
    threads = 1

    [defaults]
    preset = "micro"

    [[models]]
    name = "vanilla"
    family = "vanilla"

    [[models]]
    name = "mor-2"
    family = "mor"
    num_recursions = 2
    """)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """The synthetic corpus, bytes tokenizer, packed into 32-token windows."""
    spec = DataSpec(corpus="synthetic", tokenizer="bytes", seq_len=SEQ_LEN,
                    synthetic_docs=SYNTHETIC_DOCS, seed=0)
    return prepare_data(spec, tmp_path_factory.mktemp("data-cache"))


@pytest.fixture
def write_suite(tmp_path: Path) -> Callable[..., Path]:
    """write_suite(text=MICRO_SUITE, name="suite.toml", replace={old: new}) -> path."""

    def write(text: str = MICRO_SUITE, name: str = "suite.toml",
              replace: dict[str, str] | None = None) -> Path:
        for old, new in (replace or {}).items():
            assert old in text, f"test bug: {old!r} is not in the suite text"
            text = text.replace(old, new, 1)
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="session")
def micro_suite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MICRO_SUITE written once per session (for module-scoped fixtures that train it)."""
    path = tmp_path_factory.mktemp("micro-suite") / "suite.toml"
    path.write_text(MICRO_SUITE)
    return path


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: fp32 reductions happen in one fixed order, and
    tiny ops on 2 busy cores are far faster than with OpenMP spinning over more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
