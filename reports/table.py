"""The comparison table: a pure function of result records (no model is run here).

One row per model (seeds averaged, with their count; budgets kept apart): parameters,
FLOPs, tokens, validation NLL, training time, tokens/s, peak memory, and each relative to
the vanilla model trained under the same budget in the same suite run. A metric a record
lacks stays missing (shown as "-"), never zero. Metrics over several seeds also carry the
half-width of their 95% Student-t interval (`<metric>_ci95`; none for one seed).

`paper_layout` arranges it like the paper's Table 3 (Model, Router, KV, Share, N_r, Params,
FLOPs, tokens, NLL, per-task accuracy, Avg; plus training time, peak memory and throughput
relative to vanilla), with `mean ± half-width` and a `*` on differences from vanilla that
are significant (`reports.stats`); `render_formats` writes any table as Markdown, LaTeX,
CSV and HTML.

    mor-bench report RUN_DIR      -> RUN_DIR/report.md, report.csv (every column, numbers),
                                     report.tex, report_tables.html, report_layout.csv,
                                     report_tests.csv
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from evals.suite.provenance import hardware_summary
from evals.suite.record import load_records
from reports.stats import ci_half_width, lower_is_better, significance_vs_vanilla

COLUMNS = [
    "model", "family", "router", "kv", "sharing", "N_r", "layers", "eval_routing", "budget",
    "seeds",
    "params_non_emb", "flops_per_token", "flops_per_token_effective", "flops_used", "tokens",
    "val_nll", "val_nll_causal", "val_bpb", "sampling_acc", "dead_token_ratio", "maxvio",
    "train_time_s", "tokens_per_s", "peak_mem_mb", "mfu", "rel_params", "rel_flops_per_token",
    "rel_tokens", "rel_val_nll", "rel_train_time", "rel_tokens_per_s", "rel_peak_mem",
]


def _metric(rec: dict[str, Any], *path: str) -> float:
    """A numeric metric at `path` under rec["metrics"], NaN when absent (never 0)."""
    value: Any = rec.get("metrics", {})
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) else math.nan


# The paper's metric per task (docs/protocol.md §6); anything else reports acc.
_ACC_NORM_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge")


def task_metric(task: str) -> str:
    """The metric the paper reports for an lm-eval task (acc_norm or acc)."""
    base = task.removesuffix("_local")
    return "acc_norm" if base in _ACC_NORM_TASKS else "acc"


def _shown_tasks(tasks: dict[str, Any]) -> dict[str, list[str]]:
    """The few-shot tasks that get a column -> the leaf tasks whose items they cover.
    Tasks, not groups, are shown -- except an MMLU group, one benchmark in the paper."""
    inside_mmlu = {sub for name, res in tasks.items() if name.startswith("mmlu")
                   for sub in res.get("subtasks") or []}

    def leaves(name: str, seen: tuple[str, ...] = ()) -> list[str]:
        subs = (tasks.get(name) or {}).get("subtasks") or []
        if not subs or name in seen:
            return [name]
        return [leaf for sub in subs for leaf in leaves(sub, (*seen, name))]

    return {task: leaves(task) for task, res in sorted(tasks.items())
            if task not in inside_mmlu
            and not (res.get("subtasks") and not task.startswith("mmlu"))}


def fewshot_parts(tasks: dict[str, Any]) -> dict[str, list[str]]:
    """{"fs:<task>": leaf tasks} for a record's few-shot tasks (metrics.fewshot.tasks), plus
    "fs:arc_merged" (ARC-Easy and ARC-Challenge items together) when both are there: which
    per-item results make each few-shot column."""
    parts = {f"fs:{task}": leaves for task, leaves in _shown_tasks(tasks).items()}
    arc = [parts.get(f"fs:{k}", parts.get(f"fs:{k}_local")) for k in ("arc_easy",
                                                                      "arc_challenge")]
    if all(arc):
        parts["fs:arc_merged"] = arc[0] + arc[1]
    return parts


def averaged_columns(columns: list[str]) -> list[str]:
    """The few-shot columns that make "fewshot_avg": every task once, ARC through its
    merged column when there is one."""
    cols = [c for c in columns if c.startswith("fs:")]
    if "fs:arc_merged" in cols:
        cols = [c for c in cols if "arc_" not in c or c == "fs:arc_merged"]
    return cols


def fewshot_scores(rec: dict[str, Any]) -> dict[str, float]:
    """{"fs:<task>": score} under the paper's metric for each task of a record's few-shot
    results, plus "fewshot_avg".

    Tasks, not groups, are listed -- except MMLU, reported as one benchmark (its group's
    size-weighted acc) as in the paper. ARC-Easy and ARC-Challenge are listed apart and also
    merged into "fs:arc_merged", accuracy over all items of both (item-weighted mean of
    their acc_norm); the average then counts ARC once, through the merged value, like the
    paper's Avg column."""
    fs = (rec.get("metrics") or {}).get("fewshot") or {}
    tasks = fs.get("tasks") or {}
    out: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for task in _shown_tasks(tasks):
        value = tasks[task].get("metrics", {}).get(task_metric(task))
        if isinstance(value, (int, float)):
            out[f"fs:{task}"] = float(value)
            sizes[task.removesuffix("_local")] = float(tasks[task].get("n") or 0)
    arc = {k: out.get(f"fs:{k}", out.get(f"fs:{k}_local")) for k in ("arc_easy",
                                                                     "arc_challenge")}
    if all(v is not None for v in arc.values()) and sizes.get("arc_easy"):
        n_e, n_c = sizes["arc_easy"], sizes["arc_challenge"]
        merged = (arc["arc_easy"] * n_e + arc["arc_challenge"] * n_c) / (n_e + n_c)
        out["fs:arc_merged"] = merged
    in_avg = averaged_columns(list(out))
    if in_avg:
        out["fewshot_avg"] = sum(out[c] for c in in_avg) / len(in_avg)
    return out


