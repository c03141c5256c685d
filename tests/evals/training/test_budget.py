"""Step rules: the paper's released configs' step counts, reproduced (docs/protocol.md §5)."""

from __future__ import annotations

import math

import pytest

from evals.suite.spec import load_suite, plan_runs
from evals.training.budget import (
    STEP_RULES,
    Budget,
    plan_training,
    reference_flops_per_token,
    wsd_lr,
)
from evals.training.loop import TrainConfig
from mor import ConfigError, ModelConfig, flops_per_token

# The paper's released training configs (the reference code's configs
# conf/pretrain/250720_pretrain_smollm-360m_<name>.yaml), transcribed: per paper-360m model,
# num_train_steps and lr_scheduler_kwargs.num_decay_steps. Data, not results of our code.
# <name> is the config's name after "smollm-360m_"; "rec3-mc" abbreviates
# "rec3_middle_cycle_random_lr3e-3" and "expert" "mor_expert_linear_alpha_0.1_sigmoid_
# aux_loss_0.001".
REFERENCE_CONFIGS = {
    # paper-360m model: (num_train_steps, num_decay_steps)  <name>
    "vanilla": (9438, 1888),       # vanilla_lr3e-3
    "recursive-2": (9438, 1888),   # rec2-mc
    "recursive-3": (9438, 1888),   # rec3-mc
    "recursive-4": (8883, 1777),   # rec4-mc (model_config num_hidden_layers: 34)
    "mor-2": (12619, 2524),        # rec2-mc_expert
    "mor-3": (14161, 2832),        # rec3-mc_expert
    "mor-4": (14216, 2843),        # rec4-mc_expert (34 layers)
    "mor-3-token": (14161, 2832),  # rec3-mc_mor_token_softmax_bal_loss_coeff_0.1_linear_zloss_1e-5
    "mor-3-share": (14672, 2934),  # kv-share_rec3-mc_expert
}
# The same configs' fixed_save_steps (the reference code's configs ..._vanilla_lr3e-3 and
# ..._rec3_middle_cycle_random_lr3e-3_mor_expert_linear_alpha_0.1_sigmoid_aux_loss_0.001):
# checkpoints at the start of the decay of the 2e18, 5e18 and 16.5e18 budgets.
REFERENCE_SAVE_STEPS = {"vanilla": (915, 2288, 7551), "mor-3": (1373, 3433, 11328)}
# The released configs' warm-up (num_warmup_steps) where mor-bench's per-model rule gives
# the same: 5% of the model's steps at 2e18 (docs/protocol.md §5 lists the others).
REFERENCE_WARMUP = {"vanilla": 57, "recursive-2": 57, "recursive-3": 57, "mor-3": 86,
                    "mor-4": 86, "mor-3-token": 86}

GLOBAL_TOKENS = 1024 * 2048  # the configs' total_batch_size x max_length


@pytest.fixture(scope="module")
def paper_360m():
    return load_suite("paper-360m")


def _config(suite, name: str) -> ModelConfig:
    return next(m.config for m in suite.models if m.name == name)


def test_step_rules_are_known_and_validated():
    assert STEP_RULES == ("floor", "reference")
    assert TrainConfig(step_rule="reference").step_rule == "reference"
    with pytest.raises(ConfigError, match="step_rule"):
        TrainConfig(step_rule="ceil")
    cfg = ModelConfig.from_preset("micro")
    with pytest.raises(ConfigError, match="step_rule"):
        plan_training(cfg, Budget(tokens=10_000), 32, 4, rule="round")


def test_paper_360m_uses_the_reference_rule_and_the_papers_global_batch(paper_360m):
    t = paper_360m.train
    assert t.step_rule == "reference"
    assert t.global_batch * paper_360m.data.seq_len == GLOBAL_TOKENS
    runs = plan_runs(paper_360m)
    assert {r.plan.step_rule for r in runs} == {"reference"}
    assert {r.plan.tokens_per_step for r in runs} == {GLOBAL_TOKENS}


@pytest.mark.parametrize("model", sorted(REFERENCE_CONFIGS))
def test_reference_rule_gives_the_released_configs_step_counts(paper_360m, model):
    steps, decay = REFERENCE_CONFIGS[model]
    run = next(r for r in plan_runs(paper_360m) if r.model_name == model)
    assert run.plan.steps == steps
    assert run.plan.tokens == steps * GLOBAL_TOKENS
    # The decay of wsd_lr (the steps below the peak after the warm-up) has the configs'
    # num_decay_steps.
    peak = 3e-3
    below = sum(wsd_lr(s, peak_lr=peak, total_steps=steps, warmup_steps=run.warmup_steps)
                < peak for s in range(run.warmup_steps, steps))
    assert below == decay


def test_floor_rule_is_one_step_short_where_the_counts_differ(paper_360m):
    """The paper convention rounded down, against the same configs: equal for the 32-layer
    non-MoR models, one step short for the rest -- which is why the reference rule exists."""
    for model, (steps, _) in REFERENCE_CONFIGS.items():
        cfg = _config(paper_360m, model)
        floor = plan_training(cfg, Budget(flops=16.5e18), 2048, 16, 64, rule="floor").steps
        assert steps - floor == (0 if model in ("vanilla", "recursive-2", "recursive-3")
                                 else 1), model


