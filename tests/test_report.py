"""Tests for the comparison table and report (`reports.table`) and record loading.

tests/fixtures/records/ is a hand-made suite run: vanilla, recursive-2 and mor-2 at a
1e12-FLOPs budget (mor-2 with two seeds, recursive-2 without `val_bpb` and with a null
`mfu`), vanilla and mor-2 at 2e12, and a failed mor-3 run. Expected values below are
computed from those files, not typed in.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from evals.records import load_records
from mor.errors import MorBenchError
from reports.table import comparison_table, format_table, render_report, to_markdown

FIXTURES = Path(__file__).parent / "fixtures" / "records"
FAMILY_ORDER = {"vanilla": 0, "recursive": 1, "mor": 2}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_records(FIXTURES)


@pytest.fixture(scope="module")
def table(records) -> pd.DataFrame:
    return comparison_table(records)


def _ok(records, model: str, budget: float) -> list[dict]:
    return [r for r in records if r["status"] == "ok" and r["model_name"] == model
            and r["budget"]["value"] == budget]


def _row(table: pd.DataFrame, model: str, budget: float) -> pd.Series:
    rows = table[(table["model"] == model) & (table["budget"] == f"{budget:.3g} flops")]
    assert len(rows) == 1, f"expected one row for {model} at {budget}, got {len(rows)}"
    return rows.iloc[0]


def _markdown_rows(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[2:]]


def test_fixture_records_load(records):
    assert len(records) == len(list(FIXTURES.rglob("record.json"))) == 7
    assert [r["run_id"] for r in records] == sorted(r["run_id"] for r in records)
    assert sum(r["status"] == "failed" for r in records) == 1


def test_one_row_per_model_and_budget(records, table):
    ok = [r for r in records if r["status"] == "ok"]
    groups = {(r["model_name"], r["budget"]["value"]) for r in ok}
    assert len(table) == len(groups) == 5
    for model, budget in groups:
        row = _row(table, model, budget)
        assert row["seeds"] == len(_ok(records, model, budget))
    assert _row(table, "mor-2", 1e12)["seeds"] == 2
    # The failed run has no row.
    failed = next(r for r in records if r["status"] == "failed")
    assert failed["model_name"] not in set(table["model"])


def test_seed_mean(records, table):
    runs = _ok(records, "mor-2", 1e12)
    assert len(runs) == 2
    row = _row(table, "mor-2", 1e12)
    for col, key in [("val_nll", "val_nll"), ("val_bpb", "val_bpb"),
                     ("tokens_per_s", "tokens_per_s"), ("train_time_s", "train_time_s"),
                     ("mfu", "mfu")]:
        expected = sum(r["metrics"][key] for r in runs) / len(runs)
        assert row[col] == pytest.approx(expected), col
    expected_mem = sum(r["metrics"]["peak_mem_bytes"] for r in runs) / len(runs) / 2**20
    assert row["peak_mem_mb"] == pytest.approx(expected_mem)


@pytest.mark.parametrize("budget", [1e12, 2e12])
def test_relative_columns_use_vanilla_of_same_budget(records, table, budget):
    base = _row(table, "vanilla", budget)
    assert base["rel_val_nll"] == 0.0
    for col in ("rel_train_time", "rel_tokens_per_s", "rel_peak_mem"):
        assert base[col] == 1.0
    vanilla_runs = _ok(records, "vanilla", budget)
    assert len(vanilla_runs) == 1
    v = vanilla_runs[0]["metrics"]
    for model in {r["model_name"] for r in records if r["status"] == "ok"
                  and r["budget"]["value"] == budget} - {"vanilla"}:
        runs = _ok(records, model, budget)
        mean = lambda key, runs=runs: sum(r["metrics"][key] for r in runs) / len(runs)
        row = _row(table, model, budget)
        assert row["rel_val_nll"] == pytest.approx(mean("val_nll") - v["val_nll"])
        assert row["rel_train_time"] == pytest.approx(mean("train_time_s") / v["train_time_s"])
        assert row["rel_tokens_per_s"] == pytest.approx(mean("tokens_per_s") / v["tokens_per_s"])
        assert row["rel_peak_mem"] == pytest.approx(mean("peak_mem_bytes")
                                                    / v["peak_mem_bytes"])


def test_relative_columns_missing_without_vanilla(records):
    no_vanilla = [r for r in records if r["model_name"] != "vanilla"]
    t = comparison_table(no_vanilla)
    assert len(t) == 3
    assert t["rel_val_nll"].isna().all() and t["rel_train_time"].isna().all()


def test_missing_metric_is_dash_never_zero(records, table):
    assert "val_bpb" not in _ok(records, "recursive-2", 1e12)[0]["metrics"]
    row = _row(table, "recursive-2", 1e12)
    assert math.isnan(row["val_bpb"]) and math.isnan(row["mfu"])
    md_rows = {r["model"]: r for r in _markdown_rows(to_markdown(table))
               if r["budget"] == "1e+12 flops"}
    assert md_rows["recursive-2"]["val_bpb"] == "-"
    assert md_rows["recursive-2"]["mfu"] == "-"
    assert md_rows["vanilla"]["N_r"] == "-"
    # Present values are rendered, not dashed.
    assert md_rows["vanilla"]["val_bpb"] not in ("-", "0", "0.0000")
    assert md_rows["recursive-2"]["val_nll"] == f"{row['val_nll']:.4f}"
    assert format_table(table).isna().sum().sum() == 0


def test_rows_ordered_vanilla_recursive_mor(table):
    for _, group in table.groupby("budget", sort=False):
        order = [FAMILY_ORDER[f] for f in group["family"]]
        assert order == sorted(order)
        assert group["family"].iloc[0] == "vanilla"
    assert list(table[table["budget"] == "1e+12 flops"]["model"]) == [
        "vanilla", "recursive-2", "mor-2"]


def test_render_report(tmp_path, records, table):
    run_dir = tmp_path / "fixture-run"
    shutil.copytree(FIXTURES, run_dir)
    report = render_report(run_dir)
    assert report["n_ok"] == 6 and report["n_failed"] == 1
    md = (run_dir / "report.md").read_text()
    assert Path(report["markdown"]) == run_dir / "report.md"
    failed = next(r for r in records if r["status"] == "failed")
    assert "## Failed runs" in md
    failed_section = md.split("## Failed runs", 1)[1]
    assert failed["run_id"] in failed_section and failed["error"] in failed_section
    assert "Fixture CPU" in md  # hardware from the records' provenance
    assert records[0]["provenance"]["git"]["commit"] in md
    assert len(_markdown_rows(md)) == len(table)

    csv = pd.read_csv(run_dir / "report.csv")
    assert len(csv) == len(table)
    assert list(csv.columns) == list(table.columns)
    assert list(csv["model"]) == list(table["model"])
    assert csv["val_nll"].tolist() == pytest.approx(table["val_nll"].tolist())
    assert csv["val_bpb"].isna().sum() == table["val_bpb"].isna().sum() == 1


def test_load_records_single_file():
    recs = load_records(FIXTURES / "vanilla-1e12F-s0" / "record.json")
    assert [r["run_id"] for r in recs] == ["vanilla-1e12F-s0"]


@pytest.mark.parametrize("content", [
    json.dumps({"hello": "world"}),
    json.dumps({"schema": "someone-else/v3", "run_id": "x"}),
    json.dumps([1, 2, 3]),
    "{not json",
])
def test_load_records_rejects_non_records(tmp_path, content):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "vanilla-1e12F-s0", run_dir / "vanilla-1e12F-s0")
    (run_dir / "stray").mkdir()
    (run_dir / "stray" / "record.json").write_text(content)
    with pytest.raises(MorBenchError, match="stray"):
        load_records(run_dir)


def test_load_records_empty_or_missing(tmp_path):
    with pytest.raises(MorBenchError, match="no record.json"):
        load_records(tmp_path)
    with pytest.raises(MorBenchError, match="does not exist"):
        load_records(tmp_path / "missing")