# Inference benchmark results (metrics["infer"]) -> table columns; present only when some
# record has them.
INFER_COLUMNS = ["infer_tokens_per_s", "infer_ms_per_token", "infer_batch_size",
                 "infer_kv_cache_mb", "infer_mean_depth"]


def _infer(rec: dict[str, Any]) -> dict[str, float]:
    if not isinstance((rec.get("metrics") or {}).get("infer"), dict):
        return {}
    return {"infer_tokens_per_s": _metric(rec, "infer", "tokens_per_s"),
            "infer_ms_per_token": _metric(rec, "infer", "ms_per_token"),
            "infer_batch_size": _metric(rec, "infer", "batch_size"),
            "infer_kv_cache_mb": _metric(rec, "infer", "kv_cache_bytes") / 2**20,
            "infer_mean_depth": _metric(rec, "infer", "mean_depth"),
            "infer_rel_reported": _metric(rec, "infer", "rel_tokens_per_s")}


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per successful record, flat columns."""
    rows = []
    for r in records:
        if r.get("status") != "ok":
            continue
        budget = r["budget"]
        rows.append({
            "model": r["model_name"], "family": r["family"],
            "router": r.get("router"), "kv": r.get("kv"), "eval_routing": r.get("eval_routing"),
            "sharing": (r["config"].get("sharing") if r["family"] != "vanilla" else None),
            "N_r": r["config"]["num_recursions"] if r["family"] != "vanilla" else None,
            "layers": r.get("layer_plan"),
            "budget": f"{budget['value']:.6g} {budget['kind']}",
            "budget_kind": budget["kind"], "budget_value": float(budget["value"]),
            "seed": r["seed"],
            "params_non_emb": r.get("params", {}).get("non_embedding"),
            "flops_per_token": r["plan"]["flops_per_token"],
            "flops_used": _metric(r, "flops_used"), "tokens": _metric(r, "tokens"),
            "val_nll": _metric(r, "val_nll"), "val_bpb": _metric(r, "val_bpb"),
            "val_nll_causal": _metric(r, "val_nll_by_routing", "causal"),
            "flops_per_token_effective": _metric(r, "flops_per_token_effective"),
            # Diagnostics as the paper reports them: sampling accuracy and dead tokens of
            # expert-choice under top-k, load violation of token-choice.
            "sampling_acc": _metric(r, "val_routing_by_mode", "topk", "sampling_acc"),
            "dead_token_ratio": _metric(r, "val_routing_by_mode", "topk", "dead_token_ratio"),
            "maxvio": _metric(r, "val_routing", "maxvio"),
            **fewshot_scores(r),
            "train_time_s": _metric(r, "train_time_s"),
            "tokens_per_s": _metric(r, "tokens_per_s"),
            "peak_mem_mb": _metric(r, "peak_mem_bytes") / 2**20, "mfu": _metric(r, "mfu"),
            **_infer(r),
        })
    return pd.DataFrame(rows)


# Measured metrics that get a seed confidence interval (`<metric>_ci95`), besides the
# few-shot scores and inference tokens/s.
CI_METRICS = ["val_nll", "val_nll_causal", "val_bpb", "train_time_s", "tokens_per_s",
              "peak_mem_mb"]


def comparison_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, budget): seed means, their 95% half-widths, seed count and the
    columns relative to the vanilla model of the same budget."""
    df = records_frame(records)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = ["model", "budget"]
    static = ["family", "router", "kv", "sharing", "N_r", "layers", "eval_routing",
              "params_non_emb", "flops_per_token", "budget_kind", "budget_value"]
    measured = ["flops_per_token_effective", "flops_used", "tokens", "val_nll",
                "val_nll_causal", "val_bpb", "sampling_acc", "dead_token_ratio", "maxvio",
                "train_time_s", "tokens_per_s", "peak_mem_mb", "mfu"]
    fs_cols = sorted(c for c in df.columns if c.startswith("fs:"))
    if fs_cols:
        measured = measured + fs_cols + ["fewshot_avg"]
    infer_cols = [c for c in INFER_COLUMNS if c in df]
    if infer_cols:
        measured = measured + infer_cols + ["infer_rel_reported"]
    grouped = df.groupby(keys, sort=False, dropna=False)
    agg = grouped.agg(**{c: (c, "first") for c in static}, **{c: (c, "mean") for c in measured},
                      seeds=("seed", "count")).reset_index()
    ci_cols = CI_METRICS + fs_cols + (["fewshot_avg"] if fs_cols else []) + (
        ["infer_tokens_per_s"] if infer_cols else [])
    for col in ci_cols:
        agg[f"{col}_ci95"] = grouped[col].agg(ci_half_width).to_numpy()
    rel = {"rel_params": ("params_non_emb", "ratio"),
           "rel_flops_per_token": ("flops_per_token", "ratio"),
           "rel_tokens": ("tokens", "ratio"),
           "rel_val_nll": ("val_nll", "diff"), "rel_train_time": ("train_time_s", "ratio"),
           "rel_tokens_per_s": ("tokens_per_s", "ratio"), "rel_peak_mem": ("peak_mem_mb",
                                                                          "ratio")}
    if infer_cols:
        rel["rel_infer_tokens_per_s"] = ("infer_tokens_per_s", "ratio")
    for col in rel:
        agg[col] = math.nan
    for _, group in agg.groupby("budget", sort=False):
        base = group[group["family"] == "vanilla"]
        if base.empty:
            continue
        ref = base.iloc[0]
        for col, (src, how) in rel.items():
            agg.loc[group.index, col] = (group[src] - ref[src] if how == "diff"
                                         else group[src] / ref[src])
    if infer_cols:  # no vanilla measured here: the inference benchmark's own ratio
        agg["rel_infer_tokens_per_s"] = agg["rel_infer_tokens_per_s"].fillna(
            agg["infer_rel_reported"])
    # Vanilla first (the reference of the relative columns), then recursive, then MoR.
    agg["_family"] = agg["family"].map({"vanilla": 0, "recursive": 1, "mor": 2})
    agg = agg.sort_values(["budget_kind", "budget_value", "_family", "N_r", "model"],
                          kind="stable",
                          na_position="first").drop(columns="_family")
    columns = list(COLUMNS)
    if fs_cols:  # few-shot accuracies sit after the validation metrics
        at = columns.index("maxvio") + 1
        columns[at:at] = fs_cols + ["fewshot_avg"]
    if infer_cols:
        columns += infer_cols + ["rel_infer_tokens_per_s"]
    columns += [f"{c}_ci95" for c in ci_cols]
    return agg[columns].reset_index(drop=True)


