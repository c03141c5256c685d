"""Tests for `reports.stats`: the t distribution, seed intervals, Welch's test, the paired
bootstrap (known answers, and interval width, p-value and coverage against the normal
approximation), per-item few-shot files and the paired tests on the fixture run, and the
per-item results `run_tasks` returns."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lm-eval test never reaches the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from statistics import NormalDist  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from evals.suite.record import (
    RecordError,  # noqa: E402
    load_records,  # noqa: E402
)
from reports.stats import (  # noqa: E402
    TEST_COLUMNS,
    betainc,
    load_items,
    mean_ci,
    paired_bootstrap,
    paired_fewshot_tests,
    seed_tests,
    significance_vs_vanilla,
    stratified_paired_bootstrap,
    t_cdf,
    t_quantile,
    welch_test,
)
from reports.table import comparison_table  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
Z975 = NormalDist().inv_cdf(0.975)


# --- the t distribution ----------------------------------------------------------------------
@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                         (5, 2.5706), (10, 2.2281), (30, 2.0423),
                                         (math.inf, 1.9600)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_closed_forms_and_round_trip():
    for t in (-7.0, -1.3, 0.0, 0.4, 2.5, 30.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
        assert t_cdf(t, 3.7) == pytest.approx(1 - t_cdf(-t, 3.7), abs=1e-12)
    for df in (1, 2.5, 7, 120):
        for p in (0.01, 0.3, 0.9, 0.995):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)
    assert t_cdf(1.5, 1e7) == pytest.approx(NormalDist().cdf(1.5), abs=1e-6)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-4)  # 1 - sum binomial
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_functions_agree_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats", reason="scipy is an optional cross-check")
    for df in (1, 1.5, 3, 8.2, 40):
        for p in (0.6, 0.95, 0.975, 0.999):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)
        assert t_cdf(-2.2, df) == pytest.approx(stats.t.cdf(-2.2, df), rel=1e-9)


# --- seeds -----------------------------------------------------------------------------------
def test_mean_ci():
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert half == pytest.approx(4.3027 * 1.0 / math.sqrt(3), abs=1e-4)  # sd = 1
    # Missing values are left out; one value has no interval (NaN, not 0); none: no mean.
    assert mean_ci([5.0, None, math.nan])[0] == 5.0
    assert math.isnan(mean_ci([5.0, None, math.nan])[1]) and mean_ci([5.0])[2] == 1
    assert math.isnan(mean_ci([])[0]) and mean_ci([])[2] == 0
    # A wider level, a wider interval.
    assert mean_ci([1.0, 2.0, 3.0], level=0.99)[1] > half


def test_welch_test():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    res = welch_test(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 5
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 4)
    t = -3.5 / math.sqrt(va + vb)
    assert res["diff"] == pytest.approx(-3.5) and res["df"] == pytest.approx(df)
    assert res["p"] == pytest.approx(2 * t_cdf(t, df))
    half = t_quantile(0.975, df) * math.sqrt(va + vb)
    assert (res["ci_low"], res["ci_high"]) == pytest.approx((-3.5 - half, -3.5 + half))
    assert 0.05 < res["p"] < 0.1  # t = -2.25 on 5.5 dof
    # One value on a side: no test. Constant sides: the difference is exact.
    assert math.isnan(welch_test([1.0], b)["p"]) and welch_test([1.0], b)["n_a"] == 1
    assert welch_test([2.0, 2.0], [2.0, 2.0])["p"] == 1.0
    assert welch_test([3.0, 3.0], [2.0, 2.0])["p"] == 0.0


def test_welch_test_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats", reason="scipy is an optional cross-check")
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 6), rng.normal(0.8, 2, 4)
    assert welch_test(a, b)["p"] == pytest.approx(
        stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-8)


# --- the paired bootstrap --------------------------------------------------------------------
def test_bootstrap_identical_arrays():
    a = np.random.default_rng(0).integers(0, 2, 200)
    res = paired_bootstrap(a, a.copy())
    assert res["diff"] == 0.0 and (res["ci_low"], res["ci_high"]) == (0.0, 0.0)
    assert res["p"] == 1.0 and res["significant"] is False
    assert (res["n"], res["n_boot"]) == (200, 10_000)


def test_bootstrap_known_difference():
    # A model right on every item; the other wrong on 30% of them.
    n = 1000
    b = np.ones(n)
    b[np.random.default_rng(1).permutation(n)[:300]] = 0
    res = paired_bootstrap(np.ones(n), b)
    assert res["diff"] == pytest.approx(0.3)
    assert 0 < res["ci_low"] < 0.3 < res["ci_high"]
    assert res["p"] < 1e-3 and res["significant"] is True
    # The interval of a mean of 0/1 differences: about 0.3 ± 1.96 sqrt(0.3 * 0.7 / n).
    half = Z975 * math.sqrt(0.3 * 0.7 / n)
    assert res["ci_low"] == pytest.approx(0.3 - half, abs=0.006)
    assert res["ci_high"] == pytest.approx(0.3 + half, abs=0.006)
    # The sign follows the argument order.
    flipped = paired_bootstrap(b, np.ones(n))
    assert flipped["diff"] == pytest.approx(-0.3) and flipped["ci_high"] < 0


def test_bootstrap_width_and_p_match_the_normal_approximation():
    rng = np.random.default_rng(2)
    n = 2000
    a = (rng.random(n) < 0.55).astype(int)
    b = np.where(rng.random(n) < 0.7, a, (rng.random(n) < 0.5).astype(int))  # correlated
    d = a - b
    se = d.std(ddof=1) / math.sqrt(n)
    res = paired_bootstrap(a, b)
    assert res["ci_high"] - res["ci_low"] == pytest.approx(2 * Z975 * se, rel=0.05)
    assert (res["ci_low"] + res["ci_high"]) / 2 == pytest.approx(d.mean(), abs=0.2 * se)
    # The p-value of a moderate difference: the normal approximation's two-sided p.
    p_normal = 2 * (1 - NormalDist().cdf(abs(d.mean()) / se))
    assert 0.01 < p_normal < 0.5  # (the data make a case where the two can be told apart)
    assert res["p"] == pytest.approx(p_normal, abs=0.015)


def test_bootstrap_interval_covers_the_true_difference_95_percent():
    rng = np.random.default_rng(3)
    n, reps, true_diff = 150, 400, 0.7 - 0.6
    covered = 0
    for i in range(reps):
        a = (rng.random(n) < 0.7).astype(int)
        b = (rng.random(n) < 0.6).astype(int)
        res = paired_bootstrap(a, b, n_boot=2000, seed=i)
        covered += res["ci_low"] <= true_diff <= res["ci_high"]
    # 95% nominal; with 400 data sets the rate lies within +-2.5 points of its mean
    # (3 binomial standard errors), and the percentile interval runs a little narrow.
    assert 0.915 <= covered / reps <= 0.975


def test_bootstrap_is_deterministic_and_validates_input():
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7)["p"] != paired_bootstrap(a, b, seed=8)["p"]
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])


def test_stratified_bootstrap_averages_strata():
    rng = np.random.default_rng(5)
    big = (np.ones(400), (rng.random(400) < 0.5).astype(float))
    small = (np.zeros(20), np.zeros(20))
    res = stratified_paired_bootstrap([big, small])
    # The mean of the strata's differences, not of all items: each task counts once.
    assert res["diff"] == pytest.approx((big[0] - big[1]).mean() / 2)
    assert res["n"] == 420 and res["significant"] is True
    one = paired_bootstrap(*big)
    assert res["ci_high"] - res["ci_low"] == pytest.approx(
        (one["ci_high"] - one["ci_low"]) / 2, rel=0.05)


# --- per-item few-shot results and paired tests ----------------------------------------------
def test_load_items():
    mor = load_items(FIXTURES, "mor-2-1e12F-s0")  # the record's primary mode: topk
    raw = json.loads((FIXTURES / "mor-2-1e12F-s0" / "fewshot_items.json").read_text())
    assert mor == raw["topk"] and mor != raw["causal"]
    assert load_items(FIXTURES, "mor-2-1e12F-s0", routing="causal") == raw["causal"]
    van = load_items(FIXTURES, "vanilla-1e12F-s0")
    assert set(van) == {"lambada_openai", "hellaswag", "arc_easy", "arc_challenge"}
    assert [i["doc_id"] for i in van["hellaswag"]] == list(range(50))
    assert set(van["hellaswag"][0]) == {"doc_id", "acc", "acc_norm"}
    assert set(van["lambada_openai"][0]) == {"doc_id", "acc"}
    assert load_items(FIXTURES, "vanilla-2e12F-s0") is None  # no file
    with pytest.raises(RecordError, match="no items for routing mode 'causal'"):
        load_items(FIXTURES, "vanilla-1e12F-s0", routing="causal")


def test_fixture_items_agree_with_the_records():
    for rec in load_records(FIXTURES):
        fs = (rec.get("metrics") or {}).get("fewshot")
        if not fs:
            continue
        for mode, tasks in fs["by_routing"].items():
            items = load_items(FIXTURES, rec["run_id"], routing=mode)
            for task, res in tasks.items():
                assert len(items[task]) == res["n"]
                for metric, value in res["metrics"].items():
                    assert np.mean([i[metric] for i in items[task]]) == pytest.approx(value)


@pytest.fixture(scope="module")
def fewshot_tests() -> pd.DataFrame:
    return paired_fewshot_tests(FIXTURES, load_records(FIXTURES))


def _test(tests: pd.DataFrame, model: str, metric: str) -> pd.Series:
    rows = tests[(tests["model"] == model) & (tests["metric"] == metric)]
    assert len(rows) == 1, (model, metric)
    return rows.iloc[0]


def test_paired_fewshot_tests_on_the_fixture_run(fewshot_tests):
    tests = fewshot_tests
    assert list(tests.columns) == TEST_COLUMNS
    assert set(tests["model"]) == {"mor-2", "recursive-2"}  # vanilla is the reference
    assert set(tests["budget"]) == {"1e+12 flops"}  # no items at 2e12
    table = comparison_table(load_records(FIXTURES))
    row = lambda m: table[(table["model"] == m) & (table["budget"] == "1e+12 flops")].iloc[0]
    # Complete items: the paired difference is the difference of the table's accuracies.
    for metric in ("fs:lambada_openai", "fs:hellaswag", "fs:arc_easy", "fs:arc_merged",
                   "fewshot_avg"):
        assert _test(tests, "mor-2", metric)["diff"] == pytest.approx(
            row("mor-2")[metric] - row("vanilla")[metric]), metric
    hs = _test(tests, "mor-2", "fs:hellaswag")
    # Right on every item where vanilla (35/50 under acc_norm, the paper's metric) is wrong.
    assert (hs["diff"], hs["n"], hs["routing"]) == (pytest.approx(0.3), 50, "topk")
    assert hs["ci_low"] > 0 and hs["p"] < 0.01 and hs["significant"]
    ld = _test(tests, "mor-2", "fs:lambada_openai")  # identical answers
    assert (ld["diff"], ld["ci_low"], ld["ci_high"], ld["p"]) == (0, 0, 0, 1)
    assert not ld["significant"]
    assert _test(tests, "mor-2", "fs:arc_merged")["n"] == 50  # Easy 30 + Challenge 20
    avg = _test(tests, "mor-2", "fewshot_avg")
    assert avg["task"] == "avg" and avg["n"] == 40 + 50 + 50
    # recursive-2 logged 40 HellaSwag items: the test runs on the 40 both have.
    rec_hs = _test(tests, "recursive-2", "fs:hellaswag")
    assert rec_hs["n"] == 40 and rec_hs["routing"] == "default"
    van = load_items(FIXTURES, "vanilla-1e12F-s0")["hellaswag"][:40]
    rec = load_items(FIXTURES, "recursive-2-1e12F-s0")["hellaswag"]
    assert rec_hs["diff"] == pytest.approx(np.mean([r["acc_norm"] - v["acc_norm"]
                                                    for r, v in zip(rec, van)]))
    assert not tests[tests["model"] == "recursive-2"]["significant"].any()
    # The significance flag is "p < 0.05 and the interval excludes 0" (every effect here
    # is far above the minimum effect; test_small_effect_gets_no_star_however_consistent).
    for _, t in tests.iterrows():
        assert t["significant"] == (t["p"] < 0.05 and (t["ci_low"] > 0 or t["ci_high"] < 0))


def test_paired_tests_average_seeds_per_item(tmp_path):
    """Two seeds of MoR, one right and one wrong on an item, count it half right."""
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES, run_dir)
    s1 = run_dir / "mor-2-1e12F-s1" / "fewshot_items.json"
    data = json.loads(s1.read_text())
    for item in data["topk"]["hellaswag"][:10]:
        item["acc_norm"] = 0  # s0 is right on all 50
    s1.write_text(json.dumps(data))
    tests = paired_fewshot_tests(run_dir, load_records(run_dir), n_boot=2000)
    van = load_items(run_dir, "vanilla-1e12F-s0")["hellaswag"]
    expected = np.mean([(1 + (0 if i < 10 else 1)) / 2 - v["acc_norm"]
                        for i, v in enumerate(van)])
    assert _test(tests, "mor-2", "fs:hellaswag")["diff"] == pytest.approx(expected)
    # Without vanilla items nothing can be paired.
    (run_dir / "vanilla-1e12F-s0" / "fewshot_items.json").unlink()
    assert paired_fewshot_tests(run_dir, load_records(run_dir)).empty


def _with_vanilla_seed(tmp_path, nll: float) -> Path:
    run_dir = tmp_path / "seeds"
    shutil.copytree(FIXTURES, run_dir)
    rec = json.loads((run_dir / "vanilla-1e12F-s0" / "record.json").read_text())
    rec.update(run_id="vanilla-1e12F-s1", seed=1)
    rec["metrics"]["val_nll"] = nll
    (run_dir / "vanilla-1e12F-s1").mkdir()
    (run_dir / "vanilla-1e12F-s1" / "record.json").write_text(json.dumps(rec))
    return run_dir


def test_seed_tests_need_two_seeds_on_both_sides(tmp_path):
    # The fixture's vanilla has one seed: nothing to test across seeds.
    assert seed_tests(load_records(FIXTURES)).empty
    run_dir = _with_vanilla_seed(tmp_path, 2.52)
    records = load_records(run_dir)
    tests = seed_tests(records)
    assert set(tests["model"]) == {"mor-2"}  # recursive-2 has one seed
    nll = _test(tests, "mor-2", "val_nll")
    mor = [r["metrics"]["val_nll"] for r in records if r["model_name"] == "mor-2"
           and r["budget"]["value"] == 1e12]
    expected = welch_test(mor, [2.5, 2.52])
    assert nll["diff"] == pytest.approx(expected["diff"]) and nll["n"] == 2
    assert nll["p"] == pytest.approx(expected["p"])
    assert nll["method"] == "Welch t-test over seeds"
    assert {"fs:hellaswag", "train_time_s", "tokens_per_s", "peak_mem_mb"} <= set(
        tests["metric"])
    # Combined: few-shot columns from the paired item test, the rest from seeds.
    both = significance_vs_vanilla(records, run_dir)
    assert _test(both, "mor-2", "fs:hellaswag")["method"] == "paired bootstrap over items"
    assert _test(both, "mor-2", "val_nll")["method"] == "Welch t-test over seeds"
    assert not both.duplicated(["model", "budget", "metric"]).any()


# --- per-item results from lm-eval -------------------------------------------------------------
def test_sample_items_compacts_lm_eval_samples():
    from evals.lmeval.adapter import sample_items

    samples = [
        {"doc_id": 2, "filter": "none", "acc": 1.0, "acc_norm": 0.0, "doc": {"q": "big"},
         "resps": [[(-1.0, False)]]},
        {"doc_id": 0, "filter": "none", "acc": 0.0, "acc_norm": 1.0},
        {"doc_id": 2, "filter": "other", "acc": 0.0, "acc_norm": 1.0},  # second filter
        {"doc_id": 1, "filter": "none", "acc": True, "perplexity": 3.2},
    ]
    assert sample_items(samples) == [{"doc_id": 0, "acc": 0, "acc_norm": 1},
                                     {"doc_id": 1, "acc": 1},
                                     {"doc_id": 2, "acc": 1, "acc_norm": 0}]


def test_run_tasks_returns_per_item_correctness(tmp_path):
    import torch

    from evals.data.tokenizer import ByteTokenizer
    from evals.lmeval.adapter import MorBenchLM, run_tasks
    from evals.lmeval.synthetic_tasks import write_synthetic_tasks
    from mor import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", family="mor", num_recursions=2))
    lm = MorBenchLM(model=model, tokenizer=ByteTokenizer(), batch_size=8)
    paths = [write_synthetic_tasks(tmp_path, n_items=12)]
    tasks = ["mor_synth_arithmetic", "mor_synth_recall"]
    res = run_tasks(lm, tasks, include_paths=paths, limit=12, log_samples=True)
    assert "samples" not in res  # lm-eval's full samples stay out
    assert set(res["items"]) == set(tasks)
    for task in tasks:
        items = res["items"][task]
        assert [i["doc_id"] for i in items] == list(range(12))
        for metric in ("acc", "acc_norm"):
            assert {i[metric] for i in items} <= {0, 1}
            assert np.mean([i[metric] for i in items]) == pytest.approx(
                res["tasks"][task]["metrics"][metric])
    plain = run_tasks(lm, tasks[:1], include_paths=paths, limit=4)
    assert "items" not in plain and "samples" not in plain


# --- minimum effect ---------------------------------------------------------------------------
def _mem_seeds(tmp_path, vanilla_mb: tuple[float, float], mor_mb: tuple[float, float]) -> list:
    """The fixture run with a second vanilla seed and given peak memory (MiB) per seed of
    vanilla and mor-2 at 1e12."""
    run_dir = _with_vanilla_seed(tmp_path, 2.52)
    mem = {"vanilla-1e12F-s0": vanilla_mb[0], "vanilla-1e12F-s1": vanilla_mb[1],
           "mor-2-1e12F-s0": mor_mb[0], "mor-2-1e12F-s1": mor_mb[1]}
    for run_id, mb in mem.items():
        path = run_dir / run_id / "record.json"
        rec = json.loads(path.read_text())
        rec["metrics"]["peak_mem_bytes"] = mb * 2**20
        path.write_text(json.dumps(rec))
    return load_records(run_dir)


def test_small_effect_gets_no_star_however_consistent(tmp_path):
    from reports.stats import MIN_REL_EFFECT, is_significant

    # 1% less memory, n = 2 each side, nearly no spread: p tiny, interval excludes 0 ...
    tests = seed_tests(_mem_seeds(tmp_path / "a", (1000.0, 1000.1), (990.0, 990.1)),
                       metrics=["peak_mem_mb"])
    row = _test(tests, "mor-2", "peak_mem_mb")
    assert row["p"] < 0.05 and row["ci_high"] < 0
    assert abs(row["diff"]) / 1000.05 < MIN_REL_EFFECT
    assert not row["significant"]  # ... but the effect is below the minimum
    # 5% less: significant.
    tests = seed_tests(_mem_seeds(tmp_path / "b", (1000.0, 1000.1), (950.0, 950.1)),
                       metrics=["peak_mem_mb"])
    assert _test(tests, "mor-2", "peak_mem_mb")["significant"]
    # The rule itself: without a reference, the test alone decides.
    assert is_significant(0.01, -2.0, -1.0)
    assert not is_significant(0.01, -2.0, -1.0, diff=-1.5, reference=100.0)
    assert is_significant(0.01, -2.0, -1.0, diff=-2.0, reference=100.0)


def test_paired_bootstrap_needs_a_minimum_effect():
    # Enough items that +0.8 points on a base of 50% (1.6% relative) is clearly nonzero.
    n = 200_000
    b = np.zeros(n)
    b[: n // 2] = 1.0
    a = b.copy()
    a[n // 2: n // 2 + int(0.008 * n)] = 1.0  # +0.8 points on a base of 50: 1.6%
    res = paired_bootstrap(a, b, n_boot=2000)
    assert res["p"] < 0.05 and res["ci_low"] > 0
    assert not res["significant"]
    a[n // 2: n // 2 + int(0.02 * n)] = 1.0  # +2 points on 50: 4%
    assert paired_bootstrap(a, b, n_boot=2000)["significant"]
