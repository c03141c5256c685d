"""Analytic accounting against the paper's tables and against torch's flop counter."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mor import ConfigError, ModelConfig, build_model, flops_per_token, param_counts

# The paper's numbers as the repository ships them (reports/paper_data/README.md).
PAPER = Path(__file__).resolve().parents[2] / "reports" / "paper_data"

# arXiv 2507.10524, isoFLOP table (shared/paper/isoflop_scaling.csv), transcribed so the
# test runs without shared/: (preset, family, N_r, non-embedding params in M, tokens in B
# at 16.5e18 forward FLOPs). Tokens are printed to 0.1B in the paper.
ISOFLOP_16_5 = [
    ("135m", "vanilla", 1, 106, 53.3), ("135m", "recursive", 3, 42, 50.0),
    ("135m", "mor", 3, 42, 76.2),
    ("360m", "vanilla", 1, 315, 19.8), ("360m", "recursive", 3, 118, 19.8),
    ("360m", "mor", 3, 118, 29.7),
    ("730m", "vanilla", 1, 654, 10.1), ("730m", "recursive", 3, 252, 10.1),
    ("730m", "mor", 3, 252, 14.9),
    ("1.7b", "vanilla", 1, 1610, 4.8), ("1.7b", "recursive", 3, 670, 4.5),
    ("1.7b", "mor", 3, 670, 6.5),
]


@pytest.mark.parametrize("preset,family,nr,params_m,tokens_b", ISOFLOP_16_5)
def test_paper_convention_reproduces_isoflop_table(preset, family, nr, params_m, tokens_b):
    cfg = ModelConfig.from_preset(preset, family=family, num_recursions=nr)
    non_emb = param_counts(cfg)["non_embedding"] / 1e6
    # The paper prints whole millions (and 0.67B), truncated: allow half a unit plus 1%.
    assert non_emb == pytest.approx(params_m, abs=0.5 + 0.01 * params_m)
    tokens = 16.5e18 / flops_per_token(cfg, 2048, "paper") / 1e9
    assert tokens == pytest.approx(tokens_b, abs=0.051)


def test_paper_convention_matches_the_shipped_csv():
    """Same check against the shipped isoflop_scaling.csv itself, every budget."""
    path = PAPER / "isoflop_scaling.csv"
    family = {"Vanilla": "vanilla", "Recursive": "recursive", "MoR": "mor"}
    checked = 0
    for row in csv.DictReader(path.open()):
        nr = 1 if row["Model"] == "Vanilla" else 3
        cfg = ModelConfig.from_preset(row["Base"].lower(), family=family[row["Model"]],
                                      num_recursions=nr)
        tokens = float(row["FLOPs"]) * 1e18 / flops_per_token(cfg, 2048, "paper")
        assert tokens / 1e9 == pytest.approx(float(row["N_tok"].rstrip("B")), abs=0.051), row
        checked += 1
    assert checked == 36


def test_paper_table3_fixed_token_rows():
    """Table 3: MoR at a fixed 20B tokens used 11.0e18 FLOPs at N_r=3 and 4 (and 12.3e18
    at N_r=2, which our count puts at 12.47e18: the paper's 2-decimal figure is within
    1.5%, consistent with a slightly smaller token count in that run)."""
    expect = {2: 12.3, 3: 11.0, 4: 11.0}
    for nr, paper in expect.items():
        cfg = ModelConfig.from_preset("360m", family="mor", num_recursions=nr)
        used = 20e9 * flops_per_token(cfg, 2048, "paper") / 1e18
        assert used == pytest.approx(paper, rel=0.015)


def test_mor_is_cheaper_per_token_than_recursive_of_same_depth():
    for nr in (2, 3, 4):
        rec = ModelConfig.from_preset("360m", family="recursive", num_recursions=nr)
        mor = ModelConfig.from_preset("360m", family="mor", num_recursions=nr)
        assert rec.unrolled_depth == mor.unrolled_depth
        assert flops_per_token(mor, 2048) < flops_per_token(rec, 2048)


def _counted_forward_flops(model, ids) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(ids)
    return fc.get_total_flops()


CASES = [("vanilla", 1, "middle_cycle"), ("recursive", 2, "cycle"),
         ("recursive", 3, "middle_sequence"), ("mor", 2, "middle_cycle"),
         ("mor", 3, "middle_cycle"), ("mor", 4, "middle_cycle")]


@pytest.mark.parametrize("family,nr,sharing", CASES)
@pytest.mark.parametrize("seq_len", [17, 64])
def test_exact_convention_equals_flop_counter(family, nr, sharing, seq_len):
    cfg = ModelConfig.from_preset("micro", family=family, num_recursions=nr, sharing=sharing)
    model = build_model(cfg).train()  # training routing: top-k with exact capacities
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len))
    counted = _counted_forward_flops(model, ids)
    analytic = flops_per_token(cfg, seq_len, "exact") * seq_len * 2
    assert counted == pytest.approx(analytic, rel=1e-9)


def test_paper_convention_orders_like_the_counter():
    """Where the conventions differ (GQA, head, full vs causal attention), the paper's
    numbers must still rank models the way the measured count does."""
    cfgs = [ModelConfig.from_preset("micro", family=f, num_recursions=n) for f, n in
            [("vanilla", 1), ("mor", 2), ("mor", 3)]]
    ids = torch.randint(0, 257, (1, 64))
    counted = [_counted_forward_flops(build_model(c).train(), ids) for c in cfgs]
    paper = [flops_per_token(c, 64, "paper") for c in cfgs]
    assert sorted(range(3), key=counted.__getitem__) == sorted(range(3), key=paper.__getitem__)


def test_bad_convention_and_length():
    cfg = ModelConfig.from_preset("micro")
    with pytest.raises(ConfigError, match="convention"):
        flops_per_token(cfg, 16, "approx")
    with pytest.raises(ConfigError, match="seq_len"):
        flops_per_token(cfg, 0)
