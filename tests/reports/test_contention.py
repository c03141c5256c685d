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
    assert any("flagged" in n and "mor-2-1e12F-s1" in n and REASON in n for n in res["notes"])
    rows = {(r["model"], r["metric"]): r for r in res["rows"]}
    assert "contended" in rows[("mor-2 @ 1e+12 flops", "speed_rel_tokens_per_s")]["note"]
    assert "contended" not in (rows[("mor-2 @ 1e+12 flops", "val_nll")].get("note") or "")
    # The plain output prints the note.
    main(["check", str(run_dir), "--baseline", str(baseline)])
    out = capsys.readouterr().out
    assert "timings of 1 run(s) are flagged" in out


def test_html_status_counts_contended_runs(tmp_path):
    from reports.html import render_html

    page = render_html(_run(tmp_path, CONTENDED)).read_text()
    assert re.search(r'href="#contention">1 timed on a contended machine<', page)
    key = page.split('id="key-columns"', 1)[1]
    table = re.search(r"<table>.*?</table>", key, flags=re.S).group(0)
    assert "<th>contended</th>" in table and "<td>contended</td>" in table
    plain = render_html(_run(tmp_path / "b", {"vanilla-1e12F-s0": _load(False)})).read_text()
    assert "contended machine" not in plain
