"""reports/claims.py: the paper's claims tested on records, paired by seed (checked against
scipy's paired t test), with a verdict that follows the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from reports.claims import CPU_STUDY_CLAIMS, Claim, claims_markdown, evaluate_claims, paired_effect


def test_paired_effect_equals_scipy():
    a, b = [2.70, 2.74, 2.71], [2.78, 2.79, 2.775]
    got = paired_effect(a, b)
    d = np.subtract(a, b)
    ref = sps.ttest_rel(a, b)
    ci = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert got["effect"] == pytest.approx(d.mean())
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(ci, rel=1e-6)
    # ratios: geometric mean and a log-scale test
    r = paired_effect([81.0, 79.0, 83.0], [100.0, 101.0, 99.0], "ratio")
    logs = np.log(np.divide([81.0, 79.0, 83.0], [100.0, 101.0, 99.0]))
    assert r["effect"] == pytest.approx(math.exp(logs.mean()))
    assert r["p"] == pytest.approx(sps.ttest_1samp(logs, 0.0).pvalue, rel=1e-6)
    one = paired_effect([1.0], [2.0])
    assert one["effect"] == -1.0 and math.isnan(one["p"]) and math.isnan(one["ci_low"])


def _rec(model, seed, nll, budget=1e12, kind="flops", **metrics):
    return {"status": "ok", "model_name": model, "run_id": f"{model}-s{seed}", "seed": seed,
            "budget": {"kind": kind, "value": budget}, "family": "mor",
            "metrics": {"val_nll": nll, **metrics}}


def test_verdicts_follow_the_interval_and_the_papers_side():
    recs = []
    for s, noise in enumerate((0.0, 0.004, -0.003)):
        recs += [_rec("vanilla", s, 3.00 + noise, train_time_s=100.0 + s),
                 _rec("mor-2", s, 2.95 + noise),           # clearly lower: supported
                 _rec("rec-2", s, 2.90 + noise),           # MoR-2 worse than rec-2: contradicted
                 _rec("mor-3", s, 3.00 + 2 * noise),       # no clear effect: inconclusive
                 _rec("mor-2-fixed-tokens", s, 3.01, budget=3e5, kind="tokens",
                      train_time_s=80.0 + s)]
    rows = {(r["claim"], r["a"], r["b"]): r for r in evaluate_claims(recs)}
    by = {(r["a"], r["b"], r["metric"]): r for r in rows.values()}
    assert by[("mor-2", "vanilla", "val NLL (the model's primary routing)")]["verdict"] == \
        "supported"
    assert by[("mor-2", "rec-2", "val NLL (the model's primary routing)")]["verdict"] == \
        "contradicted"
    assert by[("mor-3", "vanilla", "val NLL (the model's primary routing)")]["verdict"] == \
        "inconclusive"
    fixed = by[("mor-2-fixed-tokens", "vanilla",
                "training time (sequential: each run's own timing)")]
    assert fixed["budget"] == "300000 tokens vs 1e+12 flops" and fixed["n"] == 3
    assert fixed["effect"] == pytest.approx(math.exp(np.mean(np.log(
        [80 / 100, 81 / 101, 82 / 102]))))
    assert fixed["verdict"] == "supported"                 # < 1, as the paper's 0.81
    # cells never run are listed, not dropped
    assert by[("mor-3-token", "mor-3", "val NLL, causal routing")]["verdict"] == "not run"
    assert len({r["claim"] for r in rows.values()}) == len(CPU_STUDY_CLAIMS)
    md = claims_markdown(list(rows.values()))
    assert md.count("\n") == len(rows) + 2 and "| supported |" in md and "| not run |" in md


def test_within_model_claim_pairs_two_metrics_of_the_same_runs():
    recs = [_rec("mor-3", s, 3.0, val_nll_by_routing={"topk": 3.0 + d, "causal": 3.1 + d})
            for s, d in enumerate((0.0, 0.01, 0.02))]
    claim = Claim("causal costs", "mor-3", "mor-3", "val_nll_causal", b_metric="val_nll_topk")
    (row,) = evaluate_claims(recs, (claim,))
    assert row["effect"] == pytest.approx(0.1) and row["p"] == 0.0
    assert row["verdict"] == "effect > 0"


def test_uptrain_rows_pair_each_uptrained_model_with_its_scratch_twin():
    from reports.claims import uptrain_markdown, uptrain_rows

    def rec(model, seed, nll, init=None, n_r=2, budget=1.5e12, family="recursive"):
        r = _rec(model, seed, nll, budget=budget)
        r.update(family=family, init=init, run_id=f"{model}-s{seed}",
                 config={"num_recursions": n_r, "sharing": "middle_cycle"})
        return r

    init = {"method": "average", "run": "run:pre-s0", "source": "x/pre-s0"}
    recs = [rec("pre", 0, 5.6, family="vanilla", n_r=1, budget=1.2e13)]
    for s, d in enumerate((0.0, 0.01, -0.01)):
        recs += [rec("rec-2-average", s, 5.75 + d, init=init),
                 rec("rec-2-scratch", s, 6.75 + d + 0.002 * s),
                 rec("rec-3-average", s, 5.80 + d, init=init, n_r=3)]  # no scratch twin
    rows = {r["model"]: r for r in uptrain_rows(recs)}
    assert set(rows) == {"rec-2-average", "rec-3-average"}
    avg = rows["rec-2-average"]
    assert avg["scratch"] == "rec-2-scratch" and avg["n"] == 3
    assert avg["effect"] == pytest.approx(-1.002) and avg["ci_high"] < 0
    assert avg["source_nll"] == 5.6 and avg["val_nll"] == pytest.approx(5.75)
    assert rows["rec-3-average"]["scratch"] is None
    md = uptrain_markdown(list(rows.values()))
    assert "| rec-2-average | average | 1.5e+12 flops | 3 | 5.7500 ±" in md


def test_fixed_token_time_is_also_judged_side_by_side_from_the_speed_phase():
    """The side-by-side time is tokens / metrics.speed.tokens_per_s; a record without a
    [speed] phase is "not measured", never filled in from the sequential timing."""
    recs = []
    for s, (tv, tm) in enumerate(((1000.0, 1100.0), (1010.0, 1150.0), (990.0, 1080.0))):
        recs += [_rec("vanilla", s, 3.0, tokens=3e5, train_time_s=50.0,
                      speed={"tokens_per_s": tv}),
                 _rec("mor-2-fixed-tokens", s, 3.0, budget=3e5, kind="tokens", tokens=3e5,
                      train_time_s=40.0, speed={"tokens_per_s": tm})]
    label = "training time (side by side: tokens / [speed] tokens/s)"
    rows = [r for r in evaluate_claims(recs) if r["metric"] == label]
    mor2 = next(r for r in rows if r["a"] == "mor-2-fixed-tokens")
    assert mor2["effect"] == pytest.approx(math.exp(np.mean(np.log(
        [1000 / 1100, 1010 / 1150, 990 / 1080]))))
    assert mor2["verdict"] == "supported" and mor2["paper"] == 0.81
    seq = next(r for r in evaluate_claims(recs) if r["a"] == "mor-2-fixed-tokens"
               and r["metric"].startswith("training time (sequential"))
    assert seq["effect"] == pytest.approx(0.8)          # the two measurements stay apart
    for r in recs:
        del r["metrics"]["speed"]
    again = next(r for r in evaluate_claims(recs) if r["a"] == "mor-2-fixed-tokens"
                 and r["metric"] == label)
    assert again["verdict"] == "not measured" and again["n"] == 0
