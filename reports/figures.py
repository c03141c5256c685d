"""Figures of a suite run: pure functions of its records, drawn headless with matplotlib.

    from reports.figures import render_figures
    manifest = render_figures("runs/smoke-20261129-010326-9da3a0")
    # -> RUN_DIR/figures/<name>.png and .svg for each figure, RUN_DIR/figures/manifest.json

Every figure uses the Okabe-Ito colour-blind-safe palette AND a distinct marker, hatch or
line style per model, so it also reads in grayscale, and states the suite, the hardware and
the routing mode in its footer. A figure whose data the records lack is skipped with a
reason (a model that lacks a metric is left out and named in the caption): a missing metric
is never drawn as zero. No pyplot: figures are `matplotlib.figure.Figure` objects saved
with the Agg (PNG) and SVG backends, so nothing opens a window or touches global state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from evals.suite.record import (
    DEPTH_SAMPLE,
    check_depth_export,
    hardware_summary,
    load_records,
    read_json,
    write_json_atomic,
)
from reports.frame import FAMILY_ORDER, budget_label, fewshot_scores, get, metric, num
from reports.table import comparison_table, train_time_ratio

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "mor-bench/figures/v1"
# Okabe & Ito (2008): distinguishable with any colour-vision deficiency. Yellow last (weak
# on white).
OKABE_ITO = ("#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
             "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "//", "..", "xx", "\\\\", "++", "oo", "--")
FAMILY_LINESTYLE = {"vanilla": "-", "recursive": "--", "mor": "-."}
MODE_LINESTYLE = {"topk": "-", "causal": "--", "token": ":"}
DEPTH_CMAP = "cividis"  # sequential, perceptually uniform, colour-blind safe
_RC = {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.color": "#dddddd",
       "grid.linewidth": 0.6, "axes.axisbelow": True, "legend.fontsize": 8,
       "svg.hashsalt": "mor-bench", "hatch.linewidth": 0.8}


class FigureSkipped(Exception):
    """The records lack what a figure needs; the message says what."""


@dataclass
class Built:
    """A drawn figure, its caption, and the values it plots (per series) for checks."""

    fig: Figure
    caption: str
    title: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Style:
    color: str
    marker: str
    hatch: str
    linestyle: str


# --------------------------------------------------------------------------------------------
# record access and shared context


def _mode_label(mode: str | None) -> str:
    return {"topk": "top-k (non-causal)", "causal": "causal", "token": "token-choice"}.get(
        str(mode), str(mode))


def _routing_key(rec: dict[str, Any]) -> str:
    """How a MoR record's validation metrics were routed: topk, causal or token."""
    return "token" if rec.get("router") == "token" else str(rec.get("eval_routing"))


