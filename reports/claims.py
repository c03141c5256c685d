"""The paper's claims, one by one, tested on a suite's records (a pure function of records).

Each claim compares two cells of a study -- a model against another at the same budget, or
one model under two evaluation modes -- paired by seed: per seed the difference (or, for
time and memory, the ratio) of a metric, then over the seeds their mean, a 95% t
confidence interval and a paired two-sided t test (`paired_effect`). The cells are named by
the suite's model names; `CPU_STUDY_CLAIMS` names those of the `cpu-study` suite, with the
paper's own effect beside each (Table 3, 360M at 16.5e18 FLOPs, and its fixed-token
efficiency claim; Bae et al. 2025, arXiv 2507.10524). A claim whose cells were not run is
reported as such, never dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from reports.frame import budget_label, fewshot_scores, model_name, ok_records
from reports.frame import metric as metric_of
from reports.stats import LEVEL, t_cdf, t_quantile


@dataclass(frozen=True)
class Claim:
    name: str
    """What the paper says, in one line."""
    a: str
    """The suite model name of the cell tested (e.g. "mor-2")."""
    b: str
    """The model it is compared with (e.g. "vanilla")."""
    metric: str
    """A `METRICS` key."""
    budget: str = "each"
    """"each": every budget both cells ran (one row per budget); "a": the first model's
    budget against the second's smallest FLOPs budget (fixed-token rows)."""
    paper: float | None = None
    """The paper's effect on the same scale (difference, or ratio for "ratio" metrics)."""
    b_metric: str | None = None
    """For a within-model claim (a == b): the second metric (e.g. causal vs top-k NLL)."""


def _val_nll(rec: dict[str, Any]) -> float | None:
    return (rec.get("metrics") or {}).get("val_nll")


def _by_routing(mode: str):
    def read(rec: dict[str, Any]) -> float | None:
        return ((rec.get("metrics") or {}).get("val_nll_by_routing") or {}).get(mode)
    return read


def _fewshot_avg(rec: dict[str, Any]) -> float | None:
    return fewshot_scores(rec).get("fewshot_avg")


def _metric(key: str):
    def read(rec: dict[str, Any]) -> float | None:
        return (rec.get("metrics") or {}).get(key)
    return read


def _train_time_side_by_side(rec: dict[str, Any]) -> float | None:
    """Tokens trained / the training tokens/s of the suite's interleaved `[speed]` phase
    (`metrics.speed`): the run's training time at the speed measured side by side with the
    other runs, in alternating rounds of one process (README, "Busy machines"). None
    without a `[speed]` phase."""
    tps, tokens = metric_of(rec, "speed", "tokens_per_s"), metric_of(rec, "tokens")
    return tokens / tps if tps and tokens else None


METRICS: dict[str, tuple[Any, str, str]] = {
    # key: (reader, "diff" | "ratio", label)
    "val_nll": (_val_nll, "diff", "val NLL (the model's primary routing)"),
    "val_nll_topk": (_by_routing("topk"), "diff", "val NLL, top-k routing"),
    "val_nll_causal": (_by_routing("causal"), "diff", "val NLL, causal routing"),
    "fewshot_avg": (_fewshot_avg, "diff", "few-shot average accuracy"),
    "train_time_s": (_metric("train_time_s"), "ratio",
                     "training time (sequential: each run's own timing)"),
    "train_time_interleaved": (_train_time_side_by_side, "ratio",
                               "training time (side by side: tokens / [speed] tokens/s)"),
    "peak_mem_bytes": (_metric("peak_mem_bytes"), "ratio", "peak memory"),
}

