"""Tables and the accuracy-vs-throughput figure of a knob sweep (`sweep.json`, written by
`mor-bench sweep` or a suite's [sweep] phase). Pure functions of the sweep document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

from reports.figures import _RC, Built, _pareto, save_figure
from reports.frame import task_metric


def accuracy(row: dict[str, Any]) -> float | None:
    """Mean few-shot score of a point or reference over its tasks (each task's paper
    metric), None without few-shot results."""
    tasks = row.get("fewshot") or {}
    vals = []
    for task, res in tasks.items():
        v = (res.get("metrics") or {}).get(task_metric(task))
        if v is not None:
            vals.append(float(v))
    return sum(vals) / len(vals) if vals else None


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _knob_text(p: dict[str, Any]) -> str:
    k = p.get("knob") or {}
    for name in ("capacities", "thresholds", "depth_bias"):
        if k.get(name) is not None:
            vals = [x if isinstance(x, str) else f"{x:.3g}" for x in k[name]]
            return f"{name} {':'.join(vals)}"
    return "-"


def sweep_rows(res: dict[str, Any]) -> list[dict[str, str]]:
    """Display rows: one per point, then the reference models."""
    rows = []
    for p in res["points"]:
        acc = accuracy(p)
        rows.append({
            "model": res["model"], "value": str(p["value"]), "knob": _knob_text(p),
            "routing": p.get("routing", "-"),
            "val NLL": _fmt(p.get("val_nll"), ".4f"),
            "few-shot %": _fmt(acc, ".1f", 100),
            "depth (val)": _fmt(p.get("val_mean_depth"), ".2f"),
            "depth (decode)": _fmt(p.get("decode_mean_depth"), ".2f"),
            "KV B/token": _fmt(p.get("kv_bytes_per_token"), ",.0f"),
            "tokens/s": _fmt(p.get("tokens_per_s"), ",.0f"),
        })
    for r in res.get("references", []):
        rows.append({
            "model": r["model"], "value": "-", "knob": f"({r['family']})", "routing": "-",
            "val NLL": _fmt(r.get("val_nll"), ".4f"),
            "few-shot %": _fmt(accuracy(r), ".1f", 100),
            "depth (val)": "-", "depth (decode)": "-",
            "KV B/token": _fmt(r.get("kv_bytes_per_token"), ",.0f"),
            "tokens/s": _fmt(r.get("tokens_per_s"), ",.0f"),
        })
    return rows


def build_sweep_figure(res: dict[str, Any]) -> Built:
    """Left: few-shot accuracy (or, without few-shot scores, minus val NLL) against tokens/s,
    the knob's points joined in order, the Pareto front marked, reference models as their
    own markers; right: validation NLL against mean depth."""
    use_acc = all(accuracy(p) is not None for p in res["points"])
    ylab = "few-shot accuracy (%)" if use_acc else "validation NLL (nats/token)"

    def yval(row: dict[str, Any]) -> float | None:
        if use_acc:
            a = accuracy(row)
            return None if a is None else 100 * a
        return row.get("val_nll")

    fig = Figure(figsize=(9.5, 3.8))
    ax, ax2 = fig.subplots(1, 2)
    pts = [(p["tokens_per_s"], yval(p)) for p in res["points"]]
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    ax.plot(xs, ys, "-o", color="#1f77b4", ms=5, label=f"{res['model']} ({res['knob']})")
    for p, (x, y) in zip(res["points"], pts):
        depth = p.get("decode_mean_depth")
        ax.annotate(f"{p['value']}" + (f"\nd={depth:.2f}" if depth is not None else ""),
                    (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    # Higher is better on both axes for the front (NLL: lower is better, so negate).
    front = _pareto([(x, y if use_acc else -y) for x, y in pts])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o", mfc="none", mec="#d62728",
            ms=10, label="Pareto front")
    markers = {"vanilla": ("s", "#2ca02c"), "recursive": ("^", "#9467bd")}
    refs = []
    for r in res.get("references", []):
        y = yval(r)
        if y is None:
            continue
        m, c = markers.get(r["family"], ("D", "#7f7f7f"))
        ax.plot([r["tokens_per_s"]], [y], m, color=c, ms=7, label=f"{r['model']}")
        refs.append((r["model"], r["tokens_per_s"], y))
    ax.set_xlabel("generation tokens/s (measured, interleaved medians)")
    ax.set_ylabel(ylab)
    ax.set_title("accuracy vs throughput" if use_acc else "NLL vs throughput")
    ax.legend(fontsize=7, loc="best")
    depths = [p.get("val_mean_depth") for p in res["points"]]
    ax2.plot(depths, [p["val_nll"] for p in res["points"]], "-o", color="#1f77b4", ms=5)
    for r in res.get("references", []):
        ax2.axhline(r["val_nll"], ls="--", lw=1,
                    color=markers.get(r["family"], ("", "#7f7f7f"))[1], label=r["model"])
    ax2.set_xlabel("mean recursion depth (held-out windows)")
    ax2.set_ylabel("validation NLL (nats/token)")
    ax2.set_title("loss vs depth")
    if res.get("references"):
        ax2.legend(fontsize=7)
    hw = res.get("hardware") or {}
    s = res.get("settings") or {}
    fig.text(0.01, 0.0, f"{res['model']}: knob {res['knob']}"
             f"{' (calibrated)' if res.get('calibrate') else ''}; {s.get('samples')} samples x "
             f"~{s.get('gen_mean')} tokens, batch {s.get('batch_size')}, "
             f"{s.get('repeats')} interleaved rounds; "
             f"{hw.get('cpu') or hw.get('device') or ''} ({res.get('torch_threads')} threads)",
             ha="left", va="top", fontsize=7.5, color="#333333", wrap=True, gid="footer")
    fig.tight_layout()
    caption = (f"{res['model']}: each point is one setting of the {res['knob']} knob on the same "
               f"weights (label: value, decode mean depth); circled points are Pareto-optimal; "
               f"reference models decoded alike.")
    return Built(fig, caption, "MoR efficiency knob",
                 {"points": pts, "front": front, "references": refs, "depths": depths})


def render_sweep(res: dict[str, Any], out_dir: str | Path, name: str = "sweep_pareto"
                 ) -> list[str]:
    """Draw the sweep figure into out_dir; returns the written paths (png, svg)."""
    with mpl.rc_context(_RC):
        built = build_sweep_figure(res)
    saved = save_figure(built, out_dir, name)
    return [saved["png"], saved["svg"]]
