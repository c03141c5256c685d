"""Runs timed on a contended machine (the record's top-level "load", newer records): marked
in the tables, listed with their reason in report.md / index.html, flagged by the gate.

Records: copies of the hand-made suite run of tests/fixtures/records/ (see
tests/reports/test_table.py) with a "load" block added to some; older records lack it.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil
from pathlib import Path

from evals.cli.main import main
from evals.suite.record import load_records
from reports.table import comparison_table, headline_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
REASON = "loadavg 3.9 on 2 cores (another job was running)"


def _load(contended: bool, reason: str | None = None) -> dict:
    return {"cpu_s": 10.0, "wall_s": 8.0, "threads": 2, "cpu_util": 0.6,
            "loadavg_start": [3.9, 3.1, 2.0], "loadavg_end": [4.2, 3.3, 2.1],
            "contended": contended, "reason": reason}


def _run(tmp_path: Path, loads: dict[str, dict], drop_failed: bool = False) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    if drop_failed:
        shutil.rmtree(run_dir / "mor-3-1e12F-s0")
    for run_id, load in loads.items():
        path = run_dir / run_id / "record.json"
        rec = json.loads(path.read_text())
        rec["load"] = load
        path.write_text(json.dumps(rec))
    return run_dir


CONTENDED = {"vanilla-1e12F-s0": _load(False), "mor-2-1e12F-s1": _load(True, REASON)}


def test_table_marks_contended_models(tmp_path):
    table = comparison_table(load_records(_run(tmp_path, CONTENDED)))
    flagged = table[table["contended"]]
    assert list(zip(flagged["model"], flagged["budget"])) == [("mor-2", "1e+12 flops")]
    head = headline_table(table)
    assert "mor-2 @ 1e+12 flops (contended)" in set(head["model"])
    assert sum("(contended)" in m for m in head["model"]) == 1
    # Older records (no "load"): no column, no marker.
    old = comparison_table(load_records(FIXTURES))
    assert "contended" not in old.columns
    assert not any("contended" in m for m in headline_table(old)["model"])


def test_report_lists_contended_runs_with_reason(tmp_path):
    run_dir = _run(tmp_path, CONTENDED)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(run_dir), "--json"]) == 0
    md = (run_dir / "report.md").read_text()
    note = md.split("## Contended runs", 1)[1].split("\n## ", 1)[0]
    assert "`mor-2-1e12F-s1`" in note and REASON in note
    assert "vanilla-1e12F-s0" not in note  # measured, not contended
    detail = md.split("## Detail", 1)[1].split("\n## ", 1)[0]  # the detail tables
    speed = next(t for t in detail.split("\n### ") if "| contended |" in t)
    header = next(line for line in speed.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in speed.splitlines()
            if line.startswith("| mor-2 ")]
    assert sorted(r[cols.index("contended")] for r in rows) == ["", "contended"]
    page = (run_dir / "index.html").read_text()
    section = page.split('id="contention"', 1)[1]
    items = re.search(r'<ul class="contended">(.*?)</ul>', section, flags=re.S).group(1)
    assert "mor-2-1e12F-s1" in items and html.escape(REASON) in items
    first = re.search(r"<table>.*?</table>", page, flags=re.S).group(0)
    assert "mor-2 @ 1e+12 flops (contended)" in first


def test_report_without_contention_has_no_note(tmp_path):
    run_dir = _run(tmp_path, {"vanilla-1e12F-s0": _load(False)})
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["report", str(run_dir), "--json"]) == 0
    assert "## Contended runs" not in (run_dir / "report.md").read_text()
    assert 'id="contention"' not in (run_dir / "index.html").read_text()


def test_gate_flags_contended_timings(tmp_path, capsys):
    run_dir = _run(tmp_path, {}, drop_failed=True)
    baseline = tmp_path / "baseline.json"
    assert main(["check", str(run_dir), "--baseline", str(baseline), "--update"]) == 0
    capsys.readouterr()
    for run_id, load in CONTENDED.items():
        path = run_dir / run_id / "record.json"
        rec = json.loads(path.read_text())
        rec["load"] = load
        path.write_text(json.dumps(rec))
    assert main(["check", str(run_dir), "--baseline", str(baseline), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["contended"] == ["mor-2-1e12F-s1"]
    assert any("contended machine" in n and "mor-2-1e12F-s1" in n and REASON in n
               for n in res["notes"])
    rows = {(r["model"], r["metric"]): r for r in res["rows"]}
    assert "contended" in rows[("mor-2 @ 1e+12 flops", "speed_rel_tokens_per_s")]["note"]
    assert "contended" not in (rows[("mor-2 @ 1e+12 flops", "val_nll")].get("note") or "")
    # The plain output prints the note.
    main(["check", str(run_dir), "--baseline", str(baseline)])
    out = capsys.readouterr().out
    assert "1 run(s) trained on a contended machine" in out


def _edit(run_dir: Path, run_id: str, edit) -> None:
    path = run_dir / run_id / "record.json"
    rec = json.loads(path.read_text())
    edit(rec)
    path.write_text(json.dumps(rec))


def _slow_down(rec: dict) -> None:  # a training ratio 40% below the baseline's
    rec["metrics"]["speed"]["rel_tokens_per_s"] *= 0.6


def _checked(run_dir: Path, baseline: Path, capsys, *extra: str) -> tuple[int, dict]:
    rc = main(["check", str(run_dir), "--baseline", str(baseline), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_a_contended_timing_beyond_tolerance_does_not_flip_the_gate(tmp_path, capsys):
    """Load from other processes moves even interleaved ratios, so a timing regression
    measured on a contended machine is shown ("contended", with the reason) but does not
    fail the gate; --strict-timing counts it; a quiet machine's regression still fails."""
    run_dir = _run(tmp_path, {}, drop_failed=True)
    baseline = tmp_path / "baseline.json"
    assert main(["check", str(run_dir), "--baseline", str(baseline), "--update"]) == 0
    capsys.readouterr()
    key = ("mor-2 @ 1e+12 flops", "speed_rel_tokens_per_s")
    for run_id in ("mor-2-1e12F-s0", "mor-2-1e12F-s1"):
        _edit(run_dir, run_id, _slow_down)
    rc, res = _checked(run_dir, baseline, capsys)  # quiet: a regression
    assert rc == 1 and {(r["model"], r["metric"]) for r in res["problems"]} == {key}
    _edit(run_dir, "mor-2-1e12F-s1", lambda rec: rec.update(load=_load(True, REASON)))
    rc, res = _checked(run_dir, baseline, capsys)
    row = {(r["model"], r["metric"]): r for r in res["rows"]}[key]
    assert rc == 0 and res["passed"] and row["verdict"] == "contended"
    assert row["contended_reason"] == REASON
    assert any("not judged" in n and "--strict-timing" in n for n in res["notes"])
    rc, res = _checked(run_dir, baseline, capsys, "--strict-timing")
    assert rc == 1 and res["problems"][0]["verdict"] == "regression"
    # The plain summary says what was not judged.
    assert main(["check", str(run_dir), "--baseline", str(baseline)]) == 0
    assert "1 timing(s) measured on a contended machine not judged" in capsys.readouterr().out


