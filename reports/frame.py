"""Record access for every report: one accessor, one grouping, one few-shot aggregation.

The other report modules (table, stats, paper, figures, html, gate) read run records only
through this module and `evals.suite.record` (the schema, docs/records.md), so they agree
on what a missing value is, which runs form a group and what a few-shot score is.

Missing values: `get` / `metric` return None for a value a record lacks, holds as JSON
null, or holds as a non-finite or non-numeric value (`metric` only) -- never 0. Tables
built with pandas (`records_frame`) turn that None into NaN, pandas' missing value; `nan`
does the conversion.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from evals.suite.record import RecordError

FAMILY_ORDER = {"vanilla": 0, "recursive": 1, "mor": 2}
"""Row order of model families: vanilla (the reference), recursive, MoR."""


class ReportError(RecordError):
    """A report input other than a record is unusable (a baseline file, a paper table, a
    browser); the message says what to do. A RecordError, so the CLI handles both alike."""


# --------------------------------------------------------------------------------------------
# values


def get(rec: Any, *path: str) -> Any:
    """The value at `path` in a (nested) record, None where any key is absent."""
    value = rec
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def num(value: Any) -> float | None:
    """A finite number as float, else None (booleans, strings, NaN and inf are missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def metric(rec: dict[str, Any], *path: str) -> float | None:
    """A numeric value under rec["metrics"], None when missing."""
    return num(get(rec, "metrics", *path))


def nan(value: float | None) -> float:
    """None -> NaN, for pandas columns."""
    return math.nan if value is None else value


def is_missing(value: Any) -> bool:
    """None or a float NaN: what tables show as "-"."""
    return value is None or (isinstance(value, float) and math.isnan(value))


# --------------------------------------------------------------------------------------------
# runs


def ok_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def budget_label(rec: dict[str, Any]) -> str:
    """The budget a run was trained under, e.g. "1.2e+12 flops" (6 significant digits)."""
    b = rec.get("budget") or {}
    value = num(b.get("value"))
    return f"{math.nan if value is None else value:.6g} {b.get('kind', '?')}"


def model_name(rec: dict[str, Any]) -> str:
    return rec.get("model_name") or rec.get("run_id", "?")


def group_runs(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """{(model, budget label): the records of its seeds}, in the order first seen. One
    group = one row of the comparison table."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((model_name(rec), budget_label(rec)), []).append(rec)
    return groups


def vanilla_groups(groups: dict[tuple[str, str], list[dict[str, Any]]]
                   ) -> dict[str, tuple[str, str]]:
    """{budget label: the (model, budget) key of the first vanilla group of that budget}."""
    out: dict[str, tuple[str, str]] = {}
    for key, recs in groups.items():
        if recs and recs[0].get("family") == "vanilla":
            out.setdefault(key[1], key)
    return out


def relative_to_vanilla(table: pd.DataFrame, spec: dict[str, tuple[str, str]]) -> None:
    """Add the columns of `spec` ({column: (source column, "ratio" | "diff")}) to a table
    with one row per (model, budget) ("family" and "budget" columns): each row's value
    against the first vanilla row of its budget; NaN where the budget has no vanilla."""
    for col in spec:
        table[col] = math.nan
    for _, group in table.groupby("budget", sort=False):
        base = group[group["family"] == "vanilla"]
        if base.empty:
            continue
        ref = base.iloc[0]
        for col, (src, how) in spec.items():
            table.loc[group.index, col] = (group[src] - ref[src] if how == "diff"
                                           else group[src] / ref[src])


def is_contended(rec: dict[str, Any]) -> bool:
    """Whether the run's timings were taken on a contended machine (the record's top-level
    "load": {"cpu_s", "wall_s", "threads", "cpu_util", "loadavg_start", "loadavg_end",
    "contended", "reason"}); False for older records without it."""
    return get(rec, "load", "contended") is True


def contended_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"run_id", "model", "budget", "reason"}] of the successful runs flagged contended,
    in record order."""
    return [{"run_id": r.get("run_id"), "model": model_name(r), "budget": budget_label(r),
             "reason": get(r, "load", "reason") or "no reason recorded"}
            for r in ok_records(records) if is_contended(r)]


def has_load(records: list[dict[str, Any]]) -> bool:
    """Whether any record carries the load measurement (newer records)."""
    return any(isinstance(r.get("load"), dict) for r in records)


# --------------------------------------------------------------------------------------------
# few-shot results

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


def fewshot_tasks(rec: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"fs:<task>": {"value", "stderr", "n"}} of one record, under the paper's metric of
    each shown task (tasks, not groups -- except MMLU, one benchmark as in the paper).
    Tasks without a numeric value are left out; "stderr" is None when not recorded."""
    tasks = get(rec, "metrics", "fewshot", "tasks") or {}
    out: dict[str, dict[str, float | None]] = {}
    for task in _shown_tasks(tasks):
        res = tasks[task]
        m = task_metric(task)
        value = num(get(res, "metrics", m))
        if value is not None:
            out[f"fs:{task}"] = {"value": value, "stderr": num(get(res, "stderr", m)),
                                 "n": num(res.get("n")) or 0.0}
    return out


def fewshot_scores(rec: dict[str, Any]) -> dict[str, float]:
    """{"fs:<task>": score} (`fewshot_tasks`' values), plus "fs:arc_merged" and
    "fewshot_avg".

    ARC-Easy and ARC-Challenge are listed apart and also merged into "fs:arc_merged",
    accuracy over all items of both (item-weighted mean of their acc_norm); the average
    then counts ARC once, through the merged value, like the paper's Avg column."""
    tasks = fewshot_tasks(rec)
    out = {col: float(t["value"]) for col, t in tasks.items()}
    sizes = {col[3:].removesuffix("_local"): float(t["n"] or 0) for col, t in tasks.items()}
    arc = {k: out.get(f"fs:{k}", out.get(f"fs:{k}_local")) for k in ("arc_easy",
                                                                     "arc_challenge")}
    if all(v is not None for v in arc.values()) and sizes.get("arc_easy"):
        n_e, n_c = sizes["arc_easy"], sizes["arc_challenge"]
        out["fs:arc_merged"] = (arc["arc_easy"] * n_e + arc["arc_challenge"] * n_c) / (n_e + n_c)
    in_avg = averaged_columns(list(out))
    if in_avg:
        out["fewshot_avg"] = sum(out[c] for c in in_avg) / len(in_avg)
    return out


def fewshot_seed_mean(recs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`fewshot_tasks` averaged over the seeds of one model: {"fs:<task>": {"value" (mean),
    "stderr" (of the mean: sqrt(sum se^2) / k, a missing se counting 0), "n" (items over
    all seeds)}}, over the seeds that have the task."""
    per_task: dict[str, list[dict[str, float | None]]] = {}
    for rec in recs:
        for col, t in fewshot_tasks(rec).items():
            per_task.setdefault(col, []).append(t)
    out = {}
    for col, vals in sorted(per_task.items()):
        k = len(vals)
        out[col] = {"value": sum(float(v["value"]) for v in vals) / k,
                    "stderr": math.sqrt(sum((v["stderr"] or 0.0) ** 2 for v in vals)) / k,
                    "n": sum(float(v["n"] or 0) for v in vals)}
    return out


# --------------------------------------------------------------------------------------------
# the flat frame


def _infer(rec: dict[str, Any]) -> dict[str, float]:
    if not isinstance(get(rec, "metrics", "infer"), dict):
        return {}
    kv = metric(rec, "infer", "kv_cache_bytes")
    return {"infer_tokens_per_s": nan(metric(rec, "infer", "tokens_per_s")),
            "infer_ms_per_token": nan(metric(rec, "infer", "ms_per_token")),
            "infer_batch_size": nan(metric(rec, "infer", "batch_size")),
            "infer_kv_cache_mb": nan(None if kv is None else kv / 2**20),
            "infer_mean_depth": nan(metric(rec, "infer", "mean_depth")),
            "infer_rel_reported": nan(metric(rec, "infer", "rel_tokens_per_s"))}


def _speed(rec: dict[str, Any]) -> dict[str, float]:
    """The interleaved training-throughput measurement (metrics.speed), when taken."""
    if not isinstance(get(rec, "metrics", "speed"), dict):
        return {}
    return {"speed_tokens_per_s": nan(metric(rec, "speed", "tokens_per_s")),
            "speed_rel_tokens_per_s": nan(metric(rec, "speed", "rel_tokens_per_s"))}


def _kv(rec: dict[str, Any]) -> dict[str, float]:
    """KV-cache bytes of one sequence: the analytic figure (rec["kv_cache"]), else the
    inference phase's whole-batch bytes over its batch size; {} when neither is there."""
    per_seq = num(get(rec, "kv_cache", "bytes_per_seq"))
    if per_seq is None:
        kv, batch = metric(rec, "infer", "kv_cache_bytes"), metric(rec, "infer", "batch_size")
        per_seq = kv / batch if kv is not None and batch else None
    return {} if per_seq is None else {"kv_bytes_per_seq": per_seq}


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per successful record, flat columns (missing values NaN)."""
    rows = []
    for r in ok_records(records):
        budget = r["budget"]
        vanilla = r["family"] == "vanilla"
        mem = metric(r, "peak_mem_bytes")
        rows.append({
            "model": r["model_name"], "family": r["family"],
            "router": r.get("router"), "kv": r.get("kv"), "eval_routing": r.get("eval_routing"),
            "sharing": None if vanilla else get(r, "config", "sharing"),
            "N_r": None if vanilla else r["config"]["num_recursions"],
            "layers": r.get("layer_plan"),
            "budget": budget_label(r),
            "budget_kind": budget["kind"], "budget_value": float(budget["value"]),
            "seed": r["seed"],
            "params_non_emb": get(r, "params", "non_embedding"),
            "flops_per_token": r["plan"]["flops_per_token"],
            "flops_used": nan(metric(r, "flops_used")), "tokens": nan(metric(r, "tokens")),
            "val_nll": nan(metric(r, "val_nll")), "val_bpb": nan(metric(r, "val_bpb")),
            "val_nll_causal": nan(metric(r, "val_nll_by_routing", "causal")),
            "flops_per_token_effective": nan(metric(r, "flops_per_token_effective")),
            # Diagnostics as the paper reports them: sampling accuracy and dead tokens of
            # expert-choice under top-k, load violation of token-choice.
            "sampling_acc": nan(metric(r, "val_routing_by_mode", "topk", "sampling_acc")),
            "dead_token_ratio": nan(metric(r, "val_routing_by_mode", "topk",
                                           "dead_token_ratio")),
            "maxvio": nan(metric(r, "val_routing", "maxvio")),
            **fewshot_scores(r),
            "train_time_s": nan(metric(r, "train_time_s")),
            "tokens_per_s": nan(metric(r, "tokens_per_s")),
            "peak_mem_mb": nan(None if mem is None else mem / 2**20),
            "mfu": nan(metric(r, "mfu")),
            **_speed(r),
            **_infer(r),
            **_kv(r),
            "contended": is_contended(r),
        })
    return pd.DataFrame(rows)
