"""The paper-scale built-in suites plan offline: the grid, the global batch, the step rule."""

from __future__ import annotations

import csv
import dataclasses
import json
import socket
from pathlib import Path

import pytest

from evals.cli.main import main
from evals.suite.spec import load_suite, plan_runs, plan_table
from mor import param_counts
from mor.errors import ConfigError

PAPER = Path(__file__).resolve().parents[3] / "reports" / "paper_data"
GLOBAL_TOKENS = 1024 * 2048  # the paper's 1024 sequences x 2048 tokens per step
PAPER_SUITES = {"paper-360m": 12, "paper-isoflop": 36}  # suite -> runs (one seed)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails: planning must not need the Hub."""
    def refuse(*args, **kwargs):
        raise OSError("network access during a dry run")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", sorted(PAPER_SUITES))
def test_paper_suite_plans_offline(no_network, name):
    suite = load_suite(name)
    runs = plan_runs(suite)
    rows = plan_table(runs)
    assert len(rows) == PAPER_SUITES[name]
    assert len({r["run_id"] for r in rows}) == len(rows)
    assert {r["step_rule"] for r in rows} == {"reference"}
    assert {r["world_size"] for r in rows} == {1}
    assert {r["batch_tokens"] for r in rows} == {GLOBAL_TOKENS}
    assert all(r["tokens"] == r["steps"] * r["batch_tokens"] for r in rows)
    # FineWeb-Edu streamed and the SmolLM tokenizer by name; its vocabulary (not knowable
    # without the Hub) is the presets' 49152 until the data is loaded.
    assert suite.data.corpus == "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
    assert suite.data.tokenizer == "hf:HuggingFaceTB/SmolLM-135M"
    assert suite.data.planned_vocab() is None
    assert {r.config.vocab_size for r in runs} == {49152}


@pytest.mark.parametrize("name", sorted(PAPER_SUITES))
def test_paper_suite_dry_run_cli_offline(no_network, capsys, name):
    rc = main(["run", name, "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = json.loads(out)
    assert len(rows) == PAPER_SUITES[name]
    assert all(r["step_rule"] == "reference" for r in rows)


def test_isoflop_suite_is_the_papers_grid():
    """Every row of the paper's isoFLOP table (as shipped in reports/paper_data/) is one run
    of paper-isoflop: same backbone, family, layer plan, parameters, budget and -- to the
    0.1B the paper prints -- tokens; and nothing else is in the suite."""
    runs = plan_runs(load_suite("paper-isoflop"))
    family = {"Vanilla": "vanilla", "Recursive": "recursive", "MoR": "mor"}
    matched = set()
    for row in csv.DictReader((PAPER / "isoflop_scaling.csv").open()):
        hits = [r for r in runs
                if r.config.family == family[row["Model"]]
                and r.config.d_model == _preset_width(row["Base"])
                and r.budget.flops == pytest.approx(float(row["FLOPs"]) * 1e18)]
        assert len(hits) == 1, row
        run = hits[0]
        assert run.config.layer_plan == row["N_L"], row
        assert run.config.num_recursions == (1 if row["Model"] == "Vanilla" else 3)
        if run.config.family == "mor":
            assert (run.config.router, run.config.kv) == ("expert", "cache")
        non_emb = param_counts(run.config)["non_embedding"]
        paper_params = float(row["N-Emb"][:-1]) * (1e9 if row["N-Emb"].endswith("B") else 1e6)
        assert non_emb == pytest.approx(paper_params, rel=0.02), row
        assert run.plan.tokens / 1e9 == pytest.approx(float(row["N_tok"][:-1]), abs=0.051), row
        matched.add(run.run_id)
    assert len(matched) == 36 == len(runs)


def _preset_width(base: str) -> int:
    return {"135M": 576, "360M": 960, "730M": 1536, "1.7B": 2048}[base]


def test_isoflop_warmup_is_five_percent_of_the_smallest_budget():
    runs = plan_runs(load_suite("paper-isoflop"))
    by_model: dict[str, list] = {}
    for r in runs:
        by_model.setdefault(r.model_name, []).append(r)
    assert len(by_model) == 12
    for name, rs in by_model.items():
        smallest = min(rs, key=lambda r: r.budget.flops)
        assert smallest.budget.flops == 2e18
        assert {r.warmup_steps for r in rs} == {round(0.05 * smallest.plan.steps)}, name
        assert max(r.plan.steps for r in rs) > 8 * smallest.plan.steps  # 16.5e18 vs 2e18


@pytest.mark.parametrize("name", sorted(PAPER_SUITES))
def test_global_batch_is_kept_on_any_number_of_processes(name):
    """[train] global_batch: grad_accum is derived per launch, so the plan (steps from the
    global batch) on 8 or 64 processes is the single-process plan; a count that does not
    divide the batch is refused."""
    from evals.training.loop import for_world

    suite = load_suite(name)
    one_rows = plan_table(plan_runs(suite))
    for world in (8, 64):
        rows = plan_table(plan_runs(suite, world_size=world))
        assert [r["steps"] for r in rows] == [r["steps"] for r in one_rows]
        assert {r["batch_tokens"] for r in rows} == {GLOBAL_TOKENS}
        assert for_world(suite.train, world).grad_accum == 1024 // (16 * world)
    with pytest.raises(ConfigError, match="global_batch"):
        plan_runs(suite, world_size=3)
    # Without global_batch, grad_accum is used as written: 8 processes, 8x the batch.
    fixed = dataclasses.replace(suite, train=dataclasses.replace(
        suite.train, global_batch=None, grad_accum=64))
    assert {r["batch_tokens"] for r in plan_table(plan_runs(fixed, world_size=8))} == {
        8 * GLOBAL_TOKENS}
