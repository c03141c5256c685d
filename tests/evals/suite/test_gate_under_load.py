"""The regression gate passes an unchanged commit even when another CPU-heavy process runs
beside the second run: training speed is judged as a ratio to vanilla measured
interleaved (the suite's [speed] phase), so load slows every model alike."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from evals.perf.train_speed import paired_speed_ratio
from evals.suite.record import SPEED_FILE
from evals.suite.runner import run_suite
from evals.suite.spec import parse_suite
from reports.gate import check_run, write_baseline
from tests.conftest import MICRO_SUITE

SPEED = """
[speed]
rounds = 3
steps_per_round = 3
warmup_steps = 1
"""


@pytest.mark.slow
def test_gate_passes_an_unchanged_commit_beside_a_cpu_hog(tmp_path):
    suite = parse_suite(MICRO_SUITE + SPEED, "micro-speed.toml")
    cache = tmp_path / "cache"
    quiet_dir, _, failed = run_suite(suite, tmp_path / "runs", cache_dir=cache)
    assert failed == []
    baseline = tmp_path / "baseline.json"
    write_baseline(quiet_dir, baseline)

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy_dir, records, failed = run_suite(suite, tmp_path / "runs", cache_dir=cache)
        assert hog.poll() is None, "the CPU hog must run during the whole second run"
    finally:
        hog.kill()
        hog.wait()
    assert failed == []
    assert all(r["metrics"]["speed"]["reference"] == "vanilla-1024T-s0" for r in records)
    # The interleaved measurement records the load it ran under (what the gate judges by).
    phase_load = json.loads((busy_dir / SPEED_FILE).read_text())["load"]
    assert phase_load["wall_s"] > 0 and phase_load["threads"] >= 1
    assert isinstance(phase_load["contended"], bool)
    assert all(r["metrics"]["speed"]["load"] == phase_load for r in records)
    # Each record's ratio is the one speed.json's rounds give, paired by round.
    rounds = {k: v["round_s"] for k, v in
              json.loads((busy_dir / SPEED_FILE).read_text())["rows"].items()}
    for r in records:
        assert r["metrics"]["speed"]["rel_tokens_per_s"] == pytest.approx(
            paired_speed_ratio(rounds["vanilla-1024T-s0"], rounds[r["run_id"]]))

    result = check_run(busy_dir, baseline)
    bad = [r for r in result["rows"] if r["verdict"] in ("regression", "missing", "failed")]
    assert result["passed"], bad
    # The interleaved speed ratio was actually judged (not skipped as missing or new).
    speed_rows = [r for r in result["rows"] if "speed" in r["metric"]]
    assert speed_rows and all(r["verdict"] in ("ok", "improved") for r in speed_rows), \
        speed_rows