def test_a_timing_is_judged_by_the_load_of_its_own_measurement(tmp_path, capsys):
    """The interleaved [speed] phase records its own load (metrics.speed.load): a ratio
    measured on a quiet machine is judged even if training shared the machine, and one
    measured on a busy machine is excused even if training ran alone."""
    run_dir = _run(tmp_path, {}, drop_failed=True)
    baseline = tmp_path / "baseline.json"
    assert main(["check", str(run_dir), "--baseline", str(baseline), "--update"]) == 0
    capsys.readouterr()
    key = ("mor-2 @ 1e+12 flops", "speed_rel_tokens_per_s")

    def quiet_phase_busy_training(rec):
        _slow_down(rec)
        rec["load"] = _load(True, REASON)
        rec["metrics"]["speed"]["load"] = _load(False)

    for run_id in ("mor-2-1e12F-s0", "mor-2-1e12F-s1"):
        _edit(run_dir, run_id, quiet_phase_busy_training)
    rc, res = _checked(run_dir, baseline, capsys)
    row = {(r["model"], r["metric"]): r for r in res["rows"]}[key]
    assert rc == 1 and row["verdict"] == "regression" and not row.get("note")

    def busy_phase_quiet_training(rec):
        rec["load"] = _load(False)
        rec["metrics"]["speed"]["load"] = _load(True, "phase: " + REASON)

    _edit(run_dir, "mor-2-1e12F-s0", busy_phase_quiet_training)
    rc, res = _checked(run_dir, baseline, capsys)
    row = {(r["model"], r["metric"]): r for r in res["rows"]}[key]
    assert rc == 0 and row["verdict"] == "contended"
    assert row["contended_reason"] == "phase: " + REASON


def test_html_status_counts_contended_runs(tmp_path):
    from reports.html import render_html

    page = render_html(_run(tmp_path, CONTENDED)).read_text()
    assert re.search(r'href="#contention">1 timed on a contended machine<', page)
    key = page.split('id="key-columns"', 1)[1]
    table = re.search(r"<table>.*?</table>", key, flags=re.S).group(0)
    assert "<th>contended</th>" in table and "<td>contended</td>" in table
    plain = render_html(_run(tmp_path / "b", {"vanilla-1e12F-s0": _load(False)})).read_text()
    assert "contended machine" not in plain
