"""`torchrun --nproc-per-node 2 ... mor-bench run SUITE` on CPU (gloo): one process group
for the suite, rank 0 writes, and the losses equal a one-process run of the same global
batch (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SUITE = """\
name = "ddp"
seeds = [0]

[data]
corpus = "synthetic"
tokenizer = "bytes"
seq_len = 32
synthetic_docs = 300
val_windows = 4

[budget]
tokens = [2560]   # 10 steps of 8 sequences x 32 tokens

[train]
batch_size = 4
global_batch = 8  # grad_accum 2 on one process, 1 on two
lr = 3e-3
log_every = 1
threads = 1
{parallel}

[defaults]
preset = "micro"
max_seq_len = 32

[[models]]
name = "vanilla"
family = "vanilla"

[[models]]
name = "mor-2"
family = "mor"
num_recursions = 2
"""
RUNS = ["vanilla-2560T-s0", "mor-2-2560T-s0"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MOR_BENCH_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}


def _run(tmp: Path, nproc: int, parallel: str = "") -> Path:
    suite = tmp / "suite.toml"
    suite.write_text(SUITE.format(parallel=parallel))
    out = tmp / f"out-{nproc}"
    cli = ["-m", "evals.cli.main", "run", str(suite), "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", *cli]
    else:
        cmd = [sys.executable, *cli]
    done = subprocess.run(cmd, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    dirs = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(dirs) == 1
    return dirs[0]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("one"), 1)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one(one_process, tmp_path, parallel):
    two = _run(tmp_path, 2, f'parallel = "{parallel}"')
    for run_id in RUNS:
        a = json.loads((two / run_id / "record.json").read_text())
        b = json.loads((one_process / run_id / "record.json").read_text())
        assert a["status"] == b["status"] == "ok"
        assert a["distributed"] == {"world_size": 2, "parallel": parallel,
                                    "global_batch_sequences": 8}
        assert b["distributed"]["world_size"] == 1
        assert a["plan"]["world_size"] == 2 and a["train"]["grad_accum"] == 1
        assert b["train"]["grad_accum"] == 2
        assert a["plan"]["steps"] == b["plan"]["steps"] == 10
        la = [p["loss"] for p in a["loss_curve"]]
        lb = [p["loss"] for p in b["loss_curve"]]
        assert len(la) == len(lb) == 10
        assert max(abs(x - y) for x, y in zip(la, lb)) <= 1e-5, (la, lb)
        assert abs(a["metrics"]["val_nll"] - b["metrics"]["val_nll"]) <= 1e-4
        # TensorBoard event files from rank 0 only
        events = list((two / run_id / "tensorboard").glob("events.out.tfevents.*"))
        assert len(events) == 1
    assert (two / "report.md").is_file()  # rank 0 rendered the report
