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


def _micro_study_text() -> str:
    """The cpu-study suite scaled down to seconds: the same sections and model kinds (a
    subset), micro preset, a tiny token budget, two seeds, BPE-512, synthetic few-shot."""
    from evals.suite.spec import builtin_suites

    text = builtin_suites()["cpu-study"]
    head, _, rest = text.partition("[[models]]")
    head = (head.replace('seeds = [0, 1, 2]', 'seeds = [0, 1]')
            .replace('tokenizer = "bpe:8192"', 'tokenizer = "bpe:512"')
            .replace('seq_len = 256', 'seq_len = 32').replace('val_windows = 128',
                                                              'val_windows = 8')
            .replace('flops = [3e12, 1e13]', 'tokens = [2048]')
            .replace('batch_size = 16', 'batch_size = 4\nthreads = 1')
            .replace('preset = "small"', 'preset = "micro"'))
    models = ('[[models]]\nname = "vanilla"\nfamily = "vanilla"\n\n'
              '[[models]]\nname = "rec-2"\nfamily = "recursive"\nnum_recursions = 2\n\n'
              '[[models]]\nname = "mor-2"\nfamily = "mor"\nnum_recursions = 2\n\n'
              '[[models]]\nname = "mor-2-fixed-tokens"\nfamily = "mor"\nnum_recursions = 2\n'
              'budget = { tokens = [1024] }\n\n'
              '[eval]\ntasks = ["mor_synth_filler"]\nnum_fewshot = 0\nlimit = 4\n'
              'batch_size = 8\n')
    assert "[infer]" in rest and "[speed]" in rest  # the real suite has them; the micro not
    return head + models


@pytest.mark.slow
def test_micro_study_runs_end_to_end_and_publishes(tmp_path):
    """The study's pipeline in miniature, as CI runs it: a real-corpus file (a slice of
    documents), every run trained and evaluated, then `mor-bench publish` writes the
    published layout -- records but no checkpoints, the report, README with the claims."""
    import json

    from evals.cli.main import main
    from evals.data.synthetic import generate_documents
    from evals.suite.runner import run_suite
    from evals.suite.spec import parse_suite

    corpus = tmp_path / "slice.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.id, "text": d.text}) + "\n"
                              for d in generate_documents(300, seed=7)))
    suite = parse_suite(_micro_study_text(), source="micro-study.toml")
    with pytest.raises(ConfigError, match="refuses the synthetic corpus"):
        check_corpus(suite, None)
    check_corpus(suite, str(corpus))
    run_dir, records, failed = run_suite(suite, tmp_path / "runs", corpus=str(corpus),
                                         cache_dir=tmp_path / "cache")
    assert failed == [] and len(records) == 8

    out = tmp_path / "published" / "cpu-study"
    rc = main(["publish", str(run_dir), str(out), "--command",
               "mor-bench run cpu-study --corpus slice.jsonl"])
    assert rc == 0
    for name in ("README.md", "report.md", "index.html", "suite.toml", "plan.json"):
        assert (out / name).is_file(), name
    assert list((out / "figures").glob("*.png"))
    assert sorted(p.parent.name for p in out.glob("*/record.json")) == sorted(
        r["run_id"] for r in records)
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("checkpoints"))
    assert not list(out.rglob("tensorboard"))
    readme = (out / "README.md").read_text()
    assert "mor-bench run cpu-study --corpus slice.jsonl" in readme
    assert "| MoR-2 reaches a lower NLL than vanilla at equal FLOPs | mor-2 vs vanilla |" in readme
    assert "| Same tokens: MoR-2 trains faster than vanilla | mor-2-fixed-tokens vs vanilla |" \
        in readme
    # the published directory is itself a report source
    assert main(["report", str(out), "--json"]) == 0
