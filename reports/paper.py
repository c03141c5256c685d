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

from reports.frame import ReportError, averaged_columns, is_missing
from reports.stats import lower_is_better

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


# --- the paper's Table 3 layout ----------------------------------------------------------------
FAMILY_LABELS = {"vanilla": "Vanilla", "recursive": "Recursive", "mor": "MoR"}
SHARING_LABELS = {"cycle": "Cyc", "sequence": "Seq", "middle_cycle": "M-Cyc",
                  "middle_sequence": "M-Seq"}
# The paper's benchmark abbreviations, in its column order (MMLU: any mmlu* task or group).
TASK_LABELS = {"lambada_openai": "LD", "hellaswag": "HS", "piqa": "PQ", "winogrande": "WG",
               "arc_merged": "ARC", "arc_easy": "ARC-e", "arc_challenge": "ARC-c",
               "mmlu": "MMLU"}
# Layout column of each table metric that significance marks can land on.
METRIC_LABELS = {"val_nll": "NLL", "fewshot_avg": "Avg", "train_time_s": "Time",
                 "peak_mem_mb": "Mem", "tokens_per_s": "Tok/s",
                 "infer_tokens_per_s": "Infer tok/s"}
SIGNIFICANCE_NOTE = (
    "`±`: half-width of the 95% Student-t interval over seeds (none with one seed). `*`: "
    "the difference from the vanilla model of the same budget is significant (p < 0.05, "
    "95% interval excluding 0, and at least 2% of vanilla's value; paired bootstrap over "
    "the same items for few-shot accuracy, Welch t-test over seeds otherwise). `vs "
    "vanilla` lists those differences; `n.s.`: tested, none significant; `-`: nothing "
    "testable (one seed, no per-item results). An unmarked difference is no evidence that "
    "either model is better.")


def task_label(task: str) -> str:
    """The paper's abbreviation of an lm-eval task ("hellaswag_local" -> "HS"), else the
    task's own name."""
    base = task.removesuffix("_local")
    return "MMLU" if base.startswith("mmlu") else TASK_LABELS.get(base, task)


def metric_label(metric: str) -> str:
    """The paper-layout column a table metric is shown in."""
    if metric.startswith("fs:"):
        return task_label(metric[3:])
    return METRIC_LABELS.get(metric, metric)


def _task_order(col: str) -> tuple[int, str]:
    order = list(dict.fromkeys(TASK_LABELS.values()))
    label = metric_label(col)
    return (order.index(label) if label in order else len(order), col)


