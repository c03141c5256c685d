"""The training-memory estimate (evals/training/memory.py): what it counts, shown per run
by the dry run, and a run that cannot fit the machine refused before any compute."""

from __future__ import annotations

import json

import pytest

from evals.cli.main import main
from evals.suite.spec import check_memory, load_suite, plan_runs, plan_table
from evals.training.budget import Budget, plan_training
from evals.training.memory import PROCESS_BYTES, machine_memory, train_memory
from mor import ModelConfig, build_model
from mor.errors import ConfigError


@pytest.mark.parametrize("family,extra", [("vanilla", {}), ("recursive", {"num_recursions": 2}),
                                          ("mor", {"num_recursions": 3})])
def test_estimate_counts_states_per_unique_parameter_and_activations_per_applied_layer(
        family, extra):
    cfg = ModelConfig.from_preset("micro", family=family, **extra)
    unique = sum(p.numel() for p in build_model(cfg).parameters())
    one, four = train_memory(cfg, 32, 1), train_memory(cfg, 32, 4)
    assert one["states"] == four["states"] == 16 * unique       # fp32 weights, grads, AdamW
    assert four["activations"] == 4 * one["activations"]        # linear in the batch
    assert one["activations"] == 32 * cfg.unrolled_depth * (8 * cfg.d_model + 4 * cfg.d_ff) * 4
    assert one["head"] == 32 * 3 * cfg.vocab_size * 4
    assert one["total"] == one["states"] + one["activations"] + one["head"] + PROCESS_BYTES


def test_dry_run_rows_carry_the_estimate(write_suite):
    suite = load_suite(str(write_suite()))
    runs = plan_runs(suite)
    rows = plan_table(runs)
    for row, run in zip(rows, runs):
        assert row["mem_estimate_bytes"] == train_memory(run.config, 32, 4)["total"]


def test_a_model_that_cannot_fit_is_refused_before_compute(write_suite, tmp_path, capsys):
    have, what = machine_memory("cpu")
    assert have is not None and what == "memory"
    # ~4.4e12 parameters as the run: 16 bytes each is far beyond any machine here
    path = write_suite(replace={'[[models]]\nname = "vanilla"\nfamily = "vanilla"\n':
                                '[[models]]\nname = "vanilla"\nfamily = "vanilla"\n'
                                'd_model = 65536\nn_heads = 64\nn_kv_heads = 64\n'
                                'd_ff = 262144\nn_layers = 64\n'})
    suite = load_suite(str(path))
    runs = plan_runs(suite)      # the plan (and the dry run) shows the estimate ...
    assert runs[0].mem_estimate > have
    with pytest.raises(ConfigError, match=r"model 'vanilla': training needs ~[\d,.]+ GiB .* "
                       r"batch_size 4 x seq_len 32\) but this machine has .* use a smaller "
                       r"preset 'micro', or a lower \[train\] batch_size with grad_accum"):
        check_memory(suite, runs)
    assert main(["run", str(path), "--dry-run", "--json"]) == 0
    capsys.readouterr()
    rc = main(["run", str(path), "--out", str(tmp_path / "runs")])  # ... a real run refuses
    err = capsys.readouterr().err
    assert rc == 2 and "training needs ~" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_budget_too_small_names_seq_len_and_batch_size():
    cfg = ModelConfig.from_preset("micro", max_seq_len=10**8)
    with pytest.raises(ConfigError, match=r"one step of 400,000,000 tokens \(batch_size 4 x "
                       r"seq_len 100000000 x grad_accum 1 x 1 process\(es\)\).* lower seq_len"):
        plan_training(cfg, Budget(flops=1e12), 10**8, 4)


def test_plan_json_keeps_the_estimate(write_suite, capsys):
    rc = main(["run", str(write_suite()), "--dry-run", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert rc == 0 and all(r["mem_estimate_bytes"] > PROCESS_BYTES for r in rows)