_FORMATS = {
    "params_non_emb": lambda v: f"{v / 1e6:.2f}M", "flops_per_token": lambda v: f"{v:.3g}",
    "flops_used": lambda v: f"{v:.3g}", "tokens": lambda v: f"{v:,.0f}",
    "flops_per_token_effective": lambda v: f"{v:.3g}",
    "sampling_acc": lambda v: f"{100 * v:.1f}%", "dead_token_ratio": lambda v: f"{100 * v:.1f}%",
    "maxvio": lambda v: f"{v:.3f}", "fewshot_avg": lambda v: f"{100 * v:.1f}",
    "val_nll": lambda v: f"{v:.4f}", "val_nll_causal": lambda v: f"{v:.4f}",
    "val_bpb": lambda v: f"{v:.4f}",
    "train_time_s": lambda v: f"{v:.1f}", "tokens_per_s": lambda v: f"{v:,.0f}",
    "peak_mem_mb": lambda v: f"{v:,.0f}", "mfu": lambda v: f"{100 * v:.1f}%",
    "rel_val_nll": lambda v: f"{v:+.4f}", "rel_train_time": lambda v: f"{v:.2f}x",
    "rel_params": lambda v: f"{v:.2f}x", "rel_flops_per_token": lambda v: f"{v:.2f}x",
    "rel_tokens": lambda v: f"{v:.2f}x",
    "rel_tokens_per_s": lambda v: f"{v:.2f}x", "rel_peak_mem": lambda v: f"{v:.2f}x",
    "N_r": lambda v: f"{int(v)}",
    "infer_tokens_per_s": lambda v: f"{v:,.0f}", "infer_ms_per_token": lambda v: f"{v:.3f}",
    "infer_batch_size": lambda v: f"{v:.0f}", "infer_kv_cache_mb": lambda v: f"{v:,.1f}",
    "infer_mean_depth": lambda v: f"{v:.2f}", "rel_infer_tokens_per_s": lambda v: f"{v:.2f}x",
}


