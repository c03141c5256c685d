"""The paper's reported numbers, and a view that puts them beside a run's own.

Data: `reports/paper_data/*.csv`, transcribed from Bae et al. 2025, "Mixture-of-Recursions",
arXiv 2507.10524 (v3); see the README there for which table each file is.

    from reports.paper import load_paper_table, paper_view
    load_paper_table("table3_main_360m")        # the CSV as the paper prints it
    paper_view(comparison_table(records))      # our rows, each followed by the paper's

Rows are matched on model family, router (expert/token), KV strategy (cache/share) and N_r;
an isoFLOP (FLOPs-budget) run is matched with the paper's isoFLOP rows, a token-budget run
with its fixed-token rows where it has them. The paper's models are far larger than a
CPU-sized run: compare orderings and relative gaps, not absolute values.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import pandas as pd

from mor.errors import MorBenchError
from reports.table import paper_layout

CITATION = "Bae et al. 2025, Mixture-of-Recursions, arXiv 2507.10524"
# File -> the short name of the paper's table in the "source" label.
PAPER_TABLES = {
    "table3_main_360m": "Table 3",
    "isoflop_scaling": "isoFLOP scaling",
    "larger_1p7b": "1.7B models",
    "expert_choice_router_ablation": "expert-choice router ablation",
    "token_choice_router_ablation": "token-choice router ablation",
}
THIS_RUN = "this run"
PAPER_NOTE = (
    f"Paper rows: {CITATION} (v3), Table 3 -- 360M-base models at 16.5e18 FLOPs (rows "
    "\"fixed 20B tok\": 20B tokens); ours are measured in this run at its own, much smaller "
    "scale, so compare orderings and relative gaps, not absolute values. Paper ARC: how "
    "Easy and Challenge are merged is not stated (ours: item-weighted). `-`: missing "
    "(not reported, or no paper row with the same family, router, KV and N_r).")

# The paper's spellings -> ours.
_ROUTERS = {"expert": "expert", "token": "token"}
_KV = {"cache": "cache", "share": "share"}
_SHARING = {"cyc": "cycle", "seq": "sequence", "m-cyc": "middle_cycle",
            "m-seq": "middle_sequence"}
_TASKS = {"LD": "fs:lambada_openai", "HS": "fs:hellaswag", "PQ": "fs:piqa",
          "WG": "fs:winogrande", "ARC": "fs:arc_merged", "MMLU": "fs:mmlu",
          "Avg": "fewshot_avg"}
VIEW_KEYS = ["source", "Run", "Model", "Router", "KV", "Share", "N_r", "Params", "FLOPs",
             "N_tok", "NLL", "LD", "HS", "PQ", "WG", "ARC", "MMLU", "Avg"]


def source_label(name: str) -> str:
    """The "source" column of a paper table's rows, e.g. "paper (arXiv 2507.10524, Table 3)"."""
    return f"paper (arXiv 2507.10524, {PAPER_TABLES[name]})"