def si_count(value: float) -> str:
    """3 significant digits with K/M/B/T, as the paper writes parameters and tokens."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _cell(value: Any, fmt, half: Any = math.nan, mark: bool = False) -> str | None:
    if is_missing(value):
        return None
    text = fmt(value)
    if not is_missing(half):
        text += f" ± {fmt(half).lstrip('+')}"
    return text + ("*" if mark else "")


def _verdicts(tests: pd.DataFrame | None) -> dict[tuple[str, str], pd.DataFrame]:
    if tests is None or tests.empty:
        return {}
    return {key: group for key, group in tests.groupby(["model", "budget"], sort=False)}


def _summary(found: pd.DataFrame | None) -> str | None:
    if found is None:
        return None
    sig = found[found["significant"].astype(bool)]
    if sig.empty:
        return "n.s."
    parts = {"better": [], "worse": []}
    for _, t in sig.iterrows():
        better = (t["diff"] < 0) == lower_is_better(t["metric"])
        parts["better" if better else "worse"].append(metric_label(t["metric"]))
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in parts.items() if v)


def paper_layout(table: pd.DataFrame, tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """The comparison table as the paper's Table 3: display strings (None where missing).

    Columns: Model, Run, Router, KV, Share, N_r, Params, Budget, FLOPs, N_tok, NLL, the
    benchmarks (LD HS PQ WG ARC MMLU, then others), Avg, Seeds, then training time, peak
    memory and training tokens/s relative to vanilla (Time, Mem, Tok/s -- interleaved when
    the table has `speed_rel_tokens_per_s`, else sequential and headed "Tok/s
    (sequential)"; Time is each run's own wall time, sequential), inference tokens/s
    and its ratio to vanilla when measured, and "vs vanilla". Seed means show
    `mean ± half-width` when there are several seeds; `tests` (TEST_COLUMNS of
    `reports.stats`) put a `*` on significant differences and fill "vs vanilla"."""
    verdicts = _verdicts(tests)
    fs_cols = averaged_columns(sorted((c for c in table.columns if c.startswith("fs:")
                                       and not c.endswith("_ci95")), key=_task_order))
    if "fewshot_avg" in table.columns:
        fs_cols.append("fewshot_avg")
    infer = "infer_tokens_per_s" in table.columns
    # Training tokens/s relative to vanilla: the interleaved measurement when the run took
    # it (metrics.speed; docs/records.md), else the sequential per-run ratio.
    # The fallback is labelled: a sequential ratio is information, not a comparison.
    tok_s = (("Tok/s", "speed_rel_tokens_per_s", None) if "speed_rel_tokens_per_s" in table
             else ("Tok/s (sequential)", "rel_tokens_per_s", "tokens_per_s"))
    acc = lambda v: f"{100 * v:.1f}"
    ratio = lambda v: f"{v:.2f}x"
    rows = []
    for _, r in table.iterrows():
        found = verdicts.get((r["model"], r["budget"]))
        sig = set() if found is None else set(found.loc[found["significant"].astype(bool),
                                                        "metric"])
        ci = lambda col, r=r: r.get(f"{col}_ci95", math.nan)
        row = {
            "Model": FAMILY_LABELS.get(r["family"], r["family"]), "Run": r["model"],
            "Router": None if is_missing(r["router"]) else str(r["router"]).capitalize(),
            "KV": None if is_missing(r["kv"]) else str(r["kv"]).capitalize(),
            "Share": (None if is_missing(r.get("sharing"))
                      else SHARING_LABELS.get(r["sharing"], r["sharing"])),
            "N_r": None if is_missing(r["N_r"]) else str(int(r["N_r"])),
            "Params": _cell(r["params_non_emb"], si_count), "Budget": r["budget"],
            "FLOPs": _cell(r["flops_used"], lambda v: f"{v:.3g}"),
            "N_tok": _cell(r["tokens"], si_count),
            "NLL": _cell(r["val_nll"], lambda v: f"{v:.4f}", ci("val_nll"),
                         "val_nll" in sig),
        }
        for col in fs_cols:
            row[metric_label(col)] = _cell(r[col], acc, ci(col), col in sig)
        row["Seeds"] = _cell(r.get("seeds", math.nan), lambda v: f"{int(v)}")
        for label, col, src in (("Time", "rel_train_time", "train_time_s"),
                                ("Mem", "rel_peak_mem", "peak_mem_mb"), tok_s):
            row[label] = _cell(r.get(col, math.nan), ratio, mark=src in sig)
        if infer:
            row["Infer tok/s"] = _cell(r["infer_tokens_per_s"], lambda v: f"{v:,.0f}",
                                       ci("infer_tokens_per_s"), "infer_tokens_per_s" in sig)
            row["Infer vs vanilla"] = _cell(r["rel_infer_tokens_per_s"], ratio)
        row["vs vanilla"] = "reference" if r["family"] == "vanilla" else _summary(found)
        rows.append(row)
    out = pd.DataFrame(rows).astype(object)
    return out.where(out.notna(), None)



def source_label(name: str) -> str:
    """The "source" column of a paper table's rows, e.g. "paper (arXiv 2507.10524, Table 3)"."""
    return f"paper (arXiv 2507.10524, {PAPER_TABLES[name]})"


def load_paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables (PAPER_TABLES) as transcribed; "-" (not applicable or not
    reported) reads as missing."""
    if name not in PAPER_TABLES:
        raise ReportError(f"no paper table {name!r}; choose one of "
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
        raise ReportError(f"paper table {name!r} has no Model/Router/KV/Nr columns to "
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
    return (is_missing(a) and is_missing(b)) or (not is_missing(a) and not is_missing(b)
                                                 and a == b)


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