class _Ctx:
    """What every figure of one suite run shares: its records, styles, suite, hardware."""

    def __init__(self, records: list[dict[str, Any]], run_dir: Path | None = None):
        self.all = records
        self.ok = [r for r in records if r.get("status") == "ok"]
        self.run_dir = run_dir
        self.suite = str((records[0].get("suite") or {}).get("name", "?")) if records else "?"
        hws = []
        for r in self.ok:
            hw = get(r, "provenance", "hardware")
            s = hardware_summary(hw) if isinstance(hw, dict) else None
            if s and s not in hws:
                hws.append(s)
        self.hardware = "; ".join(hws) or "unknown"
        models = sorted({(r["model_name"], r.get("family", "")) for r in self.ok},
                        key=lambda m: (FAMILY_ORDER.get(m[1], 9), _nr(self.ok, m[0]), m[0]))
        self.models = [m for m, _ in models]
        self.styles = {m: Style(OKABE_ITO[i % len(OKABE_ITO)], MARKERS[i % len(MARKERS)],
                                HATCHES[i % len(HATCHES)], FAMILY_LINESTYLE.get(fam, ":"))
                       for i, (m, fam) in enumerate(models)}
        self.multi_budget = len({budget_label(r) for r in self.ok}) > 1

    def groups(self, recs: list[dict[str, Any]] | None = None
               ) -> list[tuple[str, str, list[dict[str, Any]]]]:
        """(model, budget label, seeds' records), in style order then budget."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in sorted(recs if recs is not None else self.ok,
                        key=lambda r: (self.models.index(r["model_name"]),
                                       float((r.get("budget") or {}).get("value", 0)),
                                       r.get("seed", 0))):
            out.setdefault((r["model_name"], budget_label(r)), []).append(r)
        return [(m, b, rs) for (m, b), rs in out.items()]

    def label(self, model: str, budget: str, sep: str = " @ ") -> str:
        return f"{model}{sep}{budget}" if self.multi_budget else model

    def mor_routing(self, recs: list[dict[str, Any]] | None = None) -> str:
        """The evaluation routing of the MoR records, e.g. 'top-k (non-causal): mor-2'."""
        by_mode: dict[str, list[str]] = {}
        for r in recs if recs is not None else self.ok:
            if r.get("family") == "mor":
                names = by_mode.setdefault(_mode_label(_routing_key(r)), [])
                if r["model_name"] not in names:
                    names.append(r["model_name"])
        if not by_mode:
            return "none (no MoR runs)"
        return "; ".join(f"{mode} for {', '.join(names)}" for mode, names in by_mode.items())

    def footer(self, routing: str) -> str:
        return f"suite: {self.suite}  |  hardware: {self.hardware}  |  routing: {routing}"

    def caption(self, what: str, routing: str, notes: list[str]) -> str:
        parts = [what.rstrip(".") + "."] + [n.rstrip(".") + "." for n in notes]
        parts.append(f"Suite: {self.suite}. Hardware: {self.hardware}. Routing: {routing}.")
        return " ".join(parts)

    def figure(self, title: str, routing: str, **kw: Any) -> Figure:
        fig = Figure(**kw)
        fig.suptitle(title, fontweight="bold")
        fig.text(0.01, 0.0, self.footer(routing), ha="left", va="top",
                          fontsize=7.5, color="#333333", wrap=True, gid="footer")
        return fig


def _nr(records: list[dict[str, Any]], model: str) -> int:
    for r in records:
        if r["model_name"] == model:
            return int(get(r, "config", "num_recursions") or 0) if r.get("family") != \
                "vanilla" else 0
    return 0


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def _missing_note(what: str, names: list[str]) -> list[str]:
    return [f"Not shown (no {what}): {', '.join(names)}"] if names else []


def _skip_if_none(ok: list[dict[str, Any]]) -> None:
    if not ok:
        raise FigureSkipped("no successful runs in the records")


def _legend(ax, **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(frameon=False, **kw)


# --------------------------------------------------------------------------------------------
# 1. validation NLL vs training FLOPs


def _build_isoflop(ctx: _Ctx) -> Built:
    """NLL against training FLOPs: a log-scale curve per model over several budgets; with
    ONE budget there is no curve to draw, so a categorical axis with a point per model."""
    _skip_if_none(ctx.ok)
    series, missing, any_seeds, budgets = {}, [], False, set()
    for model in ctx.models:
        xs, ys, es, ns = [], [], [], []
        for m, budget, rs in ctx.groups():
            if m != model:
                continue
            pts = [(metric(r, "flops_used"), metric(r, "val_nll")) for r in rs]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            if not pts:
                continue
            budgets.add(budget)
            xs.append(_mean_sd([x for x, _ in pts])[0])
            y, sd = _mean_sd([y for _, y in pts])
            ys.append(y)
            es.append(sd)
            ns.append(len(pts))
        if not xs:
            missing.append(model)
            continue
        order = np.argsort(xs)
        series[model] = [[v[i] for i in order] for v in (xs, ys, es, ns)]
    if not series:
        raise FigureSkipped("no run records both metrics.flops_used and metrics.val_nll")
    single = len(budgets) == 1
    fig = ctx.figure("Validation NLL per model (one training budget)" if single else
                     "Validation NLL vs training FLOPs (isoFLOP view)",
                     ctx.mor_routing(), figsize=(7, 4.6))
    ax = fig.add_subplot()
    data = {}
    for pos, (model, (xs, ys, es, ns)) in enumerate(series.items()):
        st = ctx.styles[model]
        several = max(ns) > 1
        any_seeds |= several
        label = model + (f" (n={'/'.join(map(str, ns))} seeds)" if several else "")
        yerr = [math.nan if e is None else e for e in es] if several else None
        ax.errorbar([pos] * len(xs) if single else xs, ys, yerr=yerr, color=st.color,
                    marker=st.marker, linestyle="none" if single else st.linestyle,
                    capsize=3, markersize=6, label=label)
        data[model] = {"x": xs, "y": ys, "yerr": es if several else None, "n": ns}
    if single:
        names = list(series)
        ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0,
                      ha="right" if len(names) > 4 else "center")
        ax.set_xlim(-0.6, len(names) - 0.4)
        flops = [x for d in data.values() for x in d["x"]]
        ax.set_xlabel(f"model (one budget, {next(iter(budgets))}; training FLOPs used "
                      f"{min(flops):.3g}-{max(flops):.3g})")
    else:
        ax.set_xscale("log")
        all_x: list[float] = []
        for x in sorted(x for d in data.values() for x in d["x"]):
            if not all_x or x > all_x[-1] * 1.03:  # one tick per budget, not per run
                all_x.append(x)
        if all_x[-1] / all_x[0] < 10:  # under a decade: label the budgets, not minor ticks
            ax.set_xticks(all_x, [f"{x:.3g}" for x in all_x])
            ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
            lo, hi = math.log10(all_x[0]), math.log10(all_x[-1])
            pad = max(0.05, 0.08 * (hi - lo))
            ax.set_xlim(10 ** (lo - pad), 10 ** (hi + pad))
        ax.set_xlabel("training FLOPs (forward, paper convention; log scale)")
    ax.set_ylabel("validation NLL (lower is better)")
    _legend(ax, loc="best")
    notes = ["Mean over seeds; error bars +/- 1 s.d. where a model has several seeds"
             if any_seeds else "One seed per point"] + _missing_note("val_nll/flops_used",
                                                                     missing)
    what = ("Validation NLL of each model trained under the one budget of this run (no "
            "FLOPs axis: one budget gives no curve)" if single else
            "Validation NLL against the training FLOPs actually used, one series per model")
    caption = ctx.caption(what, ctx.mor_routing(), notes)
    return Built(fig, caption, "Validation NLL per model" if single else
                 "Validation NLL vs training FLOPs", data)


# --------------------------------------------------------------------------------------------
# 2. loss curves


def _curve(rec: dict[str, Any]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for pt in rec.get("loss_curve") or []:
        x, y = num(get(pt, "tokens")), num(get(pt, "loss"))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _build_loss_curves(ctx: _Ctx) -> Built:
    _skip_if_none(ctx.ok)
    have = [r for r in ctx.ok if _curve(r)[0]]
    if not have:
        raise FigureSkipped("no run records a loss_curve with tokens and loss")
    budgets = list(dict.fromkeys(b for _, b, _ in ctx.groups(have)))
    routing = "training uses top-k (expert-choice) / the router's depth (token-choice)"
    ncols = min(len(budgets), 3)
    nrows = math.ceil(len(budgets) / ncols)
    fig = ctx.figure("Training loss curves", routing,
                     figsize=(4.2 * ncols + 1.5, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    data: dict[str, Any] = {}
    for ax, budget in zip(axes, budgets):
        for model, b, rs in ctx.groups(have):
            if b != budget:
                continue
            st = ctx.styles[model]
            for i, r in enumerate(rs):
                xs, ys = _curve(r)
                ax.plot(xs, ys, color=st.color, linestyle=st.linestyle, marker=st.marker,
                        markevery=max(1, len(xs) // 8), markersize=4, linewidth=1.3,
                        alpha=1.0 if i == 0 else 0.55,
                        label=(model + (f" ({len(rs)} seeds)" if len(rs) > 1 else ""))
                        if i == 0 else None)
                data[r["run_id"]] = {"x": xs, "y": ys}
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss (NLL)")
        _legend(ax, loc="upper right")
    for ax in axes[len(budgets):]:
        ax.set_visible(False)
    missing = sorted({r["model_name"] for r in ctx.ok} - {r["model_name"] for r in have})
    caption = ctx.caption("Training loss against training tokens, one line per run (lighter "
                          "lines: further seeds), one panel per budget", routing,
                          _missing_note("loss_curve", missing))
    return Built(fig, caption, "Training loss curves", data)


# --------------------------------------------------------------------------------------------
# 3. few-shot average vs inference throughput


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(x2 >= x and y2 >= y and (x2 > x or y2 > y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _fewshot_avg_as_inferred(rec: dict[str, Any]) -> tuple[float | None, str | None, bool]:
    """(few-shot average, its routing mode, whether that mode differs from the inference
    benchmark's) of a record, taken under the routing its throughput was measured with.

    Expert-choice MoR is evaluated few-shot under top-k (the paper's protocol) but generates
    under causal routing, so its accuracy under that routing is
    `metrics.fewshot.by_routing.<infer routing>` when recorded; without it the default
    (top-k) score is returned and flagged as a mismatch."""
    score = fewshot_scores(rec).get("fewshot_avg")
    if rec.get("family") != "mor" or rec.get("router") == "token":
        return score, ("token" if rec.get("router") == "token" else None), False
    fs_mode = get(rec, "metrics", "fewshot", "routing")
    inf_mode = get(rec, "metrics", "infer", "routing")
    if not inf_mode or fs_mode == inf_mode:
        return score, fs_mode, False
    tasks = get(rec, "metrics", "fewshot", "by_routing", inf_mode)
    if isinstance(tasks, dict):
        same = fewshot_scores({"metrics": {"fewshot": {"tasks": tasks}}}).get("fewshot_avg")
        if same is not None:
            return same, inf_mode, False
    return score, fs_mode, score is not None


def _build_fewshot_throughput(ctx: _Ctx) -> Built:
    _skip_if_none(ctx.ok)
    if not any(metric(r, "infer", "tokens_per_s") is not None for r in ctx.ok):
        raise FigureSkipped("no run records metrics.infer.tokens_per_s (the inference "
                            "benchmark did not run)")
    if not any("fewshot_avg" in fewshot_scores(r) for r in ctx.ok):
        raise FigureSkipped("no run records few-shot results (metrics.fewshot); the suite "
                            "has no [eval] tasks")
    pts, labels, styles, models, data, missing = [], [], [], [], {}, []
    modes_fs, modes_inf, mismatched = set(), set(), []
    for model, budget, rs in ctx.groups():
        scored = {r["run_id"]: _fewshot_avg_as_inferred(r) for r in rs}
        pairs = [(metric(r, "infer", "tokens_per_s"), scored[r["run_id"]][0]) for r in rs]
        keep = [(x, y) for x, y in pairs if x is not None and y is not None]
        if not keep:
            missing.append(ctx.label(model, budget))
            continue
        for r in rs:
            if r.get("family") == "mor":
                tok = r.get("router") == "token"
                modes_fs.add(_mode_label("token" if tok else scored[r["run_id"]][1]))
                modes_inf.add(_mode_label("token" if tok else
                                          get(r, "metrics", "infer", "routing")))
        if any(scored[r["run_id"]][2] for r in rs
               if metric(r, "infer", "tokens_per_s") is not None):
            mismatched.append(ctx.label(model, budget))
        x, y = _mean_sd([x for x, _ in keep])[0], 100 * _mean_sd([y for _, y in keep])[0]
        pts.append((x, y))
        labels.append(ctx.label(model, budget))
        styles.append(ctx.styles[model])
        models.append(model)
        data[ctx.label(model, budget)] = {"x": x, "y": y, "n": len(keep)}
    if not pts:
        raise FigureSkipped("no run records both metrics.infer.tokens_per_s and few-shot "
                            "results")
    routing = (f"few-shot {', '.join(sorted(modes_fs))}; inference "
               f"{', '.join(sorted(modes_inf))}" if modes_fs else "no MoR runs")
    fig = ctx.figure("Few-shot accuracy vs inference throughput", routing, figsize=(7, 4.6))
    ax = fig.add_subplot()
    seen: set[str] = set()
    for (x, y), label, st, model in zip(pts, labels, styles, models):
        ax.scatter([x], [y], color=st.color, marker=st.marker, s=55, zorder=3,
                   label=None if model in seen else model)
        seen.add(model)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7.5)
    front = _pareto(pts)
    fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
    ax.plot(fx, fy, color="#555555", linestyle=":", linewidth=1.2, zorder=2)
    ax.scatter(fx, fy, s=190, facecolors="none", edgecolors="#555555", linewidths=1.2,
               zorder=2, label="Pareto frontier")
    xs = [p[0] for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("inference throughput (tokens/s, metrics.infer)")
    ax.set_ylabel("few-shot average accuracy (%)")
    _legend(ax, loc="best")
    data["pareto"] = [labels[i] for i in front]
    notes = _missing_note("infer tokens/s or few-shot results", missing)
    if mismatched:
        notes.append("Accuracy and throughput under DIFFERENT routing (no few-shot results "
                     "under the inference routing, metrics.fewshot.by_routing): "
                     + ", ".join(mismatched))
    caption = ctx.caption("Few-shot average accuracy against inference tokens/s, mean over "
                          "seeds, each point's accuracy under the routing its throughput was "
                          "measured with (expert-choice MoR: causal, from "
                          "metrics.fewshot.by_routing); ringed points form the Pareto "
                          "frontier (no model is both faster and more accurate)",
                          routing, notes)
    return Built(fig, caption, "Few-shot accuracy vs inference throughput", data)


# --------------------------------------------------------------------------------------------
# 4. training time and peak memory relative to vanilla


def _build_relative_cost(ctx: _Ctx) -> Built:
    _skip_if_none(ctx.ok)
    if not any(r.get("family") == "vanilla" for r in ctx.ok):
        raise FigureSkipped("no vanilla run to compare with")
    table = comparison_table(ctx.ok)
    # Training time from the interleaved [speed] measurement where the records have it,
    # else the sequential per-run times -- said so in the title and the legend.
    ratio, sequential = train_time_ratio(table)
    table = table.assign(rel_train_time=ratio)
    rows = table[table["family"] != "vanilla"]
    if rows.empty:
        raise FigureSkipped("no recursive or MoR run besides the vanilla ones")
    seq = bool(sequential[rows.index].any())
    mixed = seq and not bool(sequential[rows.index][rows["rel_train_time"].notna()].all())
    time_kind = ("sequential and interleaved" if mixed else "sequential" if seq
                 else "interleaved")
    metrics = [("rel_train_time", f"training time ({time_kind})", OKABE_ITO[1], "//"),
               ("rel_peak_mem", "peak memory", OKABE_ITO[5], "..")]
    routing = "training uses top-k (expert-choice) / the router's depth (token-choice)"
    labels, values, missing = [], {m: [] for m, *_ in metrics}, []
    for _, row in rows.iterrows():
        vals = {m: num(row[m]) for m, *_ in metrics}
        label = ctx.label(row["model"], row["budget"], "\n")
        if all(v is None for v in vals.values()):
            missing.append(label)
            continue
        labels.append(label)
        for m in values:
            values[m].append(vals[m])
    if not labels:
        raise FigureSkipped("no run has training time or peak memory next to a vanilla run "
                            "of the same budget")
    title = f"Training time ({time_kind}) and peak memory relative to vanilla"
    fig = ctx.figure(title + " (same budget)", routing,
                     figsize=(max(6.0, 1.1 * len(labels) + 2.5), 4.4))
    ax = fig.add_subplot()
    width = 0.38
    data: dict[str, Any] = {}
    x = np.arange(len(labels))
    for k, (m, name, color, hatch) in enumerate(metrics):
        pos = x + (k - 0.5) * width
        shown = [(p, v) for p, v in zip(pos, values[m]) if v is not None]
        ax.bar([p for p, _ in shown], [v for _, v in shown], width, color=color, hatch=hatch,
               edgecolor="black", linewidth=0.6, label=name)
        for p, v in zip(pos, values[m]):
            ax.annotate("n/a" if v is None else f"{v:.2f}x", (p, v if v is not None else 0),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        data[m] = dict(zip(labels, values[m]))
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="vanilla = 1")
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")
    ax.set_ylabel("ratio to vanilla of the same budget")
    ax.set_ylim(0, max(v for vs in values.values() for v in vs if v is not None) * 1.18)
    _legend(ax, loc="upper left", ncols=3)
    kinds = sorted({str(get(r, "metrics", "peak_mem_kind")) for r in ctx.ok
                    if get(r, "metrics", "peak_mem_kind")})
    notes = ["Mean over seeds; 'n/a' marks a metric a run did not record (no bar)",
             f"Peak memory is {', '.join(kinds) or 'of unknown kind'}",
             "Training time: " + {
                 "interleaved": "tokens trained / training tokens/s measured interleaved "
                                "(metrics.speed: alternating rounds in one process)",
                 "sequential": "SEQUENTIAL, each run's own wall time while it trained "
                               "(minutes apart; no interleaved measurement in the records): "
                               "information, not a controlled comparison",
             }.get(time_kind, "interleaved where measured (metrics.speed), else SEQUENTIAL "
                              "per-run wall time")]
    caption = ctx.caption("Training time and peak memory of each model as a ratio to "
                          "the vanilla model trained under the same budget", routing,
                          notes + _missing_note("training time or peak memory", missing))
    return Built(fig, caption, title, data)


# --------------------------------------------------------------------------------------------
# 5. KV-cache memory


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _analytic_kv(rec: dict[str, Any]) -> tuple[float, int] | None:
    """(bytes for one sequence, sequence length) from the record's analytic `kv_cache`
    (docs/records.md), or None when the record has none."""
    nbytes, seq = num(get(rec, "kv_cache", "bytes_per_seq")), num(get(rec, "kv_cache",
                                                                      "seq_len"))
    if nbytes is None or seq is None:
        return None
    return nbytes, int(seq)


def _build_kv_cache(ctx: _Ctx) -> Built:
    _skip_if_none(ctx.ok)
    labels, vals, kinds, styles, data, missing, seqs = [], [], [], [], {}, [], set()
    batch_sizes = set()
    for model in ctx.models:
        rs = [r for r in ctx.ok if r["model_name"] == model]
        measured = []
        for r in rs:
            b, bs = metric(r, "infer", "kv_cache_bytes"), metric(r, "infer", "batch_size")
            if b is not None:
                measured.append(b / bs if bs else b)
                batch_sizes.add(int(bs) if bs else None)
        if measured:
            value, kind = _mean_sd(measured)[0], "measured"
        else:
            analytic = next((a for a in map(_analytic_kv, rs) if a is not None), None)
            if analytic is None:
                missing.append(model)
                continue
            (value, seq), kind = analytic, "analytic"
            seqs.add(seq)
        labels.append(model)
        vals.append(value)
        kinds.append(kind)
        styles.append(ctx.styles[model])
        data[model] = {"bytes": value, "kind": kind}
    if not labels:
        raise FigureSkipped("no run records metrics.infer.kv_cache_bytes or an analytic "
                            "kv_cache")
    routing = ctx.mor_routing()
    fig = ctx.figure("KV-cache memory per sequence", routing,
                     figsize=(max(6.0, 0.95 * len(labels) + 2.5), 4.4))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    unit = next(u for u, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                if max(vals) >= f or u == "B")
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[unit]
    van = next((v for lab, v, k in zip(labels, vals, kinds)
                if lab in ctx.models and _family(ctx, lab) == "vanilla"), None)
    for xi, v, k, st in zip(x, vals, kinds, styles):
        ax.bar([xi], [v / scale], 0.65, color=st.color if k == "measured" else "white",
               edgecolor=st.color, hatch=None if k == "measured" else "///", linewidth=1.5)
        text = _fmt_bytes(v) + (f"\n{v / van:.2f}x vanilla" if van else "") + f"\n{k}"
        ax.annotate(text, (xi, v / scale), textcoords="offset points", xytext=(0, 3), ha="center",
                    fontsize=7)
    ax.set_xticks(x, labels, rotation=20 if len(labels) > 5 else 0,
                  ha="right" if len(labels) > 5 else "center")
    ax.set_ylabel(f"KV cache per sequence ({unit})")
    ax.set_ylim(0, max(vals) / scale * 1.3)
    handles = [Patch(facecolor="grey", edgecolor="grey", label="measured (metrics.infer)"),
               Patch(facecolor="white", edgecolor="grey", hatch="///",
                     label="analytic (record kv_cache)")]
    ax.legend(handles=[h for h, k in zip(handles, ("measured", "analytic")) if k in kinds],
              frameon=False, loc="upper right")
    notes = []
    if "measured" in kinds:
        notes.append("Measured: metrics.infer.kv_cache_bytes divided by the inference batch "
                     f"size ({', '.join(str(b) for b in sorted(batch_sizes, key=str))})")
    if "analytic" in kinds:
        notes.append("Analytic (hatched): the record's kv_cache, computed from the run's "
                     f"config for one sequence of {', '.join(map(str, sorted(seqs)))} tokens, "
                     "bf16, default capacities")
    caption = ctx.caption("Key/value cache memory per model", routing,
                          notes + _missing_note("KV-cache size", missing))
    return Built(fig, caption, "KV-cache memory per model", data)


def _family(ctx: _Ctx, model: str) -> str | None:
    return next((r.get("family") for r in ctx.ok if r["model_name"] == model), None)


# --------------------------------------------------------------------------------------------
# 6. depth distribution per recursion step


def _mor_groups(ctx: _Ctx) -> list[tuple[str, str, list[dict[str, Any]]]]:
    return [g for g in ctx.groups() if g[2][0].get("family") == "mor"]


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of dicts of numbers (keys any of them has; missing keys not zeroed)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    out = {}
    for k in keys:
        vals = [v for d in dicts if (v := num(d.get(k))) is not None]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def _depth_cmap(nr: int, lo: int = 0) -> tuple[ListedColormap, BoundaryNorm]:
    """Discrete cividis colours for depths lo..nr (the whole map spans the depths used)."""
    base = mpl.colormaps[DEPTH_CMAP]
    n = nr - lo + 1
    cmap = ListedColormap([base(i / max(1, n - 1)) for i in range(n)])
    return cmap, BoundaryNorm(np.arange(lo - 0.5, nr + 1.5), cmap.N)


def _build_depth_by_step(ctx: _Ctx) -> Built:
    groups = _mor_groups(ctx)
    if not groups:
        raise FigureSkipped("no MoR runs")
    shares, selected, missing = [], [], []
    for model, budget, rs in groups:
        modes = list(dict.fromkeys(m for r in rs for m in (get(r, "metrics", "depth_by_mode")
                                                           or {})))
        modes += [m for r in rs for m in (get(r, "metrics", "val_routing_by_mode") or {})
                  if m not in modes]
        found = False
        for mode in modes:
            key = "token" if rs[0].get("router") == "token" else mode
            label = f"{ctx.label(model, budget)} | {_mode_label(key)}"
            ds = [d for r in rs if isinstance(d := get(r, "metrics", "depth_by_mode", mode,
                                                        "depth_share"), dict)]
            if ds:
                shares.append((label, model, _mean_dicts(ds)))
                found = True
            sel = [{k.split("/r")[1]: v for k, v in d.items() if k.startswith("selected_frac/r")}
                   for r in rs if isinstance(d := get(r, "metrics", "val_routing_by_mode",
                                                       mode), dict)]
            sel = _mean_dicts([s for s in sel if s])
            if sel:
                selected.append((label, model, key, sel))
                found = True
        if not found:
            missing.append(ctx.label(model, budget))
    if not shares and not selected:
        raise FigureSkipped("no MoR run records metrics.depth_by_mode or per-step "
                            "selected_frac in metrics.val_routing_by_mode")
    routing = "; ".join(dict.fromkeys(lab.split(" | ")[1] for lab, *_ in shares + selected))
    panels = int(bool(shares)) + int(bool(selected))
    fig = ctx.figure("Recursion depth per token (MoR)", routing + " (per bar/line)",
                     figsize=(6.2 * panels, 0.42 * max(len(shares), 4) + 2.6))
    axes = list(fig.subplots(1, panels, squeeze=False).ravel())
    data: dict[str, Any] = {"depth_share": {}, "selected_frac": {}}
    if shares:
        ax = axes.pop(0)
        nr = max(int(k) for _, _, s in shares for k in s)
        lo = 0 if any((s.get("0") or 0) > 0 for _, _, s in shares) else 1
        cmap, norm = _depth_cmap(nr, lo)
        for row, (label, _model, share) in enumerate(shares):
            left = 0.0
            for d in range(lo, nr + 1):
                v = share.get(str(d))
                if v is None:
                    continue
                color = cmap(norm(d))
                ax.barh(row, v, left=left, color=color, edgecolor="black", linewidth=0.5,
                        hatch=HATCHES[d % len(HATCHES)] or None)
                if v >= 0.07:
                    ax.text(left + v / 2, row, f"{d}: {100 * v:.0f}%", ha="center",
                            va="center", fontsize=7, color=_ink(color),
                            bbox=dict(boxstyle="round,pad=0.1", fc=color, ec="none"))
                left += v
            data["depth_share"][label] = share
        ax.legend(handles=[Patch(facecolor=cmap(norm(d)), edgecolor="black",
                                 hatch=HATCHES[d % len(HATCHES)] or None, label=f"depth {d}")
                           for d in range(lo, nr + 1)],
                  frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1),
                  ncols=nr + 1 - lo)
        ax.set_yticks(range(len(shares)), [s[0] for s in shares])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of validation tokens at each final depth")
        ax.set_title("final depth (number of recursion steps taken)")
    if selected:
        ax = axes.pop(0)
        for label, model, key, sel in selected:
            st = ctx.styles[model]
            steps = sorted(sel, key=int)
            ax.plot([int(s) for s in steps], [sel[s] for s in steps], color=st.color,
                    marker=st.marker, linestyle=MODE_LINESTYLE.get(key, "-."), label=label)
            data["selected_frac"][label] = {int(s): sel[s] for s in steps}
        ax.set_xlabel("recursion step r")
        ax.set_ylabel("fraction of tokens selected at step r")
        ax.set_ylim(0, 1.05)
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.set_title("tokens selected per recursion step (validation)")
        _legend(ax, loc="lower left", fontsize=7)
    caption = ctx.caption("Left: share of validation tokens by the depth they reached "
                          "(metrics.depth_by_mode); right: fraction of tokens each recursion "
                          "step selected (metrics.val_routing_by_mode); one bar/line per MoR "
                          "model and evaluation routing mode (line style: solid top-k, dashed "
                          "causal, dotted token-choice); mean over seeds", routing,
                          _missing_note("depth or routing statistics", missing))
    return Built(fig, caption, "Depth distribution per recursion step", data)


def _ink(rgba: tuple[float, ...]) -> str:
    """Black or white text, whichever reads on the background colour."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


# --------------------------------------------------------------------------------------------
# 7. mean depth by token difficulty


def _build_depth_by_class(ctx: _Ctx) -> Built:
    groups = _mor_groups(ctx)
    if not groups:
        raise FigureSkipped("no MoR runs")
    series, missing = [], []
    for model, budget, rs in groups:
        mode = _routing_key(rs[0]) if rs[0].get("router") != "token" else "causal"
        classes = [c for r in rs if isinstance(c := get(r, "metrics", "depth_by_mode", mode,
                                                         "by_class"), dict)]
        if not classes:  # older records: the one mode there is
            modes = get(rs[0], "metrics", "depth_by_mode") or {}
            mode = next(iter(modes), mode)
            classes = [c for r in rs if isinstance(c := get(r, "metrics", "depth_by_mode",
                                                             mode, "by_class"), dict)]
        means = _mean_dicts([{k: get(v, "mean_depth") for k, v in c.items()} for c in classes])
        tokens = _mean_dicts([{k: get(v, "tokens") for k, v in c.items()} for c in classes])
        if not means:
            missing.append(ctx.label(model, budget))
            continue
        key = "token" if rs[0].get("router") == "token" else mode
        nr = int(get(rs[0], "config", "num_recursions") or 0)
        series.append((f"{ctx.label(model, budget)} ({_mode_label(key)})", model, key, means,
                       tokens, nr))
    if not series:
        raise FigureSkipped("no MoR run records depth by difficulty class "
                            "(metrics.depth_by_mode[mode].by_class: synthetic corpus only)")
    # The corpus's class order (record data.difficulty_classes), then any other class.
    order = list(dict.fromkeys(c for r in ctx.ok for c in get(r, "data", "difficulty_classes")
                               or [] if isinstance(c, str)))
    names = [c for c in order if any(c in s[3] for s in series)]
    names += sorted({c for s in series for c in s[3]} - set(names))
    routing = "; ".join(dict.fromkeys(_mode_label(s[2]) for s in series))
    fig = ctx.figure("Mean recursion depth by token difficulty (MoR)", routing,
                     figsize=(max(6.5, 1.3 * len(names) + 2.5), 4.4))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(names))
    data = {}
    for k, (label, model, _key, means, _tokens, _nr) in enumerate(series):
        st = ctx.styles[model]
        pos = [p for p, c in zip(x + (k - (len(series) - 1) / 2) * width, names) if c in means]
        ax.bar(pos, [means[c] for c in names if c in means], width, color=st.color,
               hatch=HATCHES[k % len(HATCHES)] or None, edgecolor="black", linewidth=0.6,
               label=label)
        data[label] = {c: means[c] for c in names if c in means}
    max_nr = max(s[5] for s in series)
    if max_nr:
        ax.axhline(max_nr, color="#777777", linestyle=":", linewidth=1)
        ax.set_ylim(0, max_nr + 0.3)
    counts = {c: int(round(np.mean([s[4][c] for s in series if c in s[4]])))
              for c in names if any(c in s[4] for s in series)}
    ax.set_xticks(x, [f"{c}\n({counts[c]:,} tokens)" if c in counts else c for c in names])
    ax.set_ylabel("mean depth (recursion steps)")
    ax.set_xlabel("token difficulty class (synthetic corpus)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    caption = ctx.caption("Mean recursion depth of validation tokens by difficulty class "
                          "(the synthetic corpus's classes: filler prose is easy; arithmetic, "
                          "recall and tracking answers are hard), each MoR model under its own "
                          "evaluation routing, mean over seeds; dotted line: N_r", routing,
                          _missing_note("depth by class", missing))
    return Built(fig, caption, "Mean depth by token difficulty", data)


# --------------------------------------------------------------------------------------------
# 8. token-level depth map of a sample text


def _find_depth_samples(ctx: _Ctx) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(record, depth export) per MoR model (its first run that has one)."""
    out, seen = [], set()
    for model, _budget, rs in _mor_groups(ctx):
        if model in seen:
            continue
        for r in rs:
            sample = r.get("depth_sample") if isinstance(r.get("depth_sample"), dict) else None
            paths = []
            if ctx.run_dir is not None:
                paths.append(ctx.run_dir / r["run_id"] / DEPTH_SAMPLE)
            if r.get("checkpoint"):
                paths.append(Path(r["checkpoint"]) / DEPTH_SAMPLE)
            for p in paths if sample is None else []:
                if p.is_file():
                    try:
                        sample = read_json(p)
                        check_depth_export(sample, where=str(p))
                    except ValueError as e:  # RecordError: not JSON, or not a depth export
                        log.warning("ignoring %s: %s", p, e)
                        sample = None
                        continue
                    break
            if sample is not None:
                out.append((r, sample))
                seen.add(model)
                break
    return out


def _display_piece(piece: str) -> str:
    out = []
    for ch in piece:
        if ch == " ":
            out.append("\u2423")  # open box
        elif ch == "\n":
            out.append("\u21b5")  # return arrow
        elif ch == "\t":
            out.append("\u2192")
        elif not ch.isprintable():
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"


def _layout(pieces: list[str], width: int) -> list[tuple[int, int, int]]:
    """(row, column, cells) of each token, wrapping at `width` cells and after newlines."""
    out, row, col = [], 0, 0
    for raw, shown in zip(pieces, map(_display_piece, pieces)):
        w = min(width, max(1, len(shown)))
        if col and col + w > width:
            row, col = row + 1, 0
        out.append((row, col, w))
        col += w
        if raw.endswith("\n"):
            row, col = row + 1, 0
    return out


def _build_depth_map(ctx: _Ctx, width: int = 56, max_samples: int = 4) -> Built:
    if not _mor_groups(ctx):
        raise FigureSkipped("no MoR runs")
    samples = _find_depth_samples(ctx)[:max_samples]
    if not samples:
        raise FigureSkipped(f"no MoR run has a {DEPTH_SAMPLE} (`mor-bench route`, "
                            "docs/records.md)")
    layouts = [_layout(s["tokens"], width) for _, s in samples]
    rows = [max(r for r, _, _ in lay) + 1 for lay in layouts]
    nr = max(int(s["num_recursions"]) for _, s in samples)
    lo = min(0 if 0 in s["depths"] else 1 for _, s in samples)
    cmap, norm = _depth_cmap(nr, lo)
    routing = "; ".join(dict.fromkeys(_mode_label(s["routing"]) for _, s in samples))
    fig = ctx.figure("Recursion depth of each token of a sample text", routing,
                     figsize=(10, sum(0.34 * n + 0.7 for n in rows) + 0.6))
    axes = fig.subplots(len(samples), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [n + 1.5 for n in rows]}).ravel()
    data = {}
    for ax, (rec, sample), lay, nrows in zip(axes, samples, layouts, rows):
        for (row, col, w), piece, depth in zip(lay, sample["tokens"], sample["depths"]):
            color = cmap(norm(depth))
            ax.add_patch(Rectangle((col, -row - 1), w, 0.92, facecolor=color,
                                   edgecolor="white", linewidth=0.5))
            ink = _ink(color)
            ax.text(col + w / 2, -row - 0.38, _display_piece(piece)[:w], ha="center",
                    va="center", fontsize=7, family="monospace", color=ink)
            ax.text(col + w / 2, -row - 0.86, str(depth), ha="center", va="bottom",
                    fontsize=5.5, color=ink)
        ax.set_xlim(0, width)
        ax.set_ylim(-nrows - 0.1, 0.05)
        ax.set_axis_off()
        mean = float(np.mean(sample["depths"])) if sample["depths"] else float("nan")
        ax.set_title(f"{rec['model_name']} ({rec['run_id']}): routing "
                     f"{_mode_label(sample['routing'])}, N_r={sample['num_recursions']}, "
                     f"{len(sample['depths'])} tokens, mean depth {mean:.2f}"
                     + (f" -- {sample['source']}" if sample.get("source") else ""),
                     fontsize=8.5, loc="left")
        data[rec["run_id"]] = {"tokens": sample["tokens"], "depths": sample["depths"]}
    sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
    cbar = fig.colorbar(sm, ax=list(axes), orientation="horizontal", fraction=0.9 /
                        (sum(rows) + 2 * len(rows)), pad=0.02, aspect=40, shrink=0.5)
    cbar.set_ticks(range(lo, nr + 1))
    cbar.set_label("recursion depth (also printed under each token)")
    names = [r["model_name"] for r in ctx.ok if r.get("family") == "mor"]
    missing = sorted(set(names) - {r["model_name"] for r, _ in samples})
    caption = ctx.caption("Each token of a sample text coloured by the number of recursion "
                          "steps it took (cividis colour map; the depth is also printed under "
                          "the token; \u2423 space, \u21b5 newline)", routing,
                          _missing_note(DEPTH_SAMPLE, missing))
    return Built(fig, caption, "Token-level depth map", data)


# --------------------------------------------------------------------------------------------
# public API


FIGURES: dict[str, Callable[[_Ctx], Built]] = {
    "isoflop": _build_isoflop,
    "loss_curves": _build_loss_curves,
    "fewshot_throughput": _build_fewshot_throughput,
    "relative_cost": _build_relative_cost,
    "kv_cache": _build_kv_cache,
    "depth_by_step": _build_depth_by_step,
    "depth_by_class": _build_depth_by_class,
    "depth_map": _build_depth_map,
}
"""Figure name -> builder, in report order."""


def build_figure(name: str, records: list[dict[str, Any]],
                 run_dir: str | Path | None = None) -> Built:
    """Draw one figure (not saved). Raises FigureSkipped with the reason when the records
    lack its data."""
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")
    with mpl.rc_context(_RC):
        return FIGURES[name](_Ctx(records, Path(run_dir) if run_dir else None))


def _place_footer(fig: Figure) -> None:
    """Move the footer just below everything else drawn (rotated tick labels included)."""
    footers = [t for t in fig.texts if t.get_gid() == "footer"]
    if not footers:
        return
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    for t in footers:
        t.set_visible(False)
    bbox = fig.get_tightbbox(renderer)
    for t in footers:
        t.set_visible(True)
        t.set_y(min(0.0, bbox.y0 / fig.get_figheight()) - 0.15 / fig.get_figheight())


def save_figure(built: Built, out_dir: str | Path, name: str) -> dict[str, str]:
    """Write <name>.png and <name>.svg; returns {"png", "svg", "caption", "title"}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png, svg = out / f"{name}.png", out / f"{name}.svg"
    with mpl.rc_context(_RC):
        _place_footer(built.fig)
        built.fig.savefig(png, dpi=150, bbox_inches="tight", facecolor="white")
        built.fig.savefig(svg, bbox_inches="tight", facecolor="white",
                          metadata={"Date": None, "Title": built.title,
                                    "Description": built.caption})
    return {"png": str(png), "svg": str(svg), "caption": built.caption, "title": built.title}


def plot_figure(name: str, records: list[dict[str, Any]], out_dir: str | Path,
                run_dir: str | Path | None = None) -> dict[str, str] | None:
    """Draw and save one figure; None (with the reason logged) when the data is missing."""
    try:
        built = build_figure(name, records, run_dir)
    except FigureSkipped as e:
        log.info("figure %s skipped: %s", name, e)
        return None
    return save_figure(built, out_dir, name)


def plot_fewshot_throughput(records: list[dict[str, Any]], out_dir: str | Path
                            ) -> dict[str, str] | None:
    """3. Few-shot average vs inference tokens/s, with the Pareto frontier."""
    return plot_figure("fewshot_throughput", records, out_dir)


def plot_depth_map(records: list[dict[str, Any]], out_dir: str | Path,
                   run_dir: str | Path | None = None) -> dict[str, str] | None:
    """8. Token-level depth map from RUN_DIR/<run_id>/depth_sample.json."""
    return plot_figure("depth_map", records, out_dir, run_dir)


def _relative(path: str | Path, run_dir: Path) -> str:
    """`path` relative to the run directory, POSIX separators ("../" when outside it)."""
    import os

    return Path(os.path.relpath(Path(path).resolve(), run_dir.resolve())).as_posix()


def render_figures(run_dir: str | Path, records: list[dict[str, Any]] | None = None,
                   out_dir: str | Path | None = None) -> dict[str, Any]:
    """Render every figure into RUN_DIR/figures/ (or out_dir) and write manifest.json.

    Returns the manifest: {"schema", "dir", "suite", "hardware",
    "figures": {name: {"png", "svg", "caption", "title"}}, "skipped": {name: reason}}.
    "dir", "png" and "svg" are POSIX paths relative to the run directory (e.g.
    "figures/isoflop.png"), so a run directory can be moved or published as it is."""
    run_dir = Path(run_dir)
    records = load_records(run_dir) if records is None else records
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Ctx(records, run_dir)
    figures: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, builder in FIGURES.items():
        try:
            with mpl.rc_context(_RC):
                built = builder(ctx)
        except FigureSkipped as e:
            log.info("figure %s skipped: %s", name, e)
            skipped[name] = str(e)
            continue
        saved = save_figure(built, out, name)
        figures[name] = {**saved, "png": _relative(saved["png"], run_dir),
                         "svg": _relative(saved["svg"], run_dir)}
    manifest = {"schema": MANIFEST_SCHEMA, "dir": _relative(out, run_dir), "suite": ctx.suite,
                "hardware": ctx.hardware, "figures": figures, "skipped": skipped}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