# The paper's numbers (Table 3): NLL MoR-2 2.7511 vs vanilla 2.7824; MoR-3 2.7925 vs recursive-3
# 2.8466; MoR-2 2.7511 vs recursive-2 2.8079; token-choice MoR-3 2.9163; KV sharing MoR-3
# 2.7983; fixed 20B tokens, MoR-2 vs vanilla: 19% less training time, 25% less peak memory.
CPU_STUDY_CLAIMS: tuple[Claim, ...] = (
    Claim("MoR-2 reaches a lower NLL than vanilla at equal FLOPs", "mor-2", "vanilla",
          "val_nll", paper=2.7511 - 2.7824),
    Claim("MoR-3 vs vanilla at equal FLOPs", "mor-3", "vanilla", "val_nll"),
    Claim("MoR-4 vs vanilla at equal FLOPs", "mor-4", "vanilla", "val_nll"),
    Claim("MoR-2 beats vanilla in few-shot accuracy at equal FLOPs", "mor-2", "vanilla",
          "fewshot_avg", paper=(43.1 - 42.3) / 100),
    Claim("MoR-2 beats the recursive model of the same sharing", "mor-2", "rec-2", "val_nll",
          paper=2.7511 - 2.8079),
    Claim("MoR-3 beats the recursive model of the same sharing", "mor-3", "rec-3", "val_nll",
          paper=2.7925 - 2.8466),
    Claim("Token-choice routing is worse than expert-choice (N_r = 3)", "mor-3-token", "mor-3",
          "val_nll_causal", paper=2.9163 - 2.7925),
    Claim("Recursive KV sharing costs little against caching (N_r = 3)", "mor-3-share",
          "mor-3", "val_nll", paper=2.7983 - 2.7925),
    Claim("Causal evaluation routing costs NLL against top-k (MoR-3)", "mor-3", "mor-3",
          "val_nll_causal", b_metric="val_nll_topk"),
    Claim("Same tokens: MoR-2 trains faster than vanilla", "mor-2-fixed-tokens", "vanilla",
          "train_time_s", budget="a", paper=0.81),
    Claim("Same tokens: MoR-2 trains faster than vanilla, timed side by side",
          "mor-2-fixed-tokens", "vanilla", "train_time_interleaved", budget="a", paper=0.81),
    Claim("Same tokens: MoR-2 needs less peak memory than vanilla", "mor-2-fixed-tokens",
          "vanilla", "peak_mem_bytes", budget="a", paper=0.75),
    Claim("Same tokens: MoR-2's NLL against vanilla's", "mor-2-fixed-tokens", "vanilla",
          "val_nll", budget="a", paper=2.7749 - 2.7824),
    Claim("Same tokens: MoR-3 trains faster than vanilla", "mor-3-fixed-tokens", "vanilla",
          "train_time_s", budget="a"),
    Claim("Same tokens: MoR-3 trains faster than vanilla, timed side by side",
          "mor-3-fixed-tokens", "vanilla", "train_time_interleaved", budget="a"),
    Claim("Same tokens: MoR-4 trains faster than vanilla", "mor-4-fixed-tokens", "vanilla",
          "train_time_s", budget="a"),
    Claim("Same tokens: MoR-4 trains faster than vanilla, timed side by side",
          "mor-4-fixed-tokens", "vanilla", "train_time_interleaved", budget="a"),
)