def load_paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables (PAPER_TABLES) as transcribed; "-" (not applicable or not
    reported) reads as missing."""
    if name not in PAPER_TABLES:
        raise MorBenchError(f"no paper table {name!r}; choose one of "
                            f"{', '.join(sorted(PAPER_TABLES))}")
    path = resources.files("reports") / "paper_data" / f"{name}.csv"
    with path.open() as f:
        return pd.read_csv(f, na_values=["-"])


def _count(text: Any) -> float:
    """"315M" / "0.87B" / "20B" -> a number."""
    if not isinstance(text, str):
        return math.nan
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:].upper())
    return float(text[:-1]) * scale if scale else float(text)


def _key(value: Any, names: dict[str, str]) -> str | None:
    return None if not isinstance(value, str) else names.get(value.strip().lower(), value)


def paper_rows(name: str = "table3_main_360m") -> pd.DataFrame:
    """A paper table with the model columns of `comparison_table` (family, router, kv,
    sharing, N_r, params_non_emb, flops_used, tokens, val_nll, fs:<task> as fractions,
    fewshot_avg), plus "paper_model" (the paper's row label) and "protocol" ("isoflop" or
    "fixed_tokens"). Only tables with Model, Router, KV and Nr columns have such rows."""
    raw = load_paper_table(name)
    if not {"Model", "Router", "KV", "Nr"} <= set(raw.columns):
        raise MorBenchError(f"paper table {name!r} has no Model/Router/KV/Nr columns to "
                            "match runs on; use load_paper_table for it")
    out = pd.DataFrame({
        "paper_model": raw["Model"],
        "family": raw["Model"].str.split().str[0].str.lower(),
        "router": [_key(v, _ROUTERS) for v in raw["Router"]],
        "kv": [_key(v, _KV) for v in raw["KV"]],
        "sharing": [_key(v, _SHARING) for v in raw.get("Share", [None] * len(raw))],
        "N_r": raw["Nr"].astype(float),
        "params_non_emb": [_count(v) for v in raw["Param"]],
        "flops_used": raw["FLOPs"].astype(float) * 1e18,
        "tokens": [_count(v) for v in raw["N_tok"]],
        "val_nll": raw["NLL"].astype(float) if "NLL" in raw else math.nan,
        "protocol": ["fixed_tokens" if "fixed" in m else "isoflop" for m in raw["Model"]],
    })
    for col, ours in _TASKS.items():
        out[ours] = raw[col].astype(float) / 100 if col in raw else math.nan
    out["model"] = raw["Model"]
    out["budget"] = [f"{f:.6g} flops" for f in out["flops_used"]]
    return out


def _same(a: Any, b: Any) -> bool:
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))
    return (missing(a) and missing(b)) or (not missing(a) and not missing(b) and a == b)


def _matches(row: pd.Series, paper: pd.DataFrame) -> pd.DataFrame:
    """The paper rows of the same family, router, KV and N_r, under the run's protocol."""
    same = paper[[all(_same(row[k], p[k]) for k in ("family", "router", "kv", "N_r"))
                  for _, p in paper.iterrows()]]
    iso = same[same["protocol"] == "isoflop"]
    if str(row["budget"]).endswith("tokens"):
        fixed = same[same["protocol"] == "fixed_tokens"]
        return fixed if not fixed.empty else iso
    return iso


def paper_view(our_table: pd.DataFrame, name: str = "table3_main_360m") -> pd.DataFrame:
    """Each row of a comparison table (`reports.table.comparison_table`) in the Table 3
    layout, source "this run", followed by the paper's row(s) for the same family, router,
    KV strategy and N_r (source "paper (arXiv 2507.10524, Table 3)"); a row without a paper
    counterpart is followed by a paper row with every value missing. "Run" names our run
    on both. Display strings, None where missing."""
    paper = paper_rows(name)
    label = source_label(name)
    ours = paper_layout(our_table)
    theirs = paper_layout(paper)
    theirs["Model"] = paper["paper_model"].to_numpy()
    extra = [c for c in ours.columns if c not in VIEW_KEYS and c not in (
        "Budget", "Seeds", "Time", "Mem", "Tok/s", "Infer tok/s", "Infer vs vanilla",
        "vs vanilla")]  # our benchmarks the paper does not have
    columns = VIEW_KEYS[:-1] + extra + ["Avg"]
    rows = []
    for i, row in our_table.reset_index(drop=True).iterrows():
        rows.append({**ours.iloc[i].to_dict(), "source": THIS_RUN})
        found = _matches(row, paper)
        if found.empty:
            rows.append({"source": label, "Run": row["model"]})
        for j in found.index:
            rows.append({**theirs.loc[j].to_dict(), "source": label, "Run": row["model"]})
    view = pd.DataFrame(rows, columns=columns).astype(object)
    return view.where(view.notna(), None)
