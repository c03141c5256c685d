"""Tests for the comparison table and report (`reports.table`) and record loading.

tests/fixtures/records/ is a hand-made suite run: vanilla, recursive-2 and mor-2 at a
1e12-FLOPs budget (mor-2 with two seeds, recursive-2 without `val_bpb` and with a null
`mfu`), vanilla and mor-2 at 2e12, and a failed mor-3 run. The two 1e12 mor-2 records carry
what newer runs record for MoR (router, kv, routing diagnostics per evaluation mode,
effective FLOPs/token); the 2e12 one, like older records, does not. The four 1e12 runs have
few-shot results (LAMBADA, HellaSwag, ARC-Easy/Challenge; MoR under both routing modes)
and their per-item correctness in fewshot_items.json (recursive-2 with 40 HellaSwag items
where the others have 50); the 2e12 runs have none. Expected values below are computed
from those files, not typed in.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from evals.cli.main import main
from evals.suite.record import RecordError, load_records
from reports.frame import fewshot_parts
from reports.paper import paper_layout
from reports.stats import TEST_COLUMNS, mean_ci, t_quantile
from reports.table import (
    comparison_table,
    format_table,
    render_formats,
    render_report,
    to_markdown,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
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
    rows = table[(table["model"] == model) & (table["budget"] == f"{budget:.6g} flops")]
    assert len(rows) == 1, f"expected one row for {model} at {budget}, got {len(rows)}"
    return rows.iloc[0]


def _markdown_tables(md: str) -> list[str]:
    """Each Markdown table (a run of lines starting with "|") of a document."""
    blocks, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


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
    # The first table is the headline (tests/reports/test_headline.py); then the detail
    # tables (test_detail_tables_hold_every_column), a row per model each.
    full = _markdown_rows(_markdown_tables(md)[1])
    assert len(full) == len(table)
    assert [r["model"] for r in full] == list(table["model"])

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
    with pytest.raises(RecordError, match="stray"):
        load_records(run_dir)


def test_load_records_empty_or_missing(tmp_path):
    with pytest.raises(RecordError, match="no record.json"):
        load_records(tmp_path)
    with pytest.raises(RecordError, match="does not exist"):
        load_records(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# columns added for MoR variants, and relative params / FLOPs / tokens


def test_routing_columns(records, table):
    runs = _ok(records, "mor-2", 1e12)
    row = _row(table, "mor-2", 1e12)
    assert (row["family"], row["router"], row["kv"], row["eval_routing"]) == (
        "mor", "expert", "cache", "topk")
    topk = [r["metrics"]["val_routing_by_mode"]["topk"] for r in runs]
    # Diagnostics are the top-k ones (the paper's), averaged over seeds, never the causal.
    assert row["sampling_acc"] == pytest.approx(sum(t["sampling_acc"] for t in topk) / 2)
    assert row["dead_token_ratio"] == pytest.approx(sum(t["dead_token_ratio"] for t in topk) / 2)
    causal = [r["metrics"]["val_routing_by_mode"]["causal"]["dead_token_ratio"] for r in runs]
    assert row["dead_token_ratio"] != pytest.approx(sum(causal) / 2)
    assert row["val_nll_causal"] == pytest.approx(
        sum(r["metrics"]["val_nll_by_routing"]["causal"] for r in runs) / 2)
    assert row["flops_per_token_effective"] == pytest.approx(
        sum(r["metrics"]["flops_per_token_effective"] for r in runs) / 2)

    md = {(r["model"], r["budget"]): r for r in _markdown_rows(to_markdown(table))}
    mor = md[("mor-2", "1e+12 flops")]
    assert (mor["router"], mor["kv"], mor["eval_routing"]) == ("expert", "cache", "topk")
    assert mor["sampling_acc"] == f"{100 * row['sampling_acc']:.1f}%"
    assert mor["dead_token_ratio"] == f"{100 * row['dead_token_ratio']:.1f}%"
    # A record without the diagnostics (older, or a vanilla model) shows dashes.
    for key in [("mor-2", "2e+12 flops"), ("vanilla", "1e+12 flops")]:
        assert md[key]["sampling_acc"] == md[key]["dead_token_ratio"] == "-", key
    assert md[("vanilla", "1e+12 flops")]["router"] == "-"


@pytest.mark.parametrize("budget", [1e12, 2e12])
def test_relative_params_flops_tokens(records, table, budget):
    v = _ok(records, "vanilla", budget)[0]
    base = _row(table, "vanilla", budget)
    assert base["rel_params"] == base["rel_flops_per_token"] == base["rel_tokens"] == 1.0
    for model in {r["model_name"] for r in records if r["status"] == "ok"
                  and r["budget"]["value"] == budget} - {"vanilla"}:
        runs = _ok(records, model, budget)
        row = _row(table, model, budget)
        assert row["rel_params"] == pytest.approx(
            runs[0]["params"]["non_embedding"] / v["params"]["non_embedding"])
        assert row["rel_flops_per_token"] == pytest.approx(
            runs[0]["plan"]["flops_per_token"] / v["plan"]["flops_per_token"])
        tokens = sum(r["metrics"]["tokens"] for r in runs) / len(runs)
        assert row["rel_tokens"] == pytest.approx(tokens / v["metrics"]["tokens"])
    # At equal FLOPs, a model cheaper per token trains on proportionally more tokens.
    mor = _row(table, "mor-2", budget)
    assert mor["rel_flops_per_token"] < 1 < mor["rel_tokens"]
    md = {r["model"]: r for r in _markdown_rows(to_markdown(table))
          if r["budget"] == f"{budget:.6g} flops"}
    assert md["mor-2"]["rel_tokens"] == f"{mor['rel_tokens']:.2f}x"


# --------------------------------------------------------------------------------------------
# budgets: 6 significant digits, numeric order


@pytest.fixture
def rebudget(tmp_path) -> Callable[[dict[str, float]], Path]:
    """Copy fixture records {run_id: new FLOPs budget} into one suite run directory."""

    def make(budgets: dict[str, float]) -> Path:
        run_dir = tmp_path / "rebudgeted"
        for run_id, value in budgets.items():
            rec = json.loads((FIXTURES / run_id / "record.json").read_text())
            rec["budget"]["value"] = value
            (run_dir / run_id).mkdir(parents=True)
            (run_dir / run_id / "record.json").write_text(json.dumps(rec))
        return run_dir

    return make


def test_budgets_sort_numerically(rebudget):
    run_dir = rebudget({"vanilla-1e12F-s0": 1.2e12, "mor-2-1e12F-s0": 1.2e12,
                        "vanilla-2e12F-s0": 9e11, "mor-2-2e12F-s0": 9e11})
    table = comparison_table(load_records(run_dir))
    # As strings "1.2e+12 flops" < "9e+11 flops"; as numbers 9e11 comes first.
    assert list(table["budget"]) == ["9e+11 flops"] * 2 + ["1.2e+12 flops"] * 2
    assert list(table["model"]) == ["vanilla", "mor-2", "vanilla", "mor-2"]
    # Relative columns still pair each MoR row with the vanilla row of ITS budget.
    recs = {r["run_id"]: r for r in load_records(run_dir)}
    assert table.loc[1, "rel_val_nll"] == pytest.approx(
        recs["mor-2-2e12F-s0"]["metrics"]["val_nll"]
        - recs["vanilla-2e12F-s0"]["metrics"]["val_nll"])
    md_budgets = [r["budget"] for r in _markdown_rows(to_markdown(table))]
    assert md_budgets == ["9e+11 flops"] * 2 + ["1.2e+12 flops"] * 2


def test_budgets_keep_six_significant_digits(rebudget):
    # Budgets that agree to 3 digits are different rows, labelled apart.
    run_dir = rebudget({"vanilla-1e12F-s0": 1.23456e12, "vanilla-2e12F-s0": 1.23412e12})
    table = comparison_table(load_records(run_dir))
    assert list(table["budget"]) == ["1.23412e+12 flops", "1.23456e+12 flops"]
    assert list(table["seeds"]) == [1, 1]


# --------------------------------------------------------------------------------------------
# one report = one suite run


def _two_copies(tmp_path, second_run_dir: str | None) -> Path:
    parent = tmp_path / "parent"
    shutil.copytree(FIXTURES, parent / "a")
    shutil.copytree(FIXTURES, parent / "b")
    if second_run_dir is not None:
        for f in (parent / "b").rglob("record.json"):
            rec = json.loads(f.read_text())
            rec["suite"]["run_dir"] = second_run_dir
            f.write_text(json.dumps(rec))
    return parent


def test_report_refuses_records_of_two_suite_runs(capsys, tmp_path):
    parent = _two_copies(tmp_path, "runs/fixture-20261129-000000-abcdef")
    with pytest.raises(RecordError, match="2 suite runs"):
        load_records(parent)
    rc = main(["report", str(parent)])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mor-bench: error:"), err
    assert "holds records of 2 suite runs" in lines[0]
    assert str(parent) in lines[0] and "pass one run directory" in lines[0]
    assert out == ""
    assert not (parent / "report.md").exists() and not (parent / "report.csv").exists()
    # Each copy on its own is a fine report.
    assert main(["report", str(parent / "b")]) == 0


def test_report_refuses_duplicate_run_ids(capsys, tmp_path):
    # Two copies of the same suite run (same suite.run_dir): the seeds would count twice.
    parent = _two_copies(tmp_path, None)
    rc = main(["report", str(parent)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("mor-bench: error:") and "pass one run directory" in err
    assert not (parent / "report.md").exists()


# --------------------------------------------------------------------------------------------
# seeds: mean ± Student-t half-width; few-shot columns


def test_seed_confidence_interval_columns(records, table):
    runs = _ok(records, "mor-2", 1e12)
    nll = [r["metrics"]["val_nll"] for r in runs]
    sd = (sum((x - sum(nll) / 2) ** 2 for x in nll) / (len(nll) - 1)) ** 0.5
    expected = 12.7062 * sd / 2 ** 0.5  # t(0.975, 1 dof) from the table of the t distribution
    row = _row(table, "mor-2", 1e12)
    assert row["val_nll_ci95"] == pytest.approx(expected, rel=1e-4)
    assert row["val_nll_ci95"] == pytest.approx(mean_ci(nll)[1])
    # One seed: no interval -- missing, not a zero-width one.
    for model in ("vanilla", "recursive-2"):
        assert math.isnan(_row(table, model, 1e12)["val_nll_ci95"])
    # The few-shot scores carry intervals too.
    hs = [r["metrics"]["fewshot"]["tasks"]["arc_easy"]["metrics"]["acc_norm"] for r in runs]
    assert row["fs:arc_easy_ci95"] == pytest.approx(mean_ci(hs)[1])
    # The full Markdown table shows half-widths as "±x", missing as "-".
    md = {(r["model"], r["budget"]): r for r in _markdown_rows(to_markdown(table))}
    assert md[("mor-2", "1e+12 flops")]["val_nll_ci95"] == f"±{row['val_nll_ci95']:.4f}"
    assert md[("vanilla", "1e+12 flops")]["val_nll_ci95"] == "-"


def test_fewshot_columns_from_fixture_records(records, table):
    for model in ("vanilla", "recursive-2", "mor-2"):
        runs = _ok(records, model, 1e12)
        row = _row(table, model, 1e12)
        tasks = [r["metrics"]["fewshot"]["tasks"] for r in runs]
        hs = sum(t["hellaswag"]["metrics"]["acc_norm"] for t in tasks) / len(tasks)
        ld = sum(t["lambada_openai"]["metrics"]["acc"] for t in tasks) / len(tasks)
        assert row["fs:hellaswag"] == pytest.approx(hs)  # the paper's metric: acc_norm
        assert row["fs:lambada_openai"] == pytest.approx(ld)  # acc
        assert row["fewshot_avg"] == pytest.approx(
            (row["fs:lambada_openai"] + row["fs:hellaswag"] + row["fs:arc_merged"]) / 3)
    # Runs without few-shot results: missing, never 0.
    for model in ("vanilla", "mor-2"):
        assert math.isnan(_row(table, model, 2e12)["fs:hellaswag"])
        assert math.isnan(_row(table, model, 2e12)["fewshot_avg"])


def test_fewshot_parts_name_the_items_of_each_column():
    tasks = {"mmlu_local": {"subtasks": ["mmlu_stem_local"]},
             "mmlu_stem_local": {"subtasks": ["mmlu_anatomy_local", "mmlu_physics_local"]},
             "mmlu_anatomy_local": {}, "mmlu_physics_local": {},
             "mor_paper_local": {"subtasks": ["hellaswag_local"]}, "hellaswag_local": {},
             "arc_easy_local": {}, "arc_challenge_local": {}}
    assert fewshot_parts(tasks) == {
        "fs:arc_challenge_local": ["arc_challenge_local"],
        "fs:arc_easy_local": ["arc_easy_local"],
        "fs:hellaswag_local": ["hellaswag_local"],
        "fs:mmlu_local": ["mmlu_anatomy_local", "mmlu_physics_local"],
        "fs:arc_merged": ["arc_easy_local", "arc_challenge_local"],
    }


# --------------------------------------------------------------------------------------------
# the paper's Table 3 layout, significance marks, output formats


def _tests(rows: list[dict]) -> pd.DataFrame:
    base = {"task": None, "routing": None, "ci_low": 0.0, "ci_high": 0.0, "p": 0.5, "n": 2,
            "method": "test"}
    return pd.DataFrame([{**base, **r} for r in rows], columns=TEST_COLUMNS)


def test_paper_layout_columns_and_cells(table):
    layout = paper_layout(table)
    assert list(layout.columns[:11]) == ["Model", "Run", "Router", "KV", "Share", "N_r",
                                         "Params", "Budget", "FLOPs", "N_tok", "NLL"]
    # The paper's benchmark order, ARC once (merged), Avg last among the accuracies.
    assert list(layout.columns[11:15]) == ["LD", "HS", "ARC", "Avg"]
    assert list(layout.columns[15:]) == ["Seeds", "Time", "Mem", "Tok/s", "vs vanilla"]
    assert len(layout) == len(table)
    rows = {(r["Run"], r["Budget"]): r for _, r in layout.iterrows()}
    mor, van = _row(table, "mor-2", 1e12), _row(table, "vanilla", 1e12)
    m = rows[("mor-2", "1e+12 flops")]
    assert (m["Model"], m["Router"], m["KV"], m["N_r"], m["Seeds"]) == (
        "MoR", "Expert", "Cache", "2", "2")
    assert m["NLL"] == f"{mor['val_nll']:.4f} ± {mor['val_nll_ci95']:.4f}"
    assert m["ARC"] == (f"{100 * mor['fs:arc_merged']:.1f} ± "
                        f"{100 * mor['fs:arc_merged_ci95']:.1f}")
    assert m["Params"] == f"{mor['params_non_emb'] / 1e3:.3g}K"
    assert m["Time"] == f"{mor['rel_train_time']:.2f}x"
    assert m["Mem"] == f"{mor['rel_peak_mem']:.2f}x"
    # Training throughput: the interleaved ratio (metrics.speed), not the sequential one.
    assert m["Tok/s"] == f"{mor['speed_rel_tokens_per_s']:.2f}x"
    assert mor["speed_rel_tokens_per_s"] != pytest.approx(mor["rel_tokens_per_s"])
    sequential = paper_layout(table.drop(columns=["speed_tokens_per_s",
                                                  "speed_rel_tokens_per_s"]))
    # Without it, the sequential ratio -- and the column says so.
    assert "Tok/s" not in sequential.columns
    assert sequential.iloc[list(layout["Run"]).index("mor-2")]["Tok/s (sequential)"] == (
        f"{mor['rel_tokens_per_s']:.2f}x")
    v = rows[("vanilla", "1e+12 flops")]
    # One seed: the mean alone, no interval; vanilla has no router, KV or N_r.
    assert v["NLL"] == f"{van['val_nll']:.4f}" and "±" not in v["HS"]
    assert pd.isna(v["Router"]) and pd.isna(v["KV"]) and pd.isna(v["N_r"])
    assert (v["Model"], v["Time"], v["vs vanilla"]) == ("Vanilla", "1.00x", "reference")
    # Missing few-shot results stay missing; without tests nothing is called better.
    assert pd.isna(rows[("mor-2", "2e+12 flops")]["HS"])
    assert pd.isna(rows[("mor-2", "2e+12 flops")]["vs vanilla"])
    assert not any("better" in str(x) for x in layout["vs vanilla"])
    assert not any("*" in str(x) for x in layout.to_numpy().ravel())


def test_paper_layout_marks_only_significant_differences(table):
    tests = _tests([
        {"model": "mor-2", "budget": "1e+12 flops", "metric": "fs:hellaswag", "diff": 0.3,
         "significant": True},
        {"model": "mor-2", "budget": "1e+12 flops", "metric": "val_nll", "diff": -0.06,
         "significant": False},
        {"model": "mor-2", "budget": "1e+12 flops", "metric": "train_time_s", "diff": 1.0,
         "significant": True},
        {"model": "recursive-2", "budget": "1e+12 flops", "metric": "val_nll", "diff": 0.12,
         "significant": True},
        {"model": "mor-2", "budget": "2e+12 flops", "metric": "val_nll", "diff": -0.03,
         "significant": False},
    ])
    rows = {(r["Run"], r["Budget"]): r for _, r in paper_layout(table, tests).iterrows()}
    m = rows[("mor-2", "1e+12 flops")]
    assert m["HS"].endswith("*") and m["Time"].endswith("*")
    assert not m["NLL"].endswith("*") and not m["LD"].endswith("*")
    # Lower NLL / time is better, higher accuracy is better.
    assert m["vs vanilla"] == "better: HS; worse: Time"
    assert rows[("recursive-2", "1e+12 flops")]["vs vanilla"] == "worse: NLL"
    assert rows[("recursive-2", "1e+12 flops")]["NLL"].endswith("*")
    assert rows[("mor-2", "2e+12 flops")]["vs vanilla"] == "n.s."  # tested, not significant
    assert not rows[("mor-2", "2e+12 flops")]["NLL"].endswith("*")


def test_render_formats(table):
    layout = paper_layout(table)
    out = render_formats(layout)
    assert set(out) == {"md", "tex", "csv", "html"}
    md_rows = _markdown_rows(out["md"])
    assert len(md_rows) == len(layout)
    by_key = {(r["Run"], r["Budget"]): r for r in md_rows}
    assert by_key[("vanilla", "1e+12 flops")]["Router"] == "-"
    assert by_key[("mor-2", "2e+12 flops")]["HS"] == "-"
    # CSV: missing cells empty (read back as missing), never "0" or "-".
    csv = pd.read_csv(__import__("io").StringIO(out["csv"]), dtype=str)
    assert list(csv.columns) == list(layout.columns) and len(csv) == len(layout)
    at = csv[(csv["Run"] == "mor-2") & (csv["Budget"] == "2e+12 flops")].iloc[0]
    assert pd.isna(at["HS"]) and pd.isna(at["Router"])
    assert at["NLL"] == f"{_row(table, 'mor-2', 2e12)['val_nll']:.4f}"
    # LaTeX: a booktabs tabular, specials escaped, ± as math.
    tex = out["tex"]
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex
    assert "N\\_r" in tex and "N_r" not in tex.replace("N\\_r", "")
    assert "$\\pm$" in tex and "±" not in tex
    assert tex.count("\\\\") == len(layout) + 1  # header + one line per row
    # HTML: a table fragment, one body row per table row, "-" for missing.
    html = out["html"]
    assert html.lstrip().startswith("<table") and html.count("</tr>") == len(layout) + 1
    assert "<td>-</td>" in html
    # A numeric table goes through the same formats.
    numeric = render_formats(table[["model", "budget", "val_bpb"]])
    assert "val_bpb" in numeric["md"] and ",\n" in numeric["csv"]  # recursive-2: no bpb


def _with_infer(records, values: dict[str, dict]) -> list[dict]:
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        if r["run_id"] in values:
            r["metrics"]["infer"] = values[r["run_id"]]
        out.append(r)
    return out


def _infer(tps: float, rel: float | None = None) -> dict:
    return {"tokens_per_s": tps, "ms_per_token": 1000 / tps, "batch_size": 32,
            "kv_cache_bytes": 2**21, "mean_depth": 1.5, "rel_tokens_per_s": rel}


def test_inference_columns_when_present(records, table):
    assert "infer_tokens_per_s" not in table.columns  # no record measured inference
    assert "Infer tok/s" not in paper_layout(table).columns
    recs = _with_infer(records, {"vanilla-1e12F-s0": _infer(1000.0),
                                 "mor-2-1e12F-s0": _infer(1500.0),
                                 "mor-2-1e12F-s1": _infer(1700.0),
                                 "mor-2-2e12F-s0": _infer(900.0, rel=1.8)})
    t = comparison_table(recs)
    mor = _row(t, "mor-2", 1e12)
    assert mor["infer_tokens_per_s"] == pytest.approx(1600.0)
    assert mor["rel_infer_tokens_per_s"] == pytest.approx(1.6)  # vs vanilla of the budget
    assert mor["infer_batch_size"] == 32 and mor["infer_kv_cache_mb"] == pytest.approx(2.0)
    assert mor["infer_tokens_per_s_ci95"] == pytest.approx(mean_ci([1500.0, 1700.0])[1])
    assert _row(t, "vanilla", 1e12)["rel_infer_tokens_per_s"] == 1.0
    # No vanilla measurement at 2e12: the benchmark's own ratio; none at all: missing.
    assert _row(t, "mor-2", 2e12)["rel_infer_tokens_per_s"] == pytest.approx(1.8)
    assert math.isnan(_row(t, "recursive-2", 1e12)["infer_tokens_per_s"])
    assert math.isnan(_row(t, "recursive-2", 1e12)["rel_infer_tokens_per_s"])
    rows = {(r["Run"], r["Budget"]): r for _, r in paper_layout(t).iterrows()}
    assert rows[("mor-2", "1e+12 flops")]["Infer tok/s"].startswith("1,600 ± ")
    assert rows[("mor-2", "1e+12 flops")]["Infer vs vanilla"] == "1.60x"
    assert pd.isna(rows[("recursive-2", "1e+12 flops")]["Infer tok/s"])


def test_render_report_writes_every_format(tmp_path, records):
    run_dir = tmp_path / "fixture-run"
    shutil.copytree(FIXTURES, run_dir)
    report = render_report(run_dir)
    for key, name in [("latex", "report.tex"), ("tables_html", "report_tables.html"),
                      ("layout_csv", "report_layout.csv"), ("tests_csv", "report_tests.csv")]:
        assert Path(report[key]) == run_dir / name and (run_dir / name).stat().st_size > 0
    md = (run_dir / "report.md").read_text()
    # After the headline and the detail tables: the Table 3 layout.
    layout = _markdown_rows(_markdown_tables(md.split("## As the paper's Table 3", 1)[1])[0])
    assert len(layout) == len(report["layout"]) == 5
    mor = next(r for r in layout if r["Run"] == "mor-2" and r["Budget"] == "1e+12 flops")
    # The fixture's MoR is right on every HellaSwag item vanilla got wrong (15 of 50): the
    # paired bootstrap over items finds it; LAMBADA is identical, so unmarked.
    assert mor["HS"].endswith("*") and not mor["LD"].endswith("*")
    assert "better: HS" in mor["vs vanilla"] and "NLL" not in mor["vs vanilla"]
    assert "## Significance tests vs vanilla" in md and "## Paper reference" in md
    tests = pd.read_csv(run_dir / "report_tests.csv")
    assert list(tests.columns) == TEST_COLUMNS
    assert set(tests["model"]) == {"mor-2", "recursive-2"}
    assert len(pd.read_csv(run_dir / "report_layout.csv")) == 5
    tex = (run_dir / "report.tex").read_text()
    assert tex.count("\\begin{tabular}") == 2  # the layout and the paper view
    html = (run_dir / "report_tables.html").read_text()
    assert html.count("<table") == 2 and "paper (arXiv 2507.10524, Table 3)" in html
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)


def test_render_report_with_no_successful_run(tmp_path):
    run_dir = tmp_path / "failed-only"
    shutil.copytree(FIXTURES / "mor-3-1e12F-s0", run_dir / "mor-3-1e12F-s0")
    report = render_report(run_dir)
    assert (report["n_ok"], report["n_failed"]) == (0, 1)
    md = (run_dir / "report.md").read_text()
    assert "## Failed runs" in md
    assert "## As the paper's Table 3" not in md and "## Paper reference" not in md
    assert report["layout"].empty and report["tests"].empty
    assert (run_dir / "report.tex").is_file() and (run_dir / "report_tables.html").is_file()


def test_detail_tables_hold_every_column(tmp_path, table):
    from reports.table import DETAIL_KEYS, detail_tables

    details = detail_tables(table)
    assert len(details) >= 3  # thematic, not one wide table
    shown = [c for _, frame in details for c in frame.columns if c not in DETAIL_KEYS]
    expected = [c for c in table.columns if not c.endswith("_ci95") and c not in DETAIL_KEYS]
    assert sorted(shown) == sorted(expected) and len(shown) == len(set(shown))
    for title, frame in details:
        assert list(frame.columns[:2]) == DETAIL_KEYS, title
        assert len(frame) == len(table)
    themes = {title: list(frame.columns) for title, frame in details}
    assert "val_nll" in themes["Quality"] and "fewshot_avg" in themes["Quality"]
    assert "speed_rel_tokens_per_s" in themes["Training time, speed and memory"]
    # report.md: each under its own heading in the Detail section, none wider than needed.
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    md = Path(render_report(run_dir)["markdown"]).read_text()
    detail = md.split("## Detail", 1)[1].split("\n## ", 1)[0]
    for title, frame in details:
        section = detail.split(f"### {title}\n", 1)[1]
        head = _markdown_tables(section)[0].splitlines()[0]
        assert [c.strip() for c in head.strip("|").split("|")] == list(frame.columns)
    assert max(len(f.columns) for _, f in details) < len(expected)
