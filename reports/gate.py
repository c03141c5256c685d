"""Regression gate: compare a suite run with a committed baseline, metric by metric, each
with its own direction and tolerance.

    mor-bench check RUN_DIR --baseline reports/baselines/smoke.json           # 1: regression
    mor-bench check RUN_DIR --baseline reports/baselines/smoke.json --update  # (re)write

What is compared, per model (seeds averaged, as in the report table):

* `val_nll`, `val_nll_causal`: may not rise by more than an absolute tolerance.
* `speed_rel_tokens_per_s`: training tokens/s relative to the suite's vanilla model,
  measured INTERLEAVED (`metrics.speed.rel_tokens_per_s`: the runs' training steps timed in
  alternating rounds in one process after all runs trained) -- a ratio under one machine
  state, so the speed of the machine cancels -- may not fall by more than a relative
  tolerance. The per-run `metrics.tokens_per_s`, timed sequentially minutes apart, is not
  judged; absolute times and tokens/s are never compared.
* `infer_rel_tokens_per_s`: the inference phase's tokens/s relative to vanilla
  (`metrics.infer.rel_tokens_per_s`), when the suite measures inference; likewise.
* `fs:<task>`: few-shot accuracy under the paper's metric, for the tasks the report table
  shows (`reports.frame.fewshot_tasks`: tasks, an MMLU group as one benchmark), judged
  with its standard error: a drop fails only beyond k * sqrt(se_run^2 + se_base^2) (and
  at least `min_tol`).

A model or metric in the baseline but absent from the run fails (a run that crashed, a
measurement that disappeared); one only in the run is reported as new and passes. A model
whose run was interrupted (record status "interrupted": stopped after a checkpoint) is
shown as "interrupted", not "failed", with how to resume it; it still fails the gate.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evals.suite.record import hardware_summary, load_records, write_json_atomic
from reports.frame import (
    ReportError,
    budget_label,
    contended_runs,
    fewshot_seed_mean,
    get,
    group_runs,
    model_name,
    num,
    ok_records,
)
from reports.frame import metric as metric_of

SCHEMA = "mor-bench/baseline/v1"

DEFAULT_TOLERANCES: dict[str, dict[str, Any]] = {
    "val_nll": {
        "direction": "lower", "kind": "abs", "tol": 0.05,
        "doc": "validation NLL (nats/token) may rise by at most `tol`. Seeded CPU runs repeat "
               "to ~1e-6 on one machine; other CPUs, thread counts and library versions move "
               "it by up to ~0.01, so 0.05 flags real changes only."},
    "val_nll_causal": {
        "direction": "lower", "kind": "abs", "tol": 0.05,
        "doc": "expert-choice MoR's validation NLL under causal routing; as val_nll."},
    "speed_rel_tokens_per_s": {
        "direction": "higher", "kind": "rel", "tol": 0.25,
        "doc": "training tokens/s relative to the suite's vanilla model, measured "
               "interleaved (metrics.speed.rel_tokens_per_s: alternating rounds in one "
               "process), may fall by at most `tol` (a fraction). A ratio under one machine "
               "state, so the machine's speed cancels; what remains is timing noise of "
               "shared CPUs (10-15% on 2 cores), hence 25%. Sequential per-run tokens/s are "
               "not judged."},
    "infer_rel_tokens_per_s": {
        "direction": "higher", "kind": "rel", "tol": 0.25,
        "doc": "inference tokens/s relative to vanilla (metrics.infer.rel_tokens_per_s, "
               "also interleaved), when the suite measures inference; as "
               "speed_rel_tokens_per_s."},
    "fewshot": {
        "direction": "higher", "kind": "stderr", "k": 2.0, "min_tol": 0.02,
        "doc": "few-shot accuracy per task (fs:<task>, the paper's metric) may fall by at "
               "most k * sqrt(stderr_run^2 + stderr_baseline^2), and at least `min_tol` "
               "(so a task at 100% with stderr 0 does not fail on one item)."},
}

REFRESH = ("mor-bench run {suite} --out runs && mor-bench check runs/{suite}-latest "
           "--baseline {path} --update")


# --------------------------------------------------------------------------------------------
# what a run measured


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _group_status(recs: list[dict[str, Any]]) -> str:
    """"ok" when every seed finished; "failed" when one failed; else "interrupted" (a run
    stopped after a checkpoint, which `mor-bench run SUITE --resume RUN_DIR` continues)."""
    statuses = {r.get("status") for r in recs}
    if statuses == {"ok"}:
        return "ok"
    if "interrupted" in statuses and statuses <= {"ok", "interrupted"}:
        return "interrupted"
    return "failed"


def _not_ok_reason(rec: dict[str, Any]) -> str:
    if rec.get("status") == "interrupted":
        step = rec.get("interrupted_at_step")
        return (f"{rec.get('run_id')}: interrupted"
                + (f" at step {step}" if step is not None else "")
                + "; continue it with `mor-bench run SUITE --resume RUN_DIR`")
    return f"{rec.get('run_id')}: {rec.get('error')}"


def _gate_keys(groups: dict[tuple[str, str], Any]) -> dict[tuple[str, str], str]:
    """{(model, budget label): the gate's key} -- the model's name, or "model @ budget" for
    a model trained under several budgets."""
    budgets_of: dict[str, set[str]] = {}
    for name, budget in groups:
        budgets_of.setdefault(name, set()).add(budget)
    return {(name, budget): name if len(budgets_of[name]) == 1 else f"{name} @ {budget}"
            for name, budget in groups}


def run_metrics(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model: {"status", "family", "budget", "seeds", "metrics": {name: value}}} for every
    model of a run; a model trained under several budgets is keyed "model @ budget"."""
    groups = group_runs(records)
    keys = _gate_keys(groups)
    out: dict[str, dict[str, Any]] = {}
    for (name, budget), recs in groups.items():
        key = keys[(name, budget)]
        ok = [r for r in recs if r.get("status") == "ok"]
        entry: dict[str, Any] = {"family": recs[0].get("family"), "budget": budget,
                                 "seeds": sorted(r.get("seed") for r in ok),
                                 "status": _group_status(recs)}
        if entry["status"] != "ok":
            entry["errors"] = [_not_ok_reason(r) for r in recs if r.get("status") != "ok"]
        metrics: dict[str, Any] = {}
        if ok:
            metrics["val_nll"] = _mean([metric_of(r, "val_nll") for r in ok])
            metrics["val_nll_causal"] = _mean([metric_of(r, "val_nll_by_routing", "causal")
                                               for r in ok])
            if entry["family"] != "vanilla":
                metrics["speed_rel_tokens_per_s"] = _mean(
                    [metric_of(r, "speed", "rel_tokens_per_s") for r in ok])
                metrics["infer_rel_tokens_per_s"] = _mean(
                    [metric_of(r, "infer", "rel_tokens_per_s") for r in ok])
            metrics.update(fewshot_seed_mean(ok))
        entry["metrics"] = {k: v for k, v in metrics.items() if v is not None}
        out[key] = entry
    return out


# --------------------------------------------------------------------------------------------
# the baseline file


def make_baseline(run_dir: str | Path, records: list[dict[str, Any]] | None = None,
                  tolerances: dict[str, dict[str, Any]] | None = None,
                  path: str | Path = "BASELINE.json") -> dict[str, Any]:
    """A baseline document from a run (tolerances: kept from an older baseline if given)."""
    run_dir = Path(run_dir)
    records = load_records(run_dir) if records is None else records
    failed = [f"{r.get('run_id')}: {r.get('status')}" for r in records
              if r.get("status") != "ok"]
    if failed:
        raise ReportError(f"{len(failed)} run(s) of '{run_dir}' did not finish "
                          f"({', '.join(failed)}); a baseline must come from a run where "
                          "every model trained")
    suite = records[0].get("suite") or {}
    prov = records[0].get("provenance") or {}
    hw = prov.get("hardware") or {}
    name = suite.get("name", "SUITE")
    return {
        "schema": SCHEMA,
        "about": "Regression baseline for `mor-bench check`: per-model metrics of one suite "
                 "run and the tolerance of each metric (see `tolerances.*.doc`). Refresh "
                 "after an intended change with: " + REFRESH.format(suite=name, path=path),
        "suite": {"name": suite.get("name"), "source": suite.get("source"),
                  "sha256": suite.get("sha256")},
        "recorded": {
            "run_dir": run_dir.resolve().name,
            "commit": (prov.get("git") or {}).get("commit"),
            "dirty": (prov.get("git") or {}).get("dirty"),
            "hardware": hardware_summary(hw) if hw else None,
            "platform": hw.get("platform"),
            "versions": {k: v for k, v in (prov.get("versions") or {}).items()
                         if k in ("python", "torch", "numpy", "lm_eval", "mor-bench")},
            "finished_at": max((r.get("finished_at") or "" for r in records), default=None),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "tolerances": tolerances or DEFAULT_TOLERANCES,
        "models": run_metrics(records),
    }


def load_baseline(path: str | Path, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Read and check a baseline file; ReportError saying how to create it otherwise."""
    import json

    path = Path(path)
    hint = (f"create it from a run with `mor-bench check {run_dir or 'RUN_DIR'} --baseline "
            f"{path} --update`")
    if not path.is_file():
        raise ReportError(f"baseline '{path}' does not exist; {hint}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"baseline '{path}' is not valid JSON ({e}); fix it or {hint}") \
            from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ReportError(f"baseline '{path}' is not a mor-bench baseline (schema {got!r}, "
                            f"expected {SCHEMA!r}); {hint}")
    for key in ("models", "tolerances"):
        if not isinstance(doc.get(key), dict):
            raise ReportError(f"baseline '{path}' has no '{key}' table; {hint}")
    return doc


def write_baseline(run_dir: str | Path, path: str | Path) -> dict[str, Any]:
    """(Re)write the baseline at `path` from a run, keeping the file's tolerances."""
    import json

    path = Path(path)
    tolerances = None
    if path.is_file():
        try:
            tolerances = json.loads(path.read_text()).get("tolerances")
        except (json.JSONDecodeError, AttributeError):
            tolerances = None
    doc = make_baseline(run_dir, tolerances=tolerances, path=path)
    write_json_atomic(path, doc)
    return doc


# --------------------------------------------------------------------------------------------
# comparing


def _tolerance(tolerances: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    if metric in tolerances:
        return tolerances[metric]
    if metric.startswith("fs:") and "fewshot" in tolerances:
        return tolerances["fewshot"]
    if metric.startswith("fs:"):
        return DEFAULT_TOLERANCES["fewshot"]
    if metric in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[metric]
    raise ReportError(f"no tolerance for metric '{metric}' in the baseline or defaults")


def _value(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, dict):
        return num(v.get("value")), num(v.get("stderr"))
    return num(v), None


def judge(metric: str, base: Any, now: Any, tol: dict[str, Any]) -> dict[str, Any]:
    """One metric of one model: delta, the allowed change and the verdict ("ok",
    "improved" or "regression")."""
    b, se_b = _value(base)
    n, se_n = _value(now)
    kind, better = tol["kind"], tol.get("direction", "lower")
    sign = 1.0 if better == "higher" else -1.0  # worsening = sign * delta < 0
    if kind == "abs":
        delta = n - b
        allowed = float(tol["tol"])
        worse, gain = -sign * delta, sign * delta
        shown = f"{'-' if better == 'higher' else '+'}{allowed:.3g}"
        delta_s = f"{delta:+.4f}"
    elif kind == "rel":
        delta = n / b - 1 if b else math.inf
        allowed = float(tol["tol"])
        worse, gain = -sign * delta, sign * delta
        shown = f"{'-' if better == 'higher' else '+'}{100 * allowed:.0f}%"
        delta_s = f"{100 * delta:+.1f}%"
    elif kind == "stderr":
        delta = n - b
        k = float(tol.get("k", 2.0))
        allowed = max(k * math.sqrt((se_n or 0.0) ** 2 + (se_b or 0.0) ** 2),
                      float(tol.get("min_tol", 0.0)))
        worse, gain = -sign * delta, sign * delta
        shown = f"{'-' if better == 'higher' else '+'}{100 * allowed:.1f} pts ({k:g} se)"
        delta_s = f"{100 * delta:+.1f} pts"
    else:
        raise ReportError(f"tolerance of '{metric}': unknown kind {kind!r} "
                            "(abs, rel or stderr)")
    verdict = "regression" if worse > allowed else "improved" if gain > allowed else "ok"
    return {"delta_value": delta, "delta_str": delta_s, "allowed": allowed,
            "tolerance": shown, "verdict": verdict}


def _fmt_value(metric: str, v: Any) -> str:
    value, se = _value(v)
    if value is None:
        return "-"
    if metric.startswith("fs:"):
        return f"{100 * value:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")
    if metric.startswith(("rel_", "infer_rel_", "speed_rel_")):
        return f"{value:.3f}x"
    return f"{value:.4f}"


_FAMILY_ORDER = {"vanilla": 0, "recursive": 1, "mor": 2}
_PROBLEMS = ("regression", "missing", "failed", "interrupted")  # verdicts that fail the gate
_METRIC_ORDER = ("val_nll", "val_nll_causal", "speed_rel_tokens_per_s",
                 "infer_rel_tokens_per_s")


def _metric_order(metric: str) -> tuple[int, str]:
    return (_METRIC_ORDER.index(metric) if metric in _METRIC_ORDER
            else len(_METRIC_ORDER), metric)


def compare(baseline: dict[str, Any], current: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every (model, metric) of the baseline and the run side by side with a verdict;
    "passed" is False on any regression, missing model or metric, or failed run."""
    tolerances = baseline.get("tolerances") or DEFAULT_TOLERANCES
    rows: list[dict[str, Any]] = []
    base_models = baseline["models"]

    def row(model: str, metric: str, base: Any, now: Any, verdict: str, **extra: Any) -> None:
        rows.append({"model": model, "metric": metric, "baseline": _fmt_value(metric, base),
                     "now": _fmt_value(metric, now), "delta": extra.pop("delta_str", "-"),
                     "tolerance": extra.pop("tolerance", "-"), "verdict": verdict,
                     "baseline_value": _value(base)[0], "now_value": _value(now)[0], **extra})

    def model_order(model: str) -> tuple[int, str]:
        family = (current.get(model) or base_models.get(model) or {}).get("family")
        return _FAMILY_ORDER.get(family, 3), model

    for model in sorted(set(base_models) | set(current), key=model_order):
        base, cur = base_models.get(model), current.get(model)
        if cur is None:
            row(model, "(model)", None, None, "missing",
                note="in the baseline but not in this run")
            continue
        if cur.get("status") != "ok":
            status = "interrupted" if cur.get("status") == "interrupted" else "failed"
            row(model, "(model)", None, None, status,
                note="; ".join(cur.get("errors") or [f"the run {status}"]))
            continue
        if base is None:
            row(model, "(model)", None, None, "new", note="not in the baseline")
            continue
        bm, cm = base.get("metrics") or {}, cur.get("metrics") or {}
        for metric in sorted(set(bm) | set(cm), key=_metric_order):
            if metric not in cm:
                row(model, metric, bm[metric], None, "missing",
                    note="measured in the baseline, not in this run")
            elif metric not in bm:
                row(model, metric, None, cm[metric], "new", note="not in the baseline")
            else:
                j = judge(metric, bm[metric], cm[metric], _tolerance(tolerances, metric))
                row(model, metric, bm[metric], cm[metric], j.pop("verdict"), **j)
    bad = [r for r in rows if r["verdict"] in _PROBLEMS]
    return {"passed": not bad, "rows": rows, "problems": bad}


def check_run(run_dir: str | Path, baseline_path: str | Path, strict_timing: bool = False
              ) -> dict[str, Any]:
    """Load both, compare, and add notes (suite or hardware differing from the baseline's).

    A timing ratio measured on a contended machine (`contended_timings`) is flagged; beyond
    its tolerance it gets the verdict "contended" and does not fail the gate, since load
    from other processes moves even interleaved ratios (a busy loop beside the smoke suite
    moved MoR token-choice's training ratio by -28%, README "Busy machines") --
    unless `strict_timing`."""
    baseline = load_baseline(baseline_path, run_dir)
    records = load_records(run_dir)
    result = compare(baseline, run_metrics(records))
    notes = []
    suite = records[0].get("suite") or {}
    b_suite = baseline.get("suite") or {}
    if b_suite.get("sha256") and suite.get("sha256") != b_suite.get("sha256"):
        notes.append(f"the suite file differs from the baseline's (sha256 "
                     f"{str(suite.get('sha256'))[:12]} vs {str(b_suite['sha256'])[:12]}); if "
                     "the change is intended, refresh the baseline with --update")
    hw = ((records[0].get("provenance") or {}).get("hardware")) or {}
    b_hw = (baseline.get("recorded") or {}).get("hardware")
    if hw and b_hw and hardware_summary(hw) != b_hw:
        notes.append(f"hardware differs from the baseline's ({hardware_summary(hw)} vs "
                     f"{b_hw}); ratios to vanilla are compared, never absolute speeds")
    contended = contended_runs(records)
    if contended:
        notes.append(f"{len(contended)} run(s) trained on a contended machine ("
                     + "; ".join(f"{r['run_id']}: {r['reason']}" for r in contended) + ")")
    result["contended"] = [r["run_id"] for r in contended]
    flagged = contended_timings(records)
    excused = []
    for row in result["rows"]:
        reason = flagged.get((row["model"], row["metric"]))
        if reason is None:
            continue
        row["note"] = "; ".join(filter(None, [row.get("note"),
                                              "timing flagged: machine contended"]))
        if row["verdict"] == "regression" and not strict_timing:
            row["verdict"] = "contended"
            row["contended_reason"] = reason
            excused.append(f"{row['model']} {row['metric']} ({row['delta']}: {reason})")
    if excused:
        notes.append(f"{len(excused)} timing(s) beyond tolerance were measured on a contended "
                     "machine and are not judged (rerun on a quiet machine, or pass "
                     "--strict-timing to count them): " + "; ".join(excused))
    bad = [r for r in result["rows"] if r["verdict"] in _PROBLEMS]
    return {**result, "passed": not bad, "problems": bad, "notes": notes,
            "baseline": str(baseline_path), "run_dir": str(run_dir),
            "recorded": baseline.get("recorded")}


_TIMING_FIELD = {"speed_rel_tokens_per_s": "speed", "infer_rel_tokens_per_s": "infer"}


def contended_timings(records: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """{(gate model key, timed metric): reason} for the timings taken on a contended
    machine. A timing is judged by the load of ITS measurement (metrics.speed.load /
    metrics.infer.load, the interleaved phase's own LoadMeter) when recorded -- a ratio
    measured on a quiet machine stands even if training shared it -- and by the run's
    training load otherwise (older records)."""
    keys = _gate_keys(group_runs(records))
    out: dict[tuple[str, str], str] = {}
    for rec in ok_records(records):
        key = keys[(model_name(rec), budget_label(rec))]
        for metric, field in _TIMING_FIELD.items():
            load = get(rec, "metrics", field, "load")
            if not isinstance(load, dict):
                load = rec.get("load") if isinstance(rec.get("load"), dict) else {}
            if load.get("contended") is True:
                out.setdefault((key, metric), load.get("reason") or "no reason recorded")
    return out


def summary_line(result: dict[str, Any]) -> str:
    """One line naming every model and metric that failed the gate."""
    if result["passed"]:
        n = sum(r["verdict"] in ("ok", "improved") for r in result["rows"])
        k = sum(r["verdict"] == "contended" for r in result["rows"])
        return (f"check passed: {n} metric(s) within tolerance of {result['baseline']}"
                + (f"; {k} timing(s) measured on a contended machine not judged" if k else ""))
    parts = []
    for r in result["problems"]:
        if r["verdict"] == "regression":
            parts.append(f"{r['model']} {r['metric']} {r['baseline']} -> {r['now']} "
                         f"({r['delta']}, tolerance {r['tolerance']})")
        else:
            parts.append(f"{r['model']} {r['metric']} {r['verdict']} ({r.get('note', '')})")
    return (f"check FAILED: {len(parts)} problem(s) against {result['baseline']}: "
            + "; ".join(parts))
