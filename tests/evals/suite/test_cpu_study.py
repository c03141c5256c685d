"""The `cpu-study` suite (README, "The CPU study"): its plan checked against the model
accounting, and its refusal of the synthetic corpus."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from evals.suite.spec import check_corpus, load_suite, plan_runs, plan_table
from mor import build_model, flops
from mor.errors import ConfigError

MODELS = {"vanilla": ("vanilla", 1), "rec-2": ("recursive", 2), "rec-3": ("recursive", 3),
          "mor-2": ("mor", 2), "mor-3": ("mor", 3), "mor-4": ("mor", 4),
          "mor-3-token": ("mor", 3), "mor-3-share": ("mor", 3),
          "mor-2-fixed-tokens": ("mor", 2), "mor-3-fixed-tokens": ("mor", 3),
          "mor-4-fixed-tokens": ("mor", 4)}


@pytest.fixture(scope="module")
def study():
    suite = load_suite("cpu-study")
    return suite, plan_runs(suite)


def test_cells_budgets_and_seeds(study):
    suite, runs = study
    assert suite.seeds == (0, 1, 2) and suite.data.tokenizer == "bpe:8192"
    by_model = {m.name: m for m in suite.models}
    assert {name: (m.config.family, m.config.num_recursions) for name, m in by_model.items()
            } == MODELS
    assert by_model["mor-3-token"].config.router == "token"
    assert by_model["mor-3-share"].config.kv == "share"
    assert by_model["mor-3"].config.kv == "cache" and by_model["mor-3"].config.router == "expert"
    assert {m.config.sharing for m in suite.models if m.config.family != "vanilla"} == {
        "middle_cycle"}
    budgets = sorted({r.budget.value for r in runs if r.budget.kind == "flops"})
    assert len(budgets) == 2 and 3 <= budgets[1] / budgets[0] <= 3.5   # "a factor ~3 apart"
    cells = Counter((r.model_name, r.budget.kind, r.budget.value) for r in runs)
    assert set(cells.values()) == {3}                                      # 3 seeds per cell
    assert len(runs) == 8 * 2 * 3 + 3 * 3
    assert "mor_paper_local" in suite.evaluation.tasks and suite.infer and suite.speed


def test_plan_matches_the_accounting(study):
    suite, runs = study
    seen = set()
    for row, run in zip(plan_table(runs), runs):
        cfg = run.config
        assert row["flops_per_token_paper"] == flops.flops_per_token(cfg, 256, "paper")
        assert row["params_unique"] == flops.param_counts(cfg)["unique"]
        if (cfg.family, cfg.num_recursions, cfg.router, cfg.kv) not in seen:  # one build each
            seen.add((cfg.family, cfg.num_recursions, cfg.router, cfg.kv))
            assert row["params_unique"] == sum(p.numel() for p in build_model(cfg).parameters())
        assert row["batch_tokens"] == 16 * 256
        if run.budget.kind == "flops":
            assert row["steps"] == math.floor(run.budget.value / row["flops_per_token_paper"]
                                              / row["batch_tokens"])
            assert row["flops_used"] <= run.budget.value
        else:
            assert row["tokens"] == run.budget.value
    vanilla_tokens = {r.plan.tokens for r in runs
                      if r.model_name == "vanilla" and r.budget.value == 3e12}
    fixed_tokens = {r.plan.tokens for r in runs if r.model_name.endswith("fixed-tokens")}
    assert vanilla_tokens == fixed_tokens      # the same tokens as vanilla at the small budget


def test_refuses_the_synthetic_corpus(study):
    suite, _ = study
    with pytest.raises(ConfigError, match=r"refuses the synthetic corpus; pass --corpus"):
        check_corpus(suite, None)
    check_corpus(suite, "corpus.jsonl.gz")  # any real corpus passes