def test_reference_count_gives_the_configs_decay_start_checkpoints(paper_360m):
    for model, saves in REFERENCE_SAVE_STEPS.items():
        f = reference_flops_per_token(_config(paper_360m, model), 2048)
        got = tuple(math.floor(0.8 * c / f / GLOBAL_TOKENS) for c in (2e18, 5e18, 16.5e18))
        assert got == saves, model


def test_paper_360m_warmup_is_five_percent_of_the_2e18_steps(paper_360m):
    warm = {r.model_name: r.warmup_steps for r in plan_runs(paper_360m)}
    for model, steps in REFERENCE_WARMUP.items():
        assert warm[model] == steps, model


def test_token_budgets_round_down_alike_under_both_rules(paper_360m):
    """The reference code's own step count for a token budget: int(tokens / global batch)."""
    cfg = _config(paper_360m, "mor-3-fixed20b")
    for rule in STEP_RULES:
        plan = plan_training(cfg, Budget(tokens=20_000_000_000), 2048, 16, 64, rule=rule)
        assert plan.steps == 20_000_000_000 // GLOBAL_TOKENS == 9536
        assert plan.step_rule == rule


def test_reference_count_against_the_paper_convention():
    """The documented difference, term by term: distinct-token attention pairs (k(k-1)
    instead of k^2) and whole tokens per MoR step. Where k_r = c_r T exactly (N_r = 2, 4 at
    T = 2048) it is the paper convention minus 2d per token for every layer application,
    each MoR step's weighted by its capacity; KV-sharing steps r > 1 keep the paper's
    attention over all T keys."""
    t = 2048
    for preset in ("135m", "360m", "1.7b"):
        for kw in ({"family": "vanilla"}, {"family": "recursive", "num_recursions": 4},
                   {"family": "mor", "num_recursions": 2},
                   {"family": "mor", "num_recursions": 4}):
            cfg = ModelConfig.from_preset(preset, **kw)
            d = cfg.d_model
            edge = cfg.num_unique_first + cfg.num_unique_last
            applications = edge + cfg.num_shared * sum(cfg.step_capacities)
            expect = flops_per_token(cfg, t, "paper") - 2 * d * applications
            assert reference_flops_per_token(cfg, t) == pytest.approx(expect, rel=1e-12)
        share = ModelConfig.from_preset(preset, family="mor", num_recursions=2, kv="share")
        # Only recursion 1 (capacity 1) and the edge layers lose the self pairs.
        expect = (flops_per_token(share, t, "paper")
                  - 2 * share.d_model * (share.num_unique_first + share.num_unique_last
                                         + share.num_shared))
        assert reference_flops_per_token(share, t) == pytest.approx(expect, rel=1e-12)


def test_reference_count_uses_whole_tokens_per_mor_step():
    """N_r = 3 at T = 2048: the steps run on 2048, 1365 and 683 tokens (2/3 and 1/3 of 2048
    rounded), not on the fractions."""
    cfg = ModelConfig.from_preset("360m", family="mor", num_recursions=3)
    d, t = cfg.d_model, 2048
    linear = 2 * (4 * d * d + 3 * d * cfg.d_ff)

    def layer(k):
        return linear * k / t + 2 * d * k * (k - 1) / t

    expect = 2 * layer(t) + cfg.num_shared * (layer(2048) + layer(1365) + layer(683))
    assert reference_flops_per_token(cfg, t) == pytest.approx(expect, rel=1e-12)


def test_reference_tokens_match_the_paper_isoflop_table():
    """Both counts give the paper's printed token counts (0.1B) at 16.5e18 FLOPs."""
    printed = {("135m", "vanilla"): 53.3, ("135m", "mor"): 76.2, ("730m", "mor"): 14.9,
               ("1.7b", "recursive"): 4.5, ("1.7b", "mor"): 6.5}
    for (preset, family), tokens_b in printed.items():
        cfg = ModelConfig.from_preset(preset, family=family,
                                      num_recursions=1 if family == "vanilla" else 3)
        plan = plan_training(cfg, Budget(flops=16.5e18), 2048, 16, 64, rule="reference")
        assert plan.tokens / 1e9 == pytest.approx(tokens_b, abs=0.051)


def test_reference_rule_steps_come_from_the_global_batch():
    cfg = ModelConfig.from_preset("360m", family="mor", num_recursions=3)
    one = plan_training(cfg, Budget(flops=16.5e18), 2048, 16, 64, 1, "reference")
    eight = plan_training(cfg, Budget(flops=16.5e18), 2048, 16, 8, 8, "reference")
    assert (one.steps, one.tokens_per_step) == (eight.steps, eight.tokens_per_step)
    assert eight.world_size == 8


def test_reference_rule_rejects_a_budget_below_one_step():
    cfg = ModelConfig.from_preset("micro")
    step_flops = reference_flops_per_token(cfg, 32) * 32 * 4
    with pytest.raises(ConfigError, match="too small for one step"):
        plan_training(cfg, Budget(flops=0.5 * step_flops), 32, 4, rule="reference")
    assert plan_training(cfg, Budget(flops=step_flops * 1.0001), 32, 4,
                         rule="reference").steps == 1
