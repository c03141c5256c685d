"""Tests for the regression gate (`reports.gate`, `mor-bench check`).

The run under test is a copy of the hand-made records of tests/fixtures/records/ (vanilla,
recursive-2 and mor-2 -- two seeds -- at 1e12 FLOPs, vanilla and mor-2 at 2e12, with
few-shot results), without their failed run unless a test wants it. Regressions are
planted by editing the copies.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from evals.cli.main import main
from evals.suite.spec import load_suite
from reports.gate import (
    DEFAULT_TOLERANCES,
    SCHEMA,
    check_run,
    judge,
    load_baseline,
    run_metrics,
    summary_line,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
FAILED_RUN = "mor-3-1e12F-s0"
MOR = "mor-2 @ 1e+12 flops"
SMOKE_BASELINE = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "smoke.json"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A copy of the fixture run without its failed run."""
    dst = tmp_path / "run"
    shutil.copytree(FIXTURES, dst)
    shutil.rmtree(dst / FAILED_RUN)
    return dst


@pytest.fixture
def baseline(run_dir: Path, tmp_path: Path, capsys) -> Path:
    path = tmp_path / "baselines" / "fixture.json"
    assert main(["check", str(run_dir), "--baseline", str(path), "--update"]) == 0
    assert "wrote baseline" in capsys.readouterr().out
    return path


