"""Statistics behind the comparison tables: how sure is a difference?

- Seeds: a metric over several seeds is reported as its mean with a 95% Student-t
  confidence interval (n-1 degrees of freedom); one seed has no interval (NaN, never 0).
  Two models with at least two seeds each are compared by Welch's t-test.
- Items: two models scored on the same evaluation items (lm-eval's per-item correctness,
  `RUN_DIR/<run_id>/fewshot_items.json`) are compared by a paired bootstrap over the
  items: mean difference, percentile 95% interval, two-sided p-value.

A difference is called significant only when p < 0.05 AND its interval excludes 0 AND it
is at least `MIN_REL_EFFECT` (2%) of the vanilla value it is measured against (so a 1% RSS
difference over two seeds, however consistent, gets no star); the tables mark those and call
nothing "better" otherwise.

The t distribution is computed here (regularised incomplete beta by continued fraction),
so reports need neither scipy nor any other package beyond numpy and pandas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from evals.suite.record import FEWSHOT_ITEMS, RECORD, RecordError, read_json
from reports.frame import (
    averaged_columns,
    fewshot_parts,
    get,
    group_runs,
    ok_records,
    records_frame,
    task_metric,
    vanilla_groups,
)

ALPHA = 0.05
LEVEL = 0.95
MIN_REL_EFFECT = 0.02
"""Smallest |difference| / |vanilla value| called significant: below it a difference may be
real but is too small to matter (timing jitter, allocator noise), so no star."""
N_BOOT = 10_000

# Metrics compared across seeds (columns of `reports.table.comparison_table`), and the
# direction that counts as an improvement over vanilla.
LOWER_IS_BETTER = {"val_nll": True, "val_nll_causal": True, "val_bpb": True,
                   "train_time_s": True, "peak_mem_mb": True, "tokens_per_s": False,
                   "infer_tokens_per_s": False}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of a table column is the better one (accuracies: no)."""
    return LOWER_IS_BETTER.get(metric, False)