def _formatter(col: str):
    base = col.removesuffix("_ci95")
    fmt = _FORMATS.get(base) or (_FORMATS["fewshot_avg"] if base.startswith("fs:") else None)
    if col.endswith("_ci95") and fmt is not None:
        return lambda v: "±" + fmt(v).lstrip("+")
    return fmt


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_table(table: pd.DataFrame, missing: str = "-") -> pd.DataFrame:
    """Strings for display; missing values as `missing` ("-"); strings pass unchanged."""
    out = table.copy().astype(object)
    for col in out.columns:
        fmt = _formatter(col)
        out[col] = [(missing if _missing(v) else (fmt(v) if fmt and not isinstance(v, str)
                                                  else str(v))) for v in table[col]]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table of `format_table(table)`."""
    shown = format_table(table)
    header = "| " + " | ".join(shown.columns) + " |"
    sep = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = [header, sep] + ["| " + " | ".join(map(str, row)) + " |"
                             for row in shown.itertuples(index=False)]
    return "\n".join(lines)


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
    "the difference from the vanilla model of the same budget is significant (p < 0.05 and "
    "95% interval excluding 0; paired bootstrap over the same items for few-shot accuracy, "
    "Welch t-test over seeds otherwise). `vs vanilla` lists those differences; `n.s.`: "
    "tested, none significant; `-`: nothing testable (one seed, no per-item results). An "
    "unmarked difference is no evidence that either model is better.")


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
    if _missing(value):
        return None
    text = fmt(value)
    if not _missing(half):
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
    memory and training tokens/s relative to vanilla (Time, Mem, Tok/s), inference tokens/s
    and its ratio to vanilla when measured, and "vs vanilla". Seed means show
    `mean ± half-width` when there are several seeds; `tests` (TEST_COLUMNS of
    `reports.stats`) put a `*` on significant differences and fill "vs vanilla"."""
    verdicts = _verdicts(tests)
    fs_cols = averaged_columns(sorted((c for c in table.columns if c.startswith("fs:")
                                       and not c.endswith("_ci95")), key=_task_order))
    if "fewshot_avg" in table.columns:
        fs_cols.append("fewshot_avg")
    infer = "infer_tokens_per_s" in table.columns
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
            "Router": None if _missing(r["router"]) else str(r["router"]).capitalize(),
            "KV": None if _missing(r["kv"]) else str(r["kv"]).capitalize(),
            "Share": (None if _missing(r.get("sharing"))
                      else SHARING_LABELS.get(r["sharing"], r["sharing"])),
            "N_r": None if _missing(r["N_r"]) else str(int(r["N_r"])),
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
                                ("Mem", "rel_peak_mem", "peak_mem_mb"),
                                ("Tok/s", "rel_tokens_per_s", "tokens_per_s")):
            row[label] = _cell(r.get(col, math.nan), ratio, mark=src in sig)
        if infer:
            row["Infer tok/s"] = _cell(r["infer_tokens_per_s"], lambda v: f"{v:,.0f}",
                                       ci("infer_tokens_per_s"), "infer_tokens_per_s" in sig)
            row["Infer vs vanilla"] = _cell(r["rel_infer_tokens_per_s"], ratio)
        row["vs vanilla"] = "reference" if r["family"] == "vanilla" else _summary(found)
        rows.append(row)
    out = pd.DataFrame(rows).astype(object)
    return out.where(out.notna(), None)


# --- output formats --------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "±": r"$\pm$"}


def _tex(text: Any) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def render_formats(table: pd.DataFrame) -> dict[str, str]:
    """{"md", "tex", "csv", "html"} of a table (numbers are formatted by `format_table`,
    strings kept): missing values are "-", empty in the CSV; the LaTeX is a booktabs
    tabular with special characters escaped; the HTML a bare <table> fragment."""
    shown = format_table(table)
    tex = shown.map(_tex)
    tex.columns = [_tex(c) for c in shown.columns]
    return {
        "md": to_markdown(table),
        "tex": tex.to_latex(index=False, escape=False, column_format="l" * len(tex.columns)),
        "csv": format_table(table, missing="").to_csv(index=False),
        "html": shown.to_html(index=False, border=0, classes="mor-bench-table"),
    }


