"""A suite killed by a real signal resumes to exactly the uninterrupted result (CPU,
bitwise): kill -9 between runs and inside one, SIGTERM (exit 0, resumable), a changed suite
refused, a diverging run recorded with its diagnostics (docs/distributed.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SUITE = """\
name = "resume"
seeds = [0]

[data]
corpus = "synthetic"
tokenizer = "bytes"
seq_len = 32
synthetic_docs = 300
val_windows = 4

[budget]
tokens = [3840]   # 30 steps of 4 x 32 tokens

[train]
batch_size = 4
lr = 3e-3
log_every = 3
threads = 1
checkpoint_every = 4
tensorboard = false

[defaults]
preset = "micro"
max_seq_len = 32

[[models]]
name = "vanilla"
family = "vanilla"

[[models]]
name = "mor-expert-warmup"
family = "mor"
num_recursions = 3
capacity_warmup_steps = 10

[[models]]
name = "mor-token-lossfree"
family = "mor"
num_recursions = 3
router = "token"
balancing = "loss_free"
bias_update_rate = 0.02
"""
RUNS = ["vanilla-3840T-s0", "mor-expert-warmup-3840T-s0", "mor-token-lossfree-3840T-s0"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evals.cli.main", *args]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MOR_BENCH_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def _only_run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _start(tmp: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cli("run", str(tmp / "suite.toml"), "--out", str(out), *extra),
                            env=_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill point: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("kill point not reached")
        time.sleep(0.05)


def _checkpoints(run_dir: Path | None, run_id: str) -> list[str]:
    root = run_dir / run_id / "checkpoints" if run_dir else None
    return sorted(p.name for p in root.iterdir()) if root and root.is_dir() else []


def _records(run_dir: Path) -> dict[str, dict]:
    return {r: json.loads((run_dir / r / "record.json").read_text()) for r in RUNS}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    (tmp / "suite.toml").write_text(SUITE)
    done = subprocess.run(_cli("run", str(tmp / "suite.toml"), "--out", str(tmp / "out")),
                          env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return _only_run_dir(tmp / "out")


def _assert_same(got_dir: Path, ref_dir: Path) -> None:
    got, ref = _records(got_dir), _records(ref_dir)
    for run_id in RUNS:
        g, r = got[run_id], ref[run_id]
        assert g["status"] == r["status"] == "ok", run_id
        assert g["metrics"]["final_train_loss"] == r["metrics"]["final_train_loss"], run_id
        assert [(p["step"], p["loss"]) for p in g["loss_curve"]] == [
            (p["step"], p["loss"]) for p in r["loss_curve"]], run_id
        assert g["metrics"]["val_nll"] == r["metrics"]["val_nll"], run_id
        assert g["metrics"]["routing"] == r["metrics"]["routing"], run_id
        wg = load_file(str(got_dir / run_id / "model.safetensors"))
        wr = load_file(str(ref_dir / run_id / "model.safetensors"))
        assert wg.keys() == wr.keys()
        for k in wr:
            assert (wg[k] == wr[k]).all(), (run_id, k)


def test_kill9_between_and_inside_runs_then_resume_equals_uninterrupted(uninterrupted,
                                                                       tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)
    out = tmp_path / "out"
    # 1. kill -9 (the whole process group, as a preempted node) once the first run is done.
    proc = _start(tmp_path, out)
    _wait_for(proc, lambda: out.is_dir() and any(out.glob(f"*/{RUNS[0]}/record.json")))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = _only_run_dir(out)
    # 2. resume; kill -9 again inside the last run, after its second checkpoint.
    proc = _start(tmp_path, out, "--resume", str(run_dir))
    _wait_for(proc, lambda: len(_checkpoints(run_dir, RUNS[2])) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / RUNS[2] / "record.json").is_file()
    # 3. resume to the end.
    done = subprocess.run(_cli("run", str(tmp_path / "suite.toml"), "--resume", str(run_dir)),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    _assert_same(run_dir, uninterrupted)
    rec = _records(run_dir)[RUNS[2]]
    assert rec["resumed"] and rec["resumed"][-1]["from_step"] >= 4  # (a .tmp save is skipped)
    assert rec["metrics"]["steps"] == 30


def test_sigterm_saves_exits_0_and_resumes(uninterrupted, tmp_path):
    (tmp_path / "suite.toml").write_text(SUITE)
    out = tmp_path / "out"
    proc = _start(tmp_path, out)
    # SIGTERM to the suite process alone once the second run trains (a checkpoint exists).
    _wait_for(proc, lambda: out.is_dir() and bool(
        _checkpoints(_only_run_dir(out), RUNS[1])))
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    run_dir = _only_run_dir(out)
    rec = json.loads((run_dir / RUNS[1] / "record.json").read_text())
    assert rec["status"] == "interrupted" and rec["interrupted_at_step"] >= 4
    assert f"step-{rec['interrupted_at_step']:08d}" in _checkpoints(run_dir, RUNS[1])
    from reports.table import render_report

    render_report(run_dir)  # the report of an interrupted suite says so
    assert "1 interrupted (continue with `mor-bench run SUITE --resume" in (
        run_dir / "report.md").read_text()
    done = subprocess.run(_cli("run", str(tmp_path / "suite.toml"), "--resume", str(run_dir)),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _assert_same(run_dir, uninterrupted)
    report = (run_dir / "report.md").read_text()
    assert f"resumed after an interruption: {RUNS[1]}" in report
    assert json.loads((run_dir / RUNS[1] / "record.json").read_text())["attempt"] == 1


def test_resume_refuses_a_changed_suite(uninterrupted, tmp_path):
    changed = tmp_path / "suite.toml"
    changed.write_text(SUITE.replace("lr = 3e-3", "lr = 1e-3").replace(
        "num_recursions = 3\ncapacity", "num_recursions = 2\ncapacity"))
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    done = subprocess.run(_cli("run", str(changed), "--resume", str(uninterrupted)),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("mor-bench: error: ") and "\n" not in err
    assert "train.lr" in err and "models[1].num_recursions" in err
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before


def test_nan_run_records_diagnostics_and_fails(tmp_path):
    suite = SUITE.replace("lr = 3e-3", "lr = 1e4\nweight_decay = 0.0\ngrad_clip = 1e9")
    suite = suite[: suite.index("[[models]]\nname = \"vanilla\"")] + suite[
        suite.index("[[models]]\nname = \"mor-expert-warmup\""):suite.index(
            "[[models]]\nname = \"mor-token")]
    (tmp_path / "suite.toml").write_text(suite)
    done = subprocess.run(_cli("run", str(tmp_path / "suite.toml"), "--out",
                               str(tmp_path / "out")),
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    rec = json.loads((_only_run_dir(tmp_path / "out") / RUNS[1] / "record.json").read_text())
    assert rec["status"] == "failed" and "TrainingDiverged" in rec["error"]
    d = rec["diagnostics"]
    assert d["last_finite_step"] == d["step"] - 1 and d["grad_norms"] and d["routing"]
