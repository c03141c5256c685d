"""Tests for `reports.paper`: the transcribed paper tables, their normalisation, and the
view that puts the paper's rows beside a run's own (on the fixture records)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
import pytest

from evals.suite.record import RecordError, load_records
from reports.paper import (
    PAPER_TABLES,
    THIS_RUN,
    load_paper_table,
    paper_layout,
    paper_rows,
    paper_view,
    source_label,
)
from reports.table import comparison_table, render_formats

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "reports" / "paper_data"
SHARED = ROOT.parent / "shared" / "paper"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
LABEL = "paper (arXiv 2507.10524, Table 3)"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return comparison_table(load_records(FIXTURES))


def test_data_files_are_the_papers_numbers_and_cited():
    assert {p.stem for p in DATA.glob("*.csv")} == set(PAPER_TABLES)
    readme = (DATA / "README.md").read_text()
    assert "arXiv 2507.10524" in readme and "Bae et al. 2025" in readme
    for name in PAPER_TABLES:
        assert f"`{name}.csv`" in readme, name
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} (the project's shared reference copy) is not here to compare")
    for path in SHARED.glob("*.csv"):
        assert (DATA / path.name).read_text() == path.read_text(), path.name


def test_load_paper_table():
    t3 = load_paper_table("table3_main_360m")
    assert list(t3.columns) == ["Model", "Router", "KV", "Share", "Nr", "Param", "FLOPs",
                                "N_tok", "NLL", "LD", "HS", "PQ", "WG", "ARC", "MMLU", "Avg"]
    assert len(t3) == 12
    vanilla = t3[t3["Model"] == "Vanilla"].iloc[0]
    assert vanilla["NLL"] == 2.7824 and vanilla["Avg"] == 42.3
    assert pd.isna(vanilla["Router"]) and pd.isna(vanilla["Nr"])  # "-": not applicable
    assert len(load_paper_table("isoflop_scaling")) == 36
    with pytest.raises(RecordError, match="table3_main_360m"):
        load_paper_table("table4")


def test_paper_rows_normalise_the_papers_spelling():
    rows = paper_rows("table3_main_360m")
    assert set(rows["family"]) == {"vanilla", "recursive", "mor"}
    assert set(rows["router"].dropna()) == {"expert", "token"}
    assert set(rows["kv"].dropna()) == {"cache", "share"}
    assert set(rows.loc[rows["family"] != "vanilla", "sharing"]) == {"middle_cycle"}
    fixed = rows[rows["protocol"] == "fixed_tokens"]
    assert len(fixed) == 3 and set(fixed["paper_model"]) == {"MoR (fixed 20B tok)"}
    v = rows[rows["family"] == "vanilla"].iloc[0]
    assert v["params_non_emb"] == 315e6 and v["tokens"] == 20e9
    assert v["flops_used"] == pytest.approx(16.5e18)
    assert v["fs:hellaswag"] == pytest.approx(0.378) and v["fewshot_avg"] == pytest.approx(0.423)
    assert pd.isna(v["router"]) and math.isnan(v["N_r"])
    big = paper_rows("larger_1p7b")
    assert big["val_nll"].isna().all()  # the 1.7B table reports no NLL
    assert big.loc[0, "params_non_emb"] == pytest.approx(1.61e9)
    with pytest.raises(RecordError, match="load_paper_table"):
        paper_rows("expert_choice_router_ablation")


def _pairs(view: pd.DataFrame) -> dict[tuple[str, str], list[pd.Series]]:
    """(our run, budget) -> the paper rows that follow it."""
    out, key = {}, None
    for _, row in view.iterrows():
        if row["source"] == THIS_RUN:
            key = (row["Run"], row["FLOPs"])
            out[key] = []
        else:
            assert row["source"] == LABEL and row["Run"] == key[0]
            out[key].append(row)
    return out


def test_paper_view_on_the_fixture_run(table):
    view = paper_view(table)
    assert list(view.columns[:3]) == ["source", "Run", "Model"] and view.columns[-1] == "Avg"
    assert source_label("table3_main_360m") == LABEL
    ours = view[view["source"] == THIS_RUN].drop(columns="source").reset_index(drop=True)
    layout = paper_layout(table)
    assert len(ours) == len(table)
    for col in ours.columns:  # our side is the Table 3 layout of our table, unchanged
        if col in layout:
            assert ours[col].fillna("-").tolist() == layout[col].fillna("-").tolist(), col
        else:  # a benchmark only the paper has (PIQA, WinoGrande, MMLU): missing
            assert col in ("PQ", "WG", "MMLU") and ours[col].isna().all(), col
    pairs = _pairs(view)
    t3 = load_paper_table("table3_main_360m")
    # MoR expert/cache N_r=2 at a FLOPs budget: the paper's isoFLOP row, not fixed-token.
    (mor,) = pairs[("mor-2", "1e+12")]
    want = t3[(t3["Model"] == "MoR") & (t3["Nr"] == 2)].iloc[0]
    assert (mor["Model"], mor["Router"], mor["KV"], mor["N_r"], mor["Share"]) == (
        "MoR", "Expert", "Cache", "2", "M-Cyc")
    assert mor["NLL"] == f"{want['NLL']:.4f}" and mor["HS"] == f"{want['HS']:.1f}"
    assert (mor["Params"], mor["N_tok"], mor["FLOPs"]) == ("167M", "27B", "1.65e+19")
    (rec,) = pairs[("recursive-2", "1e+12")]
    assert rec["Model"] == "Recursive" and rec["NLL"] == "2.8079"
    for budget in ("1e+12", "2e+12"):
        (van,) = pairs[("vanilla", budget)]
        assert van["NLL"] == "2.7824" and pd.isna(van["Router"])
    # The 2e12 MoR record is an older one without router/KV: no counterpart, so the paper
    # side is there but empty.
    (none,) = pairs[("mor-2", "2e+12")]
    assert all(pd.isna(none[c]) for c in view.columns if c not in ("source", "Run"))


def _variant(table: pd.DataFrame, **changes) -> pd.DataFrame:
    row = table[(table["model"] == "mor-2") & (table["budget"] == "1e+12 flops")].copy()
    for col, value in changes.items():
        row[col] = value
    return row.reset_index(drop=True)


@pytest.mark.parametrize("changes,nll", [
    (dict(router="token", N_r=3.0), "2.9163"),
    (dict(kv="share", N_r=3.0), "2.7983"),
    (dict(N_r=4.0), "2.8204"),
    (dict(budget="2e+07 tokens"), "2.7749"),  # token budget: the fixed-token row
    (dict(budget="2e+07 tokens", router="token", N_r=3.0), "2.9163"),  # none fixed: isoFLOP
])
def test_paper_view_matches_router_kv_nr_and_protocol(table, changes, nll):
    view = paper_view(_variant(table, **changes))
    assert list(view["source"]) == [THIS_RUN, LABEL]
    assert view.iloc[1]["NLL"] == nll


def test_paper_view_unmatched_and_other_tables(table):
    view = paper_view(_variant(table, N_r=7.0))
    assert list(view["source"]) == [THIS_RUN, LABEL] and pd.isna(view.iloc[1]["NLL"])
    big = paper_view(_variant(table, N_r=3.0), name="larger_1p7b")
    assert big.iloc[1]["source"] == "paper (arXiv 2507.10524, 1.7B models)"
    assert pd.isna(big.iloc[1]["NLL"]) and big.iloc[1]["Avg"] == "46.7"
    with pytest.raises(RecordError):
        paper_view(table, name="token_choice_router_ablation")


def test_paper_view_renders(table):
    out = render_formats(paper_view(table))
    assert out["md"].count(LABEL) == len(table) and LABEL in out["html"]
    csv = pd.read_csv(io.StringIO(out["csv"]), dtype=str)
    assert list(csv["source"]).count(THIS_RUN) == len(table)
    # Missing cells: empty in the CSV, "-" elsewhere -- never a zero.
    empty = csv[(csv["source"] == LABEL) & csv["Model"].isna()]
    assert len(empty) == 1 and empty.drop(columns=["source", "Run"]).isna().all(axis=None)
    assert "(arXiv 2507.10524, Table 3)" in out["tex"]