def render_report(run_dir: str | Path) -> dict[str, Any]:
    """Write report.md, report.csv (the full table, numbers), report.tex and
    report_tables.html (the Table 3 layout and the paper reference view), report_layout.csv
    and report_tests.csv (significance tests vs vanilla) into the run directory; return
    their paths and the frames."""
    from reports.paper import PAPER_NOTE, paper_view

    run_dir = Path(run_dir)
    records = load_records(run_dir)
    table = comparison_table(records)
    tests = significance_vs_vanilla(records, run_dir)
    layout = paper_layout(table, tests)
    view = paper_view(table)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    suite = records[0].get("suite", {})
    hw = ok[0]["provenance"]["hardware"] if ok else {}
    git = ok[0]["provenance"]["git"] if ok else {}
    full = table[[c for c in table.columns if not c.endswith("_ci95")]]
    layout_out, view_out = render_formats(layout), render_formats(view)
    lines = [
        f"# mor-bench report: {suite.get('name', run_dir.name)}", "",
        f"- run directory: `{run_dir}`",
        f"- suite: `{suite.get('source')}` (sha256 {str(suite.get('sha256'))[:12]})",
        f"- hardware: {hardware_summary(hw) if hw else 'unknown'}",
        f"- code: {git.get('commit') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}",
        f"- runs: {len(ok)} ok, {len(failed)} failed",
        "- MoR `val_nll` uses top-k routing over each window (the paper's protocol; it is "
        "NOT causal: later tokens decide which earlier tokens recurse). `val_nll_causal` "
        "routes each token by its own router (sigmoid > 0.5) and is causal."
        if any(r.get("eval_routing") == "topk" for r in ok) else "",
        "- `sampling_acc` / `dead_token_ratio` (expert-choice, validation under top-k): how "
        "often the causal rule agrees with top-k membership / share of positions no sequence "
        "sends through the last step. `maxvio` (token-choice): (max load - mean) / mean. "
        "`flops_per_token_effective`: the paper convention with the routing the run took."
        if ok and any(r.get("family") == "mor" for r in ok) else "",
        "", "Relative columns compare with the vanilla model of the same budget in this run "
        "(NLL as a difference, the rest as ratios). Tokens/s and time cover optimizer steps "
        "only; peak memory is "
        + (f"`{ok[0]['metrics'].get('peak_mem_kind')}`." if ok else "-"),
        "", to_markdown(full), "",
    ]
    if ok:
        lines += ["## As the paper's Table 3", "",
                  "Accuracies in %; Time, Mem and Tok/s (training) relative to vanilla. "
                  + SIGNIFICANCE_NOTE, "", layout_out["md"], ""]
    if not tests.empty:
        lines += ["## Significance tests vs vanilla", "",
                  to_markdown(tests.round({"diff": 4, "ci_low": 4, "ci_high": 4, "p": 4})
                              .assign(significant=tests["significant"].map(
                                  {True: "yes", False: "no"}))), ""]
    if ok:
        lines += ["## Paper reference", "", PAPER_NOTE, "", view_out["md"], ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run_id']}`: {r.get('error')}"
                                           for r in failed] + [""]
    md = "\n".join(line for line in lines if line is not None)
    paths = {"markdown": run_dir / "report.md", "csv": run_dir / "report.csv",
             "latex": run_dir / "report.tex", "tables_html": run_dir / "report_tables.html",
             "layout_csv": run_dir / "report_layout.csv",
             "tests_csv": run_dir / "report_tests.csv"}
    paths["markdown"].write_text(md)
    table.to_csv(paths["csv"], index=False)
    paths["latex"].write_text(
        "% mor-bench report tables (paper Table 3 layout; paper reference view)\n"
        + layout_out["tex"] + "\n" + view_out["tex"])
    paths["tables_html"].write_text(
        '<h3 id="table3">As the paper\'s Table 3</h3>\n' + layout_out["html"]
        + '\n<h3 id="paper">Paper reference</h3>\n' + view_out["html"] + "\n")
    paths["layout_csv"].write_text(layout_out["csv"])
    tests.to_csv(paths["tests_csv"], index=False)
    return {**{k: str(v) for k, v in paths.items()}, "table": table, "layout": layout,
            "paper_view": view, "tests": tests, "n_ok": len(ok), "n_failed": len(failed)}
