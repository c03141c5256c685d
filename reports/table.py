"""The comparison table: a pure function of result records (no model is run here).

One row per model (seeds averaged, with their count; budgets kept apart): parameters,
FLOPs, tokens, validation NLL, training time, tokens/s, peak memory, and each relative to
the vanilla model trained under the same budget in the same suite run. A metric a record
lacks stays missing (shown as "-"), never zero. Metrics over several seeds also carry the
half-width of their 95% Student-t interval (`<metric>_ci95`; none for one seed).

`reports.paper.paper_layout` arranges it like the paper's Table 3 (Model, Router, KV,
Share, N_r, Params, FLOPs, tokens, NLL, per-task accuracy, Avg; plus training time, peak
memory and throughput relative to vanilla), with `mean ± half-width` and a `*` on
differences from vanilla that are significant (`reports.stats`); `render_formats` writes
any table as Markdown, LaTeX, CSV and HTML.

    mor-bench report RUN_DIR      -> RUN_DIR/report.md, report.csv (every column, numbers),
                                     report.tex, report_tables.html, report_layout.csv,
                                     report_tests.csv
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from evals.suite.record import hardware_summary, load_records
from reports.frame import (
    FAMILY_ORDER,
    contended_runs,
    fewshot_scores,
    has_load,
    is_missing,
    records_frame,
    relative_to_vanilla,
    task_metric,
)
from reports.paper import PAPER_NOTE, SIGNIFICANCE_NOTE, paper_layout, paper_view
from reports.stats import ci_half_width, format_p, significance_vs_vanilla

# Re-exported for callers of the former home of the few-shot helpers (evals.cli,
# tests/evals/lmeval); new code imports them from reports.frame.
__all__ = ["COLUMNS", "CI_METRICS", "HEADLINE_COLUMNS", "INFER_COLUMNS", "KV_COLUMNS",
           "SPEED_COLUMNS", "comparison_table", "contention_note", "detail_tables",
           "fewshot_scores",
           "format_table", "headline_note", "headline_table", "records_frame",
           "interleaved_speed_ratio", "render_formats", "render_report", "task_metric",
           "tests_display", "to_markdown", "train_time_ratio"]

COLUMNS = [
    "model", "family", "router", "kv", "sharing", "N_r", "layers", "eval_routing", "budget",
    "seeds",
    "params_non_emb", "flops_per_token", "flops_per_token_effective", "flops_used", "tokens",
    "val_nll", "val_nll_causal", "val_bpb", "sampling_acc", "dead_token_ratio", "maxvio",
    "train_time_s", "tokens_per_s", "peak_mem_mb", "mfu", "rel_params", "rel_flops_per_token",
    "rel_tokens", "rel_val_nll", "rel_train_time", "rel_tokens_per_s", "rel_peak_mem",
]


# Inference benchmark results (metrics["infer"]) -> table columns; present only when some
# record has them.
INFER_COLUMNS = ["infer_tokens_per_s", "infer_ms_per_token", "infer_batch_size",
                 "infer_kv_cache_mb", "infer_mean_depth"]
# The interleaved training-throughput measurement (metrics["speed"]): tokens/s and the
# ratio to vanilla measured in alternating rounds in one process -- the comparable ratio.
# `tokens_per_s` / `rel_tokens_per_s` are SEQUENTIAL (each run timed while it trained,
# minutes apart) and stay as information. Present only when some record has them.
SPEED_COLUMNS = ["speed_tokens_per_s", "speed_rel_tokens_per_s"]
# KV-cache bytes of one sequence (the record's analytic `kv_cache.bytes_per_seq`, else the
# inference phase's batch bytes / batch size) and its ratio to vanilla; present only when
# some record has them.
KV_COLUMNS = ["kv_bytes_per_seq", "rel_kv_bytes_per_seq"]

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
    speed_cols = [c for c in SPEED_COLUMNS if c in df]
    measured += speed_cols
    kv_cols = KV_COLUMNS if "kv_bytes_per_seq" in df else []
    measured += kv_cols[:1]
    grouped = df.groupby(keys, sort=False, dropna=False)
    agg = grouped.agg(**{c: (c, "first") for c in static}, **{c: (c, "mean") for c in measured},
                      seeds=("seed", "count"), contended=("contended", "any")).reset_index()
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
    if kv_cols:
        rel["rel_kv_bytes_per_seq"] = ("kv_bytes_per_seq", "ratio")
    relative_to_vanilla(agg, rel)
    if infer_cols:  # no vanilla measured here: the inference benchmark's own ratio
        agg["rel_infer_tokens_per_s"] = agg["rel_infer_tokens_per_s"].fillna(
            agg["infer_rel_reported"])
    # Vanilla first (the reference of the relative columns), then recursive, then MoR.
    agg["_family"] = agg["family"].map(FAMILY_ORDER)
    agg = agg.sort_values(["budget_kind", "budget_value", "_family", "N_r", "model"],
                          kind="stable",
                          na_position="first").drop(columns="_family")
    columns = list(COLUMNS)
    if has_load(records):  # newer records: whether a seed's timings were contended
        columns.insert(columns.index("seeds") + 1, "contended")
    if fs_cols:  # few-shot accuracies sit after the validation metrics
        at = columns.index("maxvio") + 1
        columns[at:at] = fs_cols + ["fewshot_avg"]
    columns += speed_cols + kv_cols
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
    "speed_tokens_per_s": lambda v: f"{v:,.0f}", "speed_rel_tokens_per_s": lambda v: f"{v:.2f}x",
    "N_r": lambda v: f"{int(v)}",
    "contended": lambda v: CONTENDED if v else "",
    "kv_bytes_per_seq": lambda v: f"{v / 2**10:,.0f} KiB",
    "rel_kv_bytes_per_seq": lambda v: f"{v:.2f}x",
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


def format_table(table: pd.DataFrame, missing: str = "-") -> pd.DataFrame:
    """Strings for display; missing values as `missing` ("-"); strings pass unchanged."""
    out = table.copy().astype(object)
    for col in out.columns:
        fmt = _formatter(col)
        out[col] = [(missing if is_missing(v) else (fmt(v) if fmt and not isinstance(v, str)
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


# --- the headline table -----------------------------------------------------------------------
HEADLINE_COLUMNS = ["model", "params", "val NLL ± 95% CI", "few-shot avg",
                    "train-time ratio vs vanilla", "throughput ratio vs vanilla",
                    "KV ratio vs vanilla"]
"""The short table report.md and index.html lead with (`headline_table`), in this order."""

CONTENDED = "contended"
"""Marker of a model whose run (a seed of it) was timed on a contended machine (the
record's `load.contended`): its times and speeds are flagged."""

SEQUENTIAL = " (sequential)"
"""Suffix of a headline ratio taken from sequential per-run figures (each run timed while
it trained, minutes apart): information, not a controlled comparison."""

HEADLINE_NOTE = (
    "Seeds averaged; `±`: half-width of the 95% Student-t interval over seeds (none with one "
    "seed). few-shot avg in %, under the run's evaluation routing (expert-choice MoR: top-k, "
    "the paper's protocol, while it generates under causal routing; the few-shot vs "
    "throughput figure pairs like with like). Ratios are against the vanilla model of the "
    "same budget. "
    "train-time ratio: tokens trained / interleaved training tokens/s (`metrics.speed`, the "
    "runs' steps timed in alternating rounds in one process), relative to vanilla. "
    "throughput ratio: generation tokens/s from the interleaved inference benchmark "
    "(`metrics.infer`); without one, the interleaved training tokens/s, marked "
    "\"(training)\". A ratio marked \"(sequential)\" comes from each run's own timing "
    "while it trained (minutes apart, under whatever else the machine was doing): "
    "information, not a comparison. KV ratio: KV-cache bytes of one sequence "
    "(`kv_cache.bytes_per_seq`, else the inference batch's bytes / batch size).")


def _vanilla_value(table: pd.DataFrame, col: str) -> pd.Series:
    """Per row: `col` of the first vanilla row of the row's budget (NaN without one)."""
    out = pd.Series(float("nan"), index=table.index)
    if col not in table:
        return out
    for _, group in table.groupby("budget", sort=False):
        base = group[group["family"] == "vanilla"]
        if not base.empty:
            out.loc[group.index] = base.iloc[0][col]
    return out


def interleaved_speed_ratio(table: pd.DataFrame) -> pd.Series:
    """Per row of a `comparison_table`: interleaved training tokens/s relative to the vanilla
    model of the row's budget (`speed_rel_tokens_per_s` re-based: the [speed] phase times
    every run against one reference); NaN where not measured."""
    if "speed_rel_tokens_per_s" not in table:
        return pd.Series(float("nan"), index=table.index)
    return table["speed_rel_tokens_per_s"] / _vanilla_value(table, "speed_rel_tokens_per_s")


def train_time_ratio(table: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(ratio, sequential) per row: training time relative to vanilla -- from the
    interleaved measurement (tokens trained / interleaved tokens/s, relative to vanilla)
    where there is one, else the sequential `rel_train_time` (sequential=True)."""
    speed = interleaved_speed_ratio(table)
    interleaved = table["rel_tokens"] / speed
    use = interleaved.notna() & (speed > 0)
    ratio = interleaved.where(use, table["rel_train_time"])
    return ratio, ~use & table["rel_train_time"].notna()


def _get(row: pd.Series, col: str) -> float | None:
    value = row.get(col)
    return None if is_missing(value) or isinstance(value, str) else float(value)


def headline_table(table: pd.DataFrame) -> pd.DataFrame:
    """`HEADLINE_COLUMNS` of a `comparison_table`, as display strings (missing: "-").

    Ratios come from interleaved measurements when the records have them (`metrics.speed`
    for training, `metrics.infer` for generation); one taken from sequential per-run
    figures is marked "(sequential)". The interleaved training ratio is re-based on the
    vanilla model of the row's budget (the [speed] phase times every run against one
    reference)."""
    multi_budget = table["budget"].nunique() > 1
    speeds = interleaved_speed_ratio(table)
    train_ratio, train_seq = train_time_ratio(table)
    rows = []
    for idx, r in table.iterrows():
        model = f"{r['model']} @ {r['budget']}" if multi_budget else str(r["model"])
        if r.get("contended") is True:
            model += f" ({CONTENDED})"
        params = _get(r, "params_non_emb")
        nll, ci = _get(r, "val_nll"), _get(r, "val_nll_ci95")
        nll_s = "-" if nll is None else f"{nll:.4f}" + ("" if ci is None else f" ± {ci:.4f}")
        fs = _get(r, "fewshot_avg")
        speed = None if is_missing(speeds.loc[idx]) else float(speeds.loc[idx])
        tr = train_ratio.loc[idx]
        train = "-" if is_missing(tr) else (
            f"{tr:.2f}x" + (SEQUENTIAL if train_seq.loc[idx] else ""))
        if _get(r, "rel_infer_tokens_per_s") is not None:
            thr = f"{_get(r, 'rel_infer_tokens_per_s'):.2f}x"
        elif speed is not None:
            thr = f"{speed:.2f}x (training)"
        elif _get(r, "rel_tokens_per_s") is not None:
            thr = f"{_get(r, 'rel_tokens_per_s'):.2f}x (training){SEQUENTIAL}"
        else:
            thr = "-"
        kv = _get(r, "rel_kv_bytes_per_seq")
        rows.append([model, "-" if params is None else _FORMATS["params_non_emb"](params),
                     nll_s, "-" if fs is None else f"{100 * fs:.1f}", train, thr,
                     "-" if kv is None else f"{kv:.2f}x"])
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def headline_note(table: pd.DataFrame) -> str:
    """What the headline table's columns mean (Markdown)."""
    if "contended" in table and table["contended"].any():
        return HEADLINE_NOTE + (f" \"({CONTENDED})\": a run of the model was timed on a "
                                "contended machine; see the note on contention.")
    return HEADLINE_NOTE


def contention_note(records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines listing the runs timed on a contended machine (the record's
    `load.contended`) with the recorded reason; [] when none is."""
    runs = contended_runs(records)
    if not runs:
        return []
    return [f"Timings of {len(runs)} run(s) are flagged: the machine was contended while "
            "they ran (their times, tokens/s and ratios are less trustworthy; rerun on an "
            "idle machine to confirm):", ""] + [
        f"- `{r['run_id']}` ({r['model']}, {r['budget']}): {r['reason']}" for r in runs]


# --- detail tables -----------------------------------------------------------------------------
DETAIL_KEYS = ["model", "budget"]
"""The columns every detail table starts with (a row's identity)."""

DETAIL_THEMES = [
    ("Model and compute", ["family", "router", "kv", "sharing", "N_r", "layers", "eval_routing",
                           "seeds", "params_non_emb", "flops_per_token",
                           "flops_per_token_effective", "flops_used", "tokens", "rel_params",
                           "rel_flops_per_token", "rel_tokens"]),
    ("Quality", ["val_nll", "val_nll_causal", "val_bpb", "rel_val_nll", "sampling_acc",
                 "dead_token_ratio", "maxvio", "fs:*", "fewshot_avg"]),
    ("Training time, speed and memory", ["contended", "train_time_s", "tokens_per_s",
                                         "rel_train_time", "rel_tokens_per_s",
                                         "speed_tokens_per_s", "speed_rel_tokens_per_s",
                                         "peak_mem_mb", "rel_peak_mem", "mfu"]),
    ("Inference and KV cache", ["kv_bytes_per_seq", "rel_kv_bytes_per_seq", "infer_*",
                                "rel_infer_tokens_per_s"]),
]
"""(title, columns) of the detail tables report.md shows after the headline; a name ending
in "*" takes every column with that prefix. Together they hold every column of the
comparison table but the `_ci95` half-widths (the headline and Table 3 show those); a column
no theme names goes to the last, "Other"."""


def detail_tables(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The `comparison_table` (less `_ci95` columns) split into the `DETAIL_THEMES` tables,
    each led by `DETAIL_KEYS`, in the table's column order; a theme with no column here is
    left out."""
    cols = [c for c in table.columns if not c.endswith("_ci95") and c not in DETAIL_KEYS]
    keys = [c for c in DETAIL_KEYS if c in table.columns]
    taken: set[str] = set()
    out = []
    for title, names in DETAIL_THEMES:
        own = [c for c in cols if c not in taken and any(
            c.startswith(n[:-1]) if n.endswith("*") else c == n for n in names)]
        taken.update(own)
        if own:
            out.append((title, table[keys + own]))
    rest = [c for c in cols if c not in taken]
    if rest:
        out.append(("Other", table[keys + rest]))
    return out


def tests_display(tests: pd.DataFrame) -> pd.DataFrame:
    """The significance tests (`reports.stats.significance_vs_vanilla`) as display strings,
    the same in report.md and index.html: differences and interval bounds to 4 decimals,
    p-values by `reports.stats.format_p` ("<0.001", else 3 decimals), significant yes/no."""
    out = tests.copy().astype(object)
    for col in ("diff", "ci_low", "ci_high"):
        if col in tests:
            out[col] = ["-" if is_missing(v) else f"{v:.4f}" for v in tests[col]]
    if "p" in tests:
        out["p"] = [format_p(v) for v in tests["p"]]
    if "significant" in tests:
        out["significant"] = tests["significant"].map({True: "yes", False: "no"})
    return out


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
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    table = comparison_table(records)
    tests = significance_vs_vanilla(records, run_dir)
    layout = paper_layout(table, tests)
    view = paper_view(table)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") == "failed"]
    interrupted = [r for r in records if r.get("status") == "interrupted"]
    resumed = [r["run_id"] for r in ok if r.get("resumed")]
    suite = records[0].get("suite", {})
    hw = ok[0]["provenance"]["hardware"] if ok else {}
    git = ok[0]["provenance"]["git"] if ok else {}
    layout_out, view_out = render_formats(layout), render_formats(view)
    lines = [
        f"# mor-bench report: {suite.get('name', run_dir.name)}", "",
        f"- run directory: `{run_dir}`",
        f"- suite: `{suite.get('source')}` (sha256 {str(suite.get('sha256'))[:12]})",
        f"- hardware: {hardware_summary(hw) if hw else 'unknown'}",
        f"- code: {git.get('commit') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}",
        f"- runs: {len(ok)} ok, {len(failed)} failed"
        + (f", {len(interrupted)} interrupted (continue with `mor-bench run SUITE --resume "
           f"{run_dir}`)" if interrupted else ""),
        f"- resumed after an interruption: {', '.join(resumed)} (their times count each "
        "completed step once; the work lost to the kill is not in them)" if resumed else None,
        "- MoR `val_nll` uses top-k routing over each window (the paper's protocol; it is "
        "NOT causal: later tokens decide which earlier tokens recurse). `val_nll_causal` "
        "routes each token by its own router (sigmoid > 0.5) and is causal."
        if any(r.get("eval_routing") == "topk" for r in ok) else "",
        "- `sampling_acc` / `dead_token_ratio` (expert-choice, validation under top-k): how "
        "often the causal rule agrees with top-k membership / share of positions no sequence "
        "sends through the last step. `maxvio` (token-choice): (max load - mean) / mean. "
        "`flops_per_token_effective`: the paper convention with the routing the run took."
        if ok and any(r.get("family") == "mor" for r in ok) else "",
        "", "## Headline", "", to_markdown(headline_table(table)), "", headline_note(table),
        "", *((["## Contended runs", ""] + contention_note(records) + [""])
              if contention_note(records) else []), "## Detail", "",
        "Relative columns compare with the vanilla model of the same budget in this run "
        "(NLL as a difference, the rest as ratios). Tokens/s and time cover optimizer steps "
        "only. `tokens_per_s` / `rel_tokens_per_s` are sequential (each run timed while it "
        "trained, minutes apart from the others): information, not a comparison. "
        + ("`speed_tokens_per_s` / `speed_rel_tokens_per_s` are interleaved (the runs' "
           "training steps timed in alternating rounds in one process): the comparable "
           "ratio, shown as Tok/s below. " if "speed_rel_tokens_per_s" in table else "")
        + "Peak memory is "
        + (f"`{ok[0]['metrics'].get('peak_mem_kind')}`." if ok else "-")
        + " Every column, with the 95% half-widths (`_ci95`), is in report.csv.", "",
    ]
    for title, frame in detail_tables(table):
        lines += [f"### {title}", "", to_markdown(frame), ""]
    if ok:
        lines += ["## As the paper's Table 3", "",
                  "Accuracies in %; Time, Mem and Tok/s (training) relative to vanilla; "
                  "Time is each run's own wall time (sequential). "
                  + SIGNIFICANCE_NOTE, "", layout_out["md"], ""]
    if not tests.empty:
        lines += ["## Significance tests vs vanilla", "",
                  to_markdown(tests_display(tests)), ""]
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