def edit(run_dir: Path, run_id: str, change: Callable[[dict], None]) -> None:
    path = run_dir / run_id / "record.json"
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def check(capsys, run_dir: Path, baseline: Path, *extra: str) -> tuple[int, str, str]:
    rc = main(["check", str(run_dir), "--baseline", str(baseline), *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def result_rows(capsys, run_dir: Path, baseline: Path) -> tuple[int, dict]:
    rc, out, _ = check(capsys, run_dir, baseline, "--json")
    res = json.loads(out)
    return rc, {(r["model"], r["metric"]): r for r in res["rows"]}


# --------------------------------------------------------------------------------------------
# the baseline file


def test_update_writes_a_documented_baseline(run_dir, baseline):
    doc = json.loads(baseline.read_text())
    assert doc["schema"] == SCHEMA
    rec = json.loads((run_dir / "vanilla-1e12F-s0" / "record.json").read_text())
    assert doc["suite"]["sha256"] == rec["suite"]["sha256"]
    assert doc["suite"]["name"] == rec["suite"]["name"]
    assert doc["recorded"]["commit"] == rec["provenance"]["git"]["commit"]
    assert doc["recorded"]["hardware"]
    assert "--update" in doc["about"]
    # Every tolerance says what it means.
    for name, tol in doc["tolerances"].items():
        assert tol["doc"] and tol["direction"] in ("lower", "higher"), name
    assert doc["tolerances"]["val_nll"]["tol"] == 0.05
    assert doc["tolerances"]["speed_rel_tokens_per_s"]["tol"] == 0.25
    assert "rel_tokens_per_s" not in doc["tolerances"]  # sequential ratios are not judged
    # Models: one per (model, budget); seeds averaged; throughput as the interleaved ratio
    # to vanilla the records carry (metrics.speed), not recomputed from per-run tokens/s.
    assert set(doc["models"]) == {"vanilla @ 1e+12 flops", "vanilla @ 2e+12 flops", MOR,
                                  "mor-2 @ 2e+12 flops", "recursive-2"}
    mor = doc["models"][MOR]
    assert mor["seeds"] == [0, 1]
    vals = [json.loads((run_dir / f"mor-2-1e12F-s{s}" / "record.json").read_text())["metrics"]
            for s in (0, 1)]
    assert mor["metrics"]["val_nll"] == pytest.approx((vals[0]["val_nll"]
                                                       + vals[1]["val_nll"]) / 2)
    assert mor["metrics"]["speed_rel_tokens_per_s"] == pytest.approx(
        (vals[0]["speed"]["rel_tokens_per_s"] + vals[1]["speed"]["rel_tokens_per_s"]) / 2)
    sequential = (vals[0]["tokens_per_s"] + vals[1]["tokens_per_s"]) / 2 / rec["metrics"][
        "tokens_per_s"]
    assert mor["metrics"]["speed_rel_tokens_per_s"] != pytest.approx(sequential)
    assert "rel_tokens_per_s" not in mor["metrics"]
    assert "speed_rel_tokens_per_s" not in doc["models"]["vanilla @ 1e+12 flops"]["metrics"]
    fs = mor["metrics"]["fs:arc_easy"]
    assert set(fs) == {"value", "stderr", "n"} and 0 <= fs["value"] <= 1 and fs["stderr"] > 0


def test_update_keeps_edited_tolerances(run_dir, baseline, capsys):
    doc = json.loads(baseline.read_text())
    doc["tolerances"]["val_nll"]["tol"] = 0.2
    baseline.write_text(json.dumps(doc))
    assert main(["check", str(run_dir), "--baseline", str(baseline), "--update"]) == 0
    assert json.loads(baseline.read_text())["tolerances"]["val_nll"]["tol"] == 0.2


def test_update_refuses_a_run_with_failures(tmp_path, capsys):
    rc = main(["check", str(FIXTURES), "--baseline", str(tmp_path / "b.json"), "--update"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "failed" in err and FAILED_RUN in err
    assert not (tmp_path / "b.json").exists()


# --------------------------------------------------------------------------------------------
# verdicts


def test_identical_run_passes(capsys, run_dir, baseline):
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 0, out + err
    assert "check passed" in out
    for header in ("metric", "baseline", "now", "delta", "tolerance", "verdict"):
        assert header in out
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rc == 0
    assert rows and all(r["verdict"] == "ok" for r in rows.values())
    assert {"val_nll", "val_nll_causal", "speed_rel_tokens_per_s", "fs:arc_easy"} <= {
        metric for model, metric in rows if model == MOR}


def test_planted_val_nll_regression_fails(capsys, run_dir, baseline):
    edit(run_dir, "mor-2-1e12F-s0", lambda r: r["metrics"].update(
        val_nll=r["metrics"]["val_nll"] + 0.3))  # the seed mean rises by 0.15 > 0.05
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert "check FAILED" in err and MOR in err and "val_nll" in err
    assert "regression" in out
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rows[(MOR, "val_nll")]["verdict"] == "regression"
    assert rows[(MOR, "val_nll")]["delta"] == "+0.1500"
    others = [r for k, r in rows.items() if k != (MOR, "val_nll")]
    assert all(r["verdict"] == "ok" for r in others)


def _scale_speed_ratio(factor: float) -> Callable[[dict], None]:
    def change(rec: dict) -> None:
        rec["metrics"]["speed"]["rel_tokens_per_s"] *= factor
    return change


def test_planted_throughput_ratio_regression_fails(capsys, run_dir, baseline):
    # The interleaved measurement: mor-2 and recursive-2 at half vanilla's former ratio.
    for run_id in ("mor-2-1e12F-s0", "mor-2-1e12F-s1", "recursive-2-1e12F-s0"):
        edit(run_dir, run_id, _scale_speed_ratio(0.5))
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert MOR in err and "speed_rel_tokens_per_s" in err and "recursive-2" in err
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rows[(MOR, "speed_rel_tokens_per_s")]["verdict"] == "regression"
    assert rows[(MOR, "speed_rel_tokens_per_s")]["delta"] == "-50.0%"
    assert rows[("mor-2 @ 2e+12 flops", "speed_rel_tokens_per_s")]["verdict"] == "ok"


def test_sequential_tokens_per_s_swings_are_not_judged(capsys, run_dir, baseline):
    """Per-run tokens/s are timed minutes apart (another load on the machine, a turbo
    state): a 10x swing in them, against vanilla, is information, not a verdict."""
    edit(run_dir, "vanilla-1e12F-s0", lambda r: r["metrics"].update(
        tokens_per_s=10 * r["metrics"]["tokens_per_s"]))
    edit(run_dir, "mor-2-1e12F-s0", lambda r: r["metrics"].update(
        tokens_per_s=r["metrics"]["tokens_per_s"] / 10))
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rc == 0
    assert not any("tokens_per_s" in metric and not metric.startswith(("speed_", "infer_"))
                   for _, metric in rows)
    assert rows[(MOR, "speed_rel_tokens_per_s")]["verdict"] == "ok"
    assert rows[(MOR, "speed_rel_tokens_per_s")]["delta"] == "+0.0%"


def test_a_slower_machine_is_not_a_regression(capsys, run_dir, baseline):
    """Every run three times slower (another machine): ratios hold, the gate passes."""
    for sub in run_dir.iterdir():
        edit(run_dir, sub.name, lambda r: r["metrics"].update(
            tokens_per_s=r["metrics"]["tokens_per_s"] / 3,
            train_time_s=r["metrics"]["train_time_s"] * 3))
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 0, out + err


def test_changes_within_tolerance_pass(capsys, run_dir, baseline):
    edit(run_dir, "mor-2-1e12F-s0", lambda r: r["metrics"].update(
        val_nll=r["metrics"]["val_nll"] + 0.08))            # mean +0.04 < 0.05
    # Both seeds' interleaved ratio -10% < 25%.
    edit(run_dir, "mor-2-1e12F-s0", _scale_speed_ratio(0.9))
    edit(run_dir, "mor-2-1e12F-s1", _scale_speed_ratio(0.9))
    edit(run_dir, "recursive-2-1e12F-s0", lambda r: r["metrics"].update(
        val_nll=r["metrics"]["val_nll"] - 0.2))             # better: reported, passes
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rc == 0
    assert rows[(MOR, "val_nll")]["verdict"] == "ok"
    assert rows[(MOR, "speed_rel_tokens_per_s")]["verdict"] == "ok"
    assert rows[(MOR, "speed_rel_tokens_per_s")]["delta"] == "-10.0%"
    assert rows[("recursive-2", "val_nll")]["verdict"] == "improved"


def _set_acc(rec: dict, task: str, value: float) -> None:
    rec["metrics"]["fewshot"]["tasks"][task]["metrics"]["acc_norm"] = value


def test_fewshot_drop_is_judged_by_its_stderr(capsys, run_dir, baseline):
    rec = json.loads((run_dir / "vanilla-1e12F-s0" / "record.json").read_text())
    res = rec["metrics"]["fewshot"]["tasks"]["arc_easy"]
    base, se = res["metrics"]["acc_norm"], res["stderr"]["acc_norm"]
    allowed = 2 * (2 * se**2) ** 0.5  # same stderr now and then
    key = ("vanilla @ 1e+12 flops", "fs:arc_easy")

    edit(run_dir, "vanilla-1e12F-s0", lambda r: _set_acc(r, "arc_easy", base - 0.8 * allowed))
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rc == 0 and rows[key]["verdict"] == "ok"

    edit(run_dir, "vanilla-1e12F-s0", lambda r: _set_acc(r, "arc_easy", base - 1.2 * allowed))
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert "vanilla @ 1e+12 flops fs:arc_easy" in err


def test_judge_directions_and_floor():
    tol = DEFAULT_TOLERANCES
    assert judge("val_nll", 1.0, 1.06, tol["val_nll"])["verdict"] == "regression"
    assert judge("val_nll", 1.0, 1.04, tol["val_nll"])["verdict"] == "ok"
    assert judge("val_nll", 1.0, 0.9, tol["val_nll"])["verdict"] == "improved"
    rel = tol["speed_rel_tokens_per_s"]
    assert judge("speed_rel_tokens_per_s", 1.2, 0.85, rel)["verdict"] == "regression"  # -29%
    assert judge("speed_rel_tokens_per_s", 1.2, 0.95, rel)["verdict"] == "ok"          # -21%
    fs = tol["fewshot"]
    # stderr 0 on both sides (100% accuracy): the floor, not zero, is the tolerance.
    assert judge("fs:x", {"value": 1.0, "stderr": 0.0}, {"value": 0.99, "stderr": 0.0},
                 fs)["verdict"] == "ok"
    assert judge("fs:x", {"value": 1.0, "stderr": 0.0}, {"value": 0.9, "stderr": 0.0},
                 fs)["verdict"] == "regression"


def test_inference_ratio_is_gated_when_measured(capsys, run_dir, tmp_path):
    def infer(rel):
        return lambda r: r["metrics"].update(infer={"tokens_per_s": 100.0 * rel,
                                                    "rel_tokens_per_s": rel})
    for seed in (0, 1):
        edit(run_dir, f"mor-2-1e12F-s{seed}", infer(1.6))
    path = tmp_path / "b.json"
    assert main(["check", str(run_dir), "--baseline", str(path), "--update"]) == 0
    assert json.loads(path.read_text())["models"][MOR]["metrics"][
        "infer_rel_tokens_per_s"] == pytest.approx(1.6)
    capsys.readouterr()
    for seed in (0, 1):
        edit(run_dir, f"mor-2-1e12F-s{seed}", infer(1.0))  # -37.5%
    rc, out, err = check(capsys, run_dir, path)
    assert rc == 1 and "infer_rel_tokens_per_s" in err and MOR in err
    for seed in (0, 1):  # the measurement disappeared: also a failure
        edit(run_dir, f"mor-2-1e12F-s{seed}", lambda r: r["metrics"].pop("infer"))
    rc, rows = result_rows(capsys, run_dir, path)
    assert rc == 1 and rows[(MOR, "infer_rel_tokens_per_s")]["verdict"] == "missing"


# --------------------------------------------------------------------------------------------
# models missing, new or failed


def test_model_missing_from_run_fails(capsys, run_dir, baseline):
    shutil.rmtree(run_dir / "recursive-2-1e12F-s0")
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert "recursive-2" in err and "missing" in err
    assert "in the baseline but not in this run" in out


def test_model_new_in_run_is_reported_and_passes(capsys, run_dir, tmp_path):
    path = tmp_path / "b.json"
    shutil.rmtree(run_dir / "recursive-2-1e12F-s0")
    assert main(["check", str(run_dir), "--baseline", str(path), "--update"]) == 0
    shutil.copytree(FIXTURES / "recursive-2-1e12F-s0", run_dir / "recursive-2-1e12F-s0")
    capsys.readouterr()
    rc, rows = result_rows(capsys, run_dir, path)
    assert rc == 0
    assert rows[("recursive-2", "(model)")]["verdict"] == "new"


def test_failed_run_fails_the_gate(capsys, run_dir, baseline):
    edit(run_dir, "recursive-2-1e12F-s0", lambda r: r.update(status="failed",
                                                             error="RuntimeError: boom"))
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert "recursive-2 (model) failed" in err and "boom" in err


def test_failed_run_of_a_new_model_fails_the_gate(capsys, run_dir, baseline):
    shutil.copytree(FIXTURES / FAILED_RUN, run_dir / FAILED_RUN)  # mor-3: not in the baseline
    rc, out, err = check(capsys, run_dir, baseline)
    assert rc == 1
    assert "mor-3 (model) failed" in err and "FloatingPointError" in err


# --------------------------------------------------------------------------------------------
# usage errors: exit 2, one line naming the file and the fix


def test_missing_baseline_is_a_usage_error(capsys, run_dir, tmp_path):
    missing = tmp_path / "nope.json"
    rc, out, err = check(capsys, run_dir, missing)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mor-bench: error:")
    assert str(missing) in lines[0] and "--update" in lines[0]


@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"),
                                            ('{"schema": "other"}', "not a mor-bench baseline")])
def test_bad_baseline_is_a_usage_error(capsys, run_dir, tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc, _, err = check(capsys, run_dir, bad)
    assert rc == 2 and needle in err and str(bad) in err


def test_missing_run_dir_is_a_usage_error(capsys, baseline, tmp_path):
    rc, _, err = check(capsys, tmp_path / "no-run", baseline)
    assert rc == 2 and "no-run" in err


def test_check_needs_a_baseline_option(capsys, run_dir):
    with pytest.raises(SystemExit) as e:
        main(["check", str(run_dir)])
    assert e.value.code == 2
    assert "--baseline" in capsys.readouterr().err


def test_suite_change_is_noted(run_dir, baseline):
    doc = json.loads(baseline.read_text())
    doc["suite"]["sha256"] = "1" * 64  # the fixture records say "0" * 64
    baseline.write_text(json.dumps(doc))
    res = check_run(run_dir, baseline)
    assert res["passed"]
    assert any("suite file differs" in n for n in res["notes"])
    assert summary_line(res).startswith("check passed")


# --------------------------------------------------------------------------------------------
# the committed smoke baseline


def test_committed_smoke_baseline_matches_the_smoke_suite():
    doc = load_baseline(SMOKE_BASELINE)
    suite = load_suite("smoke")
    assert doc["suite"]["name"] == "smoke"
    assert set(doc["models"]) == {m.name for m in suite.models}
    for name, entry in doc["models"].items():
        m = entry["metrics"]
        assert entry["status"] == "ok", name
        assert 0 < m["val_nll"] < 6, name
        if entry["family"] != "vanilla":
            assert m["speed_rel_tokens_per_s"] > 0, name
        assert "rel_tokens_per_s" not in m, name  # the sequential ratio is not gated
        assert any(k.startswith("fs:") for k in m), f"{name}: no few-shot accuracy"
    assert doc["recorded"]["commit"] and doc["recorded"]["hardware"]
    for metric in ("val_nll", "speed_rel_tokens_per_s", "infer_rel_tokens_per_s", "fewshot"):
        assert doc["tolerances"][metric]["doc"], metric
    for metric in ("speed_rel_tokens_per_s", "infer_rel_tokens_per_s"):
        assert doc["tolerances"][metric]["kind"] == "rel"
        assert doc["tolerances"][metric]["tol"] == 0.25
    # A model's metrics are what `run_metrics` computes (the gate compares like with like).
    assert run_metrics([]) == {}


def test_interrupted_run_is_shown_as_interrupted_not_failed(capsys, run_dir, baseline):
    edit(run_dir, "recursive-2-1e12F-s0",
         lambda r: r.update(status="interrupted", interrupted_at_step=7))
    rc, rows = result_rows(capsys, run_dir, baseline)
    assert rc == 1  # still no result to judge: the gate fails
    row = rows[("recursive-2", "(model)")]
    assert row["verdict"] == "interrupted"
    assert "step 7" in row["note"] and "--resume" in row["note"]
    rc, out, err = check(capsys, run_dir, baseline)
    assert "recursive-2 (model) interrupted" in err
    assert "recursive-2 (model) failed" not in err
    # One seed interrupted, one failed: failed wins.
    edit(run_dir, "mor-2-1e12F-s0", lambda r: r.update(status="interrupted"))
    edit(run_dir, "mor-2-1e12F-s1", lambda r: r.update(status="failed", error="boom"))
    _, rows = result_rows(capsys, run_dir, baseline)
    assert rows[(MOR, "(model)")]["verdict"] == "failed"