# --- the Student t distribution --------------------------------------------------------------
def _beta_cont_frac(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side
        return math.exp(log_front) * _beta_cont_frac(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_cont_frac(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, real) degrees of freedom."""
    if math.isinf(df):
        return NormalDist().cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on `t_cdf`, to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must lie strictly between 0 and 1")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --- seeds -----------------------------------------------------------------------------------
def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return arr[np.isfinite(arr)]


def mean_ci(values: Iterable[Any], level: float = LEVEL) -> tuple[float, float, int]:
    """(mean, half-width of the Student-t interval, n) over the finite values; the
    half-width is NaN for fewer than two values (no interval, not a zero-width one)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = t_quantile(0.5 + level / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return float(x.mean()), half, n


def ci_half_width(values: Iterable[Any], level: float = LEVEL) -> float:
    """Half-width of the Student-t confidence interval of the mean (NaN below 2 values)."""
    return mean_ci(values, level)[1]


def welch_test(a: Iterable[Any], b: Iterable[Any], level: float = LEVEL) -> dict[str, float]:
    """Welch's t-test of mean(a) - mean(b): {"diff", "ci_low", "ci_high", "p", "df", "n_a",
    "n_b"}; interval and p are NaN unless both sides have at least two values."""
    x, y = _finite(a), _finite(b)
    out = {"diff": (float(x.mean() - y.mean()) if len(x) and len(y) else math.nan),
           "ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "df": math.nan,
           "n_a": len(x), "n_b": len(y)}
    if len(x) < 2 or len(y) < 2:
        return out
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    diff = out["diff"]
    if se == 0.0:  # both sides constant: the difference is exact
        return {**out, "ci_low": diff, "ci_high": diff, "p": 1.0 if diff == 0 else 0.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    p = 2.0 * (1.0 - t_cdf(abs(diff) / se, df))
    return {**out, "ci_low": diff - half, "ci_high": diff + half, "p": min(1.0, p), "df": df}


def is_significant(p: float, ci_low: float, ci_high: float, alpha: float = ALPHA, *,
                   diff: float | None = None, reference: float | None = None,
                   min_rel_effect: float = MIN_REL_EFFECT) -> bool:
    """p below alpha and an interval that excludes zero (both, so they never disagree) --
    and, when the `reference` value (vanilla's mean) is given, an effect |diff| of at least
    `min_rel_effect` of |reference|."""
    if not (p < alpha and (ci_low > 0 or ci_high < 0)):
        return False
    if reference is not None and diff is not None and math.isfinite(reference) \
            and reference != 0:
        return bool(abs(diff) >= min_rel_effect * abs(reference))
    return True


def format_p(p: Any) -> str:
    """A p-value as every report shows it: "<0.001" below 0.001, else 3 decimals; "-" when
    missing."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# --- paired bootstrap over items -------------------------------------------------------------
def _bootstrap_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement, size n) of `d`.

    A resample's mean depends only on how often each distinct value was drawn, and those
    counts are Multinomial(n, observed frequencies): drawing them is the same bootstrap in
    O(n_boot x distinct values) memory instead of O(n_boot x n) (0/1 items: 3 values)."""
    values, counts = np.unique(d, return_counts=True)
    n = len(d)
    out = np.empty(n_boot)
    chunk = max(1, 2 ** 22 // len(values))
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        out[start:start + k] = rng.multinomial(n, counts / n, size=k) @ values / n
    return out


def stratified_paired_bootstrap(pairs: Sequence[tuple[Any, Any]], *, n_boot: int = N_BOOT,
                                seed: int = 0, level: float = LEVEL,
                                alpha: float = ALPHA) -> dict[str, Any]:
    """Paired bootstrap of the mean over strata of mean(a - b), items resampled within each
    stratum (e.g. the few-shot average over tasks). See `paired_bootstrap`."""
    if not pairs:
        raise ValueError("paired bootstrap needs at least one (a, b) pair of arrays")
    rng = np.random.default_rng(seed)
    observed, reps, n, ref = 0.0, np.zeros(n_boot), 0, 0.0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
            raise ValueError(f"paired bootstrap needs two non-empty 1-D arrays of one length "
                             f"(got shapes {a.shape} and {b.shape})")
        d = a - b
        observed += d.mean() / len(pairs)
        ref += b.mean() / len(pairs)
        reps += _bootstrap_means(d, n_boot, rng) / len(pairs)
        n += len(d)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    # Two-sided p under the null "no difference": the bootstrap distribution shifted to 0,
    # i.e. how often a resample lies at least |observed| away from the observed mean.
    extreme = np.abs(reps - observed) >= abs(observed) - 1e-12
    p = (1 + int(extreme.sum())) / (n_boot + 1)
    return {"diff": float(observed), "ci_low": float(lo), "ci_high": float(hi), "p": p,
            "significant": is_significant(p, lo, hi, alpha, diff=float(observed),
                                          reference=float(ref)),
            "n": n, "n_boot": n_boot}


def paired_bootstrap(a: Any, b: Any, *, n_boot: int = N_BOOT, seed: int = 0,
                     level: float = LEVEL, alpha: float = ALPHA) -> dict[str, Any]:
    """Paired bootstrap of mean(a - b) over items aligned by position (a[i], b[i]: the same
    item, e.g. 0/1 correctness of two models).

    Returns {"diff", "ci_low", "ci_high" (percentile interval at `level`), "p" (two-sided,
    (1 + #extreme) / (n_boot + 1)), "significant", "n", "n_boot"}; deterministic for a
    given `seed`."""
    return stratified_paired_bootstrap([(a, b)], n_boot=n_boot, seed=seed, level=level,
                                       alpha=alpha)


# --- per-item few-shot results ---------------------------------------------------------------
def load_items(run_dir: str | Path, run_id: str,
               routing: str | None = None) -> dict[str, list[dict[str, Any]]] | None:
    """{task: [{"doc_id", "acc", "acc_norm"?}]} of one run from its fewshot_items.json, or
    None when the run has no such file.

    `routing` picks the routing mode; by default the record's primary few-shot mode
    (metrics.fewshot.routing), else the file's only mode."""
    path = Path(run_dir) / run_id / FEWSHOT_ITEMS
    if not path.is_file():
        return None
    by_mode = read_json(path)
    if routing is None:
        rec_file = path.parent / RECORD
        if rec_file.is_file():
            routing = get(read_json(rec_file), "metrics", "fewshot", "routing")
        if routing is None and len(by_mode) == 1:
            routing = next(iter(by_mode))
    if routing not in by_mode:
        raise RecordError(f"'{path}' has no items for routing mode {routing!r} (it has "
                          f"{', '.join(sorted(by_mode)) or 'none'}); pass routing=")
    return by_mode[routing]


def _item_scores(items: dict[str, list[dict[str, Any]]], leaves: list[str]
                 ) -> dict[tuple[str, int], float]:
    """{(task, doc_id): correctness} over the leaf tasks, under each task's paper metric."""
    out = {}
    for task in leaves:
        metric = task_metric(task)
        for item in items.get(task) or []:
            value = item.get(metric)
            if isinstance(value, (int, float)):
                out[(task, int(item["doc_id"]))] = float(value)
    return out


def _seed_mean(per_seed: list[dict[tuple[str, int], float]]) -> dict[tuple[str, int], float]:
    """Item-wise mean over seeds, on the items every seed has."""
    common = set.intersection(*(set(s) for s in per_seed))
    return {k: sum(s[k] for s in per_seed) / len(per_seed) for k in common}


TEST_COLUMNS = ["model", "budget", "task", "metric", "routing", "diff", "ci_low", "ci_high",
                "p", "significant", "n", "method"]


def paired_fewshot_tests(run_dir: str | Path, records: list[dict[str, Any]], *,
                         n_boot: int = N_BOOT, seed: int = 0,
                         alpha: float = ALPHA) -> pd.DataFrame:
    """Each model against the vanilla model of its budget, per few-shot table column
    ("fs:<task>", "fs:arc_merged", and "fewshot_avg" by a bootstrap stratified by task):
    paired bootstrap of accuracy(model) - accuracy(vanilla) over the doc_ids both have.

    Items come from each run's fewshot_items.json under its primary routing mode; the seeds
    of one model that have the file are averaged per item first. Returns a DataFrame with
    TEST_COLUMNS ("task" is the lm-eval task or group, "metric" the table column)."""
    groups = group_runs(ok_records(records))
    loaded: dict[tuple[str, str], tuple[list[dict], dict[str, list[str]], str | None]] = {}
    for key, recs in groups.items():
        items = [i for r in recs if (i := load_items(run_dir, r["run_id"])) is not None]
        if not items:
            continue
        fs = (recs[0].get("metrics") or {}).get("fewshot") or {}
        tasks = fs.get("tasks") or {t: {"subtasks": []} for t in items[0]}
        loaded[key] = (items, fewshot_parts(tasks), fs.get("routing"))

    rows = []
    for (model, budget), (items, parts, routing) in loaded.items():
        vanilla = vanilla_groups({k: v for k, v in groups.items() if k in loaded}).get(budget)
        if vanilla is None or (model, budget) == vanilla:
            continue
        ref_items, ref_parts, _ = loaded[vanilla]
        pairs = {}
        for column, leaves in parts.items():
            if ref_parts.get(column) != leaves:
                continue
            ours = _seed_mean([_item_scores(i, leaves) for i in items])
            ref = _seed_mean([_item_scores(i, leaves) for i in ref_items])
            common = sorted(set(ours) & set(ref))
            if common:
                pairs[column] = ([ours[k] for k in common], [ref[k] for k in common])
        tests = {c: paired_bootstrap(*ab, n_boot=n_boot, seed=seed, alpha=alpha)
                 for c, ab in pairs.items()}
        avg = averaged_columns(list(parts))
        if avg and avg == averaged_columns(list(ref_parts)) and all(c in pairs for c in avg):
            tests["fewshot_avg"] = stratified_paired_bootstrap(
                [pairs[c] for c in avg], n_boot=n_boot, seed=seed, alpha=alpha)
        for column, res in tests.items():
            rows.append({"model": model, "budget": budget,
                         "task": "avg" if column == "fewshot_avg" else column[3:],
                         "metric": column, "routing": routing,
                         **{k: res[k] for k in ("diff", "ci_low", "ci_high", "p",
                                                "significant", "n")},
                         "method": "paired bootstrap over items"})
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


def seed_tests(records: list[dict[str, Any]], metrics: Sequence[str] | None = None,
               alpha: float = ALPHA) -> pd.DataFrame:
    """Welch's t-test over seeds of each model against the vanilla model of its budget,
    for each metric (table column; default: NLL, few-shot scores, time, memory, speed).
    Only models and vanillas with at least two seeds get a test. TEST_COLUMNS, with "n"
    the model's number of seeds and "task" None."""
    df = records_frame(records)
    rows = []
    if df.empty:
        return pd.DataFrame(rows, columns=TEST_COLUMNS)
    cols = list(metrics) if metrics is not None else [
        c for c in df.columns if c in LOWER_IS_BETTER or c.startswith("fs:")
        or c == "fewshot_avg"]
    for budget, at_budget in df.groupby("budget", sort=False):
        base = at_budget[at_budget["family"] == "vanilla"]
        if base.empty or base["model"].nunique() != 1 or len(base) < 2:
            continue
        for model, runs in at_budget.groupby("model", sort=False):
            if model == base["model"].iloc[0] or len(runs) < 2:
                continue
            for col in cols:
                if col not in runs:
                    continue
                res = welch_test(runs[col], base[col])
                if math.isnan(res["p"]):
                    continue
                rows.append({"model": model, "budget": budget, "task": None, "metric": col,
                             "routing": None, "diff": res["diff"], "ci_low": res["ci_low"],
                             "ci_high": res["ci_high"], "p": res["p"],
                             "significant": is_significant(
                                 res["p"], res["ci_low"], res["ci_high"], alpha,
                                 diff=res["diff"], reference=float(base[col].mean())),
                             "n": res["n_a"], "method": "Welch t-test over seeds"})
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


def significance_vs_vanilla(records: list[dict[str, Any]], run_dir: str | Path | None = None,
                            **kwargs: Any) -> pd.DataFrame:
    """All tests against vanilla, one row per (model, budget, metric): the paired bootstrap
    over items where per-item files exist (few-shot columns), else Welch over seeds."""
    frames = [f for f in (paired_fewshot_tests(run_dir, records, **kwargs)
                          if run_dir is not None else None, seed_tests(records))
              if f is not None and not f.empty]
    if not frames:
        return pd.DataFrame(columns=TEST_COLUMNS)
    both = pd.concat(frames, ignore_index=True)
    return both.drop_duplicates(["model", "budget", "metric"], keep="first").reset_index(
        drop=True)
