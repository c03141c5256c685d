"""The comparison table: a pure function of result records (no model is run here).

One row per model (seeds averaged, with their count; budgets kept apart): parameters,
FLOPs, tokens, validation NLL, training time, tokens/s, peak memory, and each relative to
the vanilla model trained under the same budget in the same suite run. A metric a record
lacks stays missing (shown as "-"), never zero.

    mor-bench report RUN_DIR      -> RUN_DIR/report.md, RUN_DIR/report.csv
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from evals.provenance import hardware_summary
from evals.records import load_records

COLUMNS = [
    "model", "family", "router", "kv", "N_r", "layers", "eval_routing", "budget", "seeds",
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


# The paper's metric per task (MOR_SPEC section 6); anything else reports acc.
_ACC_NORM_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge")


def task_metric(task: str) -> str:
    base = task.removesuffix("_local")
    return "acc_norm" if base in _ACC_NORM_TASKS else "acc"


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
    inside_mmlu = {sub for name, res in tasks.items() if name.startswith("mmlu")
                   for sub in res.get("subtasks") or []}
    out: dict[str, float] = {}
    sizes: dict[str, float] = {}
    for task, res in sorted(tasks.items()):
        is_mmlu_group = task.startswith("mmlu") and res.get("subtasks")
        if task in inside_mmlu or (res.get("subtasks") and not is_mmlu_group):
            continue
        value = res.get("metrics", {}).get(task_metric(task))
        if isinstance(value, (int, float)):
            out[f"fs:{task}"] = float(value)
            sizes[task.removesuffix("_local")] = float(res.get("n") or 0)
    in_avg = dict(out)
    arc = {k: out.get(f"fs:{k}", out.get(f"fs:{k}_local")) for k in ("arc_easy",
                                                                     "arc_challenge")}
    if all(v is not None for v in arc.values()) and sizes.get("arc_easy"):
        n_e, n_c = sizes["arc_easy"], sizes["arc_challenge"]
        merged = (arc["arc_easy"] * n_e + arc["arc_challenge"] * n_c) / (n_e + n_c)
        out["fs:arc_merged"] = merged
        in_avg = {k: v for k, v in in_avg.items() if "arc_" not in k}
        in_avg["fs:arc_merged"] = merged
    if in_avg:
        out["fewshot_avg"] = sum(in_avg.values()) / len(in_avg)
    return out


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
        })
    return pd.DataFrame(rows)


def comparison_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    df = records_frame(records)
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = ["model", "budget"]
    static = ["family", "router", "kv", "N_r", "layers", "eval_routing", "params_non_emb",
              "flops_per_token", "budget_kind", "budget_value"]
    measured = ["flops_per_token_effective", "flops_used", "tokens", "val_nll",
                "val_nll_causal", "val_bpb", "sampling_acc", "dead_token_ratio", "maxvio",
                "train_time_s", "tokens_per_s", "peak_mem_mb", "mfu"]
    fs_cols = sorted(c for c in df.columns if c.startswith("fs:"))
    if fs_cols:
        measured = measured + fs_cols + ["fewshot_avg"]
    agg = df.groupby(keys, sort=False, dropna=False).agg(
        **{c: (c, "first") for c in static}, **{c: (c, "mean") for c in measured},
        seeds=("seed", "count")).reset_index()
    rel = {"rel_params": ("params_non_emb", "ratio"),
           "rel_flops_per_token": ("flops_per_token", "ratio"),
           "rel_tokens": ("tokens", "ratio"),
           "rel_val_nll": ("val_nll", "diff"), "rel_train_time": ("train_time_s", "ratio"),
           "rel_tokens_per_s": ("tokens_per_s", "ratio"), "rel_peak_mem": ("peak_mem_mb",
                                                                          "ratio")}
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
    # Vanilla first (the reference of the relative columns), then recursive, then MoR.
    agg["_family"] = agg["family"].map({"vanilla": 0, "recursive": 1, "mor": 2})
    agg = agg.sort_values(["budget_kind", "budget_value", "_family", "N_r", "model"],
                          kind="stable",
                          na_position="first").drop(columns="_family")
    columns = list(COLUMNS)
    if fs_cols:  # few-shot accuracies sit after the validation metrics
        at = columns.index("maxvio") + 1
        columns[at:at] = fs_cols + ["fewshot_avg"]
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
}


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for display; missing values as "-"."""
    out = table.copy().astype(object)
    for col in out.columns:
        fmt = _FORMATS.get(col) or (_FORMATS["fewshot_avg"] if col.startswith("fs:") else None)
        out[col] = [("-" if v is None or (isinstance(v, float) and math.isnan(v))
                     else (fmt(v) if fmt else str(v))) for v in table[col]]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    shown = format_table(table)
    header = "| " + " | ".join(shown.columns) + " |"
    sep = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = [header, sep] + ["| " + " | ".join(map(str, row)) + " |"
                             for row in shown.itertuples(index=False)]
    return "\n".join(lines)


def render_report(run_dir: str | Path) -> dict[str, Any]:
    """Write report.md and report.csv into the run directory; return paths and the table."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    table = comparison_table(records)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    suite = records[0].get("suite", {})
    hw = ok[0]["provenance"]["hardware"] if ok else {}
    git = ok[0]["provenance"]["git"] if ok else {}
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
        "", to_markdown(table), "",
    ]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['run_id']}`: {r.get('error')}"
                                           for r in failed] + [""]
    md = "\n".join(line for line in lines if line is not None)
    (run_dir / "report.md").write_text(md)
    table.to_csv(run_dir / "report.csv", index=False)
    return {"markdown": str(run_dir / "report.md"), "csv": str(run_dir / "report.csv"),
            "table": table, "n_ok": len(ok), "n_failed": len(failed)}