def paired_effect(a: list[float], b: list[float], kind: str = "diff",
                  level: float = LEVEL) -> dict[str, float]:
    """Per-pair effect (a - b, or a / b for kind "ratio") over n paired values: its mean,
    the t confidence interval at `level` and the two-sided paired t test's p (for ratios
    the test is on log ratios: H0 ratio = 1). n = 1 gives NaN interval and p."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("paired_effect needs two equally long, non-empty lists")
    d = x / y if kind == "ratio" else x - y
    tested = np.log(d) if kind == "ratio" else d
    n = int(d.size)
    out = {"effect": float(d.mean()), "n": n, "ci_low": math.nan, "ci_high": math.nan,
           "p": math.nan}
    if n < 2:
        return out
    sd = float(tested.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    centre = float(tested.mean())
    lo, hi = centre - half, centre + half
    out["ci_low"], out["ci_high"] = (math.exp(lo), math.exp(hi)) if kind == "ratio" else (lo, hi)
    if kind == "ratio":
        out["effect"] = math.exp(centre)  # the geometric mean ratio, the interval's centre
    if sd == 0:
        out["p"] = 0.0 if centre != 0 else 1.0
    else:
        t = centre / (sd / math.sqrt(n))
        out["p"] = 2 * (1 - t_cdf(abs(t), n - 1))
    return out


def _cells(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """{(model, budget label): {seed: record}} over ok records."""
    out: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for rec in ok_records(records):
        out.setdefault((model_name(rec), budget_label(rec)), {})[int(rec.get("seed", 0))] = rec
    return out


def _smallest_flops_budget(cells, model: str) -> str | None:
    budgets = [(float(k[1].split()[0]), k[1]) for k in cells
               if k[0] == model and k[1].endswith(" flops")]
    return min(budgets)[1] if budgets else None


def evaluate_claims(records: list[dict[str, Any]],
                    claims: tuple[Claim, ...] = CPU_STUDY_CLAIMS) -> list[dict[str, Any]]:
    """One row per claim and budget: {"claim", "a", "b", "budget", "metric", "kind",
    "effect", "ci_low", "ci_high", "p", "n" (seeds paired), "paper", "verdict"} --
    verdict "supported" / "contradicted" (the interval excludes no-effect and lies on the
    paper's side / the other side), "inconclusive" (it includes no effect), "one seed: no
    test", "effect > 0" etc. (no paper figure to side with), or "not run"."""
    cells = _cells(records)
    rows = []
    for c in claims:
        read_a, kind, label = METRICS[c.metric]
        read_b = METRICS[c.b_metric][0] if c.b_metric else read_a
        if c.budget == "a":
            pairs = [(k[1], _smallest_flops_budget(cells, c.b)) for k in cells if k[0] == c.a]
        else:
            pairs = [(k[1], k[1]) for k in cells if k[0] == c.a and (c.b, k[1]) in cells]
        base = {"claim": c.name, "a": c.a, "b": c.b, "metric": label, "kind": kind,
                "paper": c.paper}
        if c.b_metric:
            base["metric"] = f"{label} - {METRICS[c.b_metric][2]}"
        if not pairs or any(bb is None or (c.b, bb) not in cells for _, bb in pairs):
            rows.append({**base, "budget": "-", "effect": math.nan, "ci_low": math.nan,
                         "ci_high": math.nan, "p": math.nan, "n": 0, "verdict": "not run"})
            continue
        for ba, bb in pairs:
            seeds = sorted(set(cells[(c.a, ba)]) & set(cells[(c.b, bb)]))
            va = [read_a(cells[(c.a, ba)][s]) for s in seeds]
            vb = [read_b(cells[(c.b, bb)][s]) for s in seeds]
            keep = [i for i, (x, y) in enumerate(zip(va, vb)) if x is not None and y is not None]
            budget = ba if ba == bb else f"{ba} vs {bb}"
            if not keep:
                rows.append({**base, "budget": budget, "effect": math.nan, "ci_low": math.nan,
                             "ci_high": math.nan, "p": math.nan, "n": 0,
                             "verdict": "not measured"})
                continue
            eff = paired_effect([va[i] for i in keep], [vb[i] for i in keep], kind)
            rows.append({**base, "budget": budget, **eff, "verdict": _verdict(eff, kind, c)})
    return rows


def _verdict(eff: dict[str, float], kind: str, claim: Claim) -> str:
    null = 1.0 if kind == "ratio" else 0.0
    lo, hi = eff["ci_low"], eff["ci_high"]
    if eff["n"] < 2:
        return "one seed: no test"
    if math.isnan(lo) or lo <= null <= hi:
        return "inconclusive"
    if claim.paper is None:
        return "effect" + (" > " if lo > null else " < ") + ("1" if kind == "ratio" else "0")
    same_side = (lo > null) == (claim.paper > null)
    return "supported" if same_side else "contradicted"


def _num(x: float, kind: str, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if kind == "ratio":
        return f"{x:.3f}x"
    if "accuracy" in metric:
        return f"{100 * x:+.2f} pt"
    return f"{x:+.4f}"


def claims_markdown(rows: list[dict[str, Any]]) -> str:
    """The claims table in Markdown: effect, 95% CI over seeds, paired t test, the paper's
    effect and the verdict."""
    head = ("| claim | A vs B | budget | metric | effect (A vs B) | 95% CI | p (paired t) | "
            "seeds | paper | verdict |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ci = ("-" if math.isnan(r["ci_low"]) else
              f"[{_num(r['ci_low'], r['kind'], r['metric'])}, "
              f"{_num(r['ci_high'], r['kind'], r['metric'])}]")
        p = "-" if math.isnan(r["p"]) else ("<0.001" if r["p"] < 0.001 else f"{r['p']:.3f}")
        paper = "-" if r["paper"] is None else _num(r["paper"], r["kind"], r["metric"])
        lines.append(f"| {r['claim']} | {r['a']} vs {r['b']} | {r['budget']} | {r['metric']} "
                     f"| {_num(r['effect'], r['kind'], r['metric'])} | {ci} | {p} | {r['n']} "
                     f"| {paper} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# uptraining (docs/uptraining.md): each uptrained model against the same model from scratch


def _shape(rec: dict[str, Any]) -> tuple:
    cfg = rec.get("config") or {}
    return (rec.get("family"), cfg.get("num_recursions"), cfg.get("router"), cfg.get("kv"),
            cfg.get("sharing"), budget_label(rec))


def uptrain_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per uptrained model (a record with `init`): its val NLL over seeds (mean and
    95% t interval) and, paired by seed with the model of the same family, N_r, router, KV
    mode, sharing and budget trained from scratch, the difference (uptrained - scratch:
    negative = uptraining helps), its interval and paired t test. The pretrained source's
    own NLL (its record in the same suite, when there) is given for reference."""
    cells = _cells(records)
    by_run = {r.get("run_id"): r for r in ok_records(records)}
    scratch: dict[tuple, tuple[str, str]] = {}
    for key, seeds in cells.items():
        rec = next(iter(seeds.values()))
        if not rec.get("init"):
            scratch.setdefault(_shape(rec), key)
    rows = []
    for key, seeds in cells.items():
        first = next(iter(seeds.values()))
        init = first.get("init")
        if not init:
            continue
        nll = [(s, (r.get("metrics") or {}).get("val_nll")) for s, r in sorted(seeds.items())]
        vals = [v for _, v in nll if v is not None]
        mean = float(np.mean(vals)) if vals else math.nan
        half = (t_quantile(0.5 + LEVEL / 2, len(vals) - 1) * float(np.std(vals, ddof=1))
                / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
        source_run = (init.get("run") or "").removeprefix("run:")
        src = by_run.get(source_run) or by_run.get(str(init.get("source", "")).split("/")[-1])
        row = {"model": key[0], "budget": key[1], "method": init.get("method") or "continued",
               "n": len(vals), "val_nll": mean, "ci_half": half,
               "source_nll": ((src or {}).get("metrics") or {}).get("val_nll"),
               "scratch": None, "effect": math.nan, "ci_low": math.nan, "ci_high": math.nan,
               "p": math.nan}
        other = scratch.get(_shape(first))
        if other is not None:
            base = cells[other]
            common = [s for s, v in nll if v is not None and s in base
                      and (base[s].get("metrics") or {}).get("val_nll") is not None]
            if common:
                eff = paired_effect([seeds[s]["metrics"]["val_nll"] for s in common],
                                    [base[s]["metrics"]["val_nll"] for s in common])
                row.update(scratch=other[0], effect=eff["effect"], ci_low=eff["ci_low"],
                           ci_high=eff["ci_high"], p=eff["p"])
        rows.append(row)
    return rows


def uptrain_markdown(rows: list[dict[str, Any]]) -> str:
    """The uptraining table in Markdown."""
    def f(x: Any, fmt: str = "{:.4f}") -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)

    lines = ["| model | init | budget | seeds | val NLL (95% CI) | from scratch | uptrained - "
             "scratch (95% CI) | p (paired t) | pretrained source NLL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = ("-" if math.isnan(r["ci_low"]) else
              f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]")
        p = "-" if math.isnan(r["p"]) else ("<0.001" if r["p"] < 0.001 else f"{r['p']:.3f}")
        lines.append(f"| {r['model']} | {r['method']} | {r['budget']} | {r['n']} | "
                     f"{f(r['val_nll'])} ± {f(r['ci_half'])} | {r['scratch'] or '-'} | "
                     f"{f(r['effect'], '{:+.4f}')} {ci} | {p} | {f(r['source_nll'])} |")
    return "\n".join(lines) + "\n"
